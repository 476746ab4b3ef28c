//! The suggested-videos service's event handling and RPCs, in process, on SQLite and on the real PostgreSQL.

use keel_common::{Service, events::Event};
use keel_protos::killrvideo::{
    ratings::events::UserRatedVideo,
    suggested_videos::{
        GetRelatedVideosRequest, GetSuggestedForUserRequest,
        suggested_video_service_server::SuggestedVideoService,
    },
    video_catalog::events::YouTubeVideoAdded,
};
use killrvideo::testsuite::pb;
use killrvideo::{testsuite, time, topics};
use prost::Message;
use suggested_videos::{MIGRATIONS, SuggestedVideos};
use tonic::Request;
use uuid::Uuid;

fn video(name: &str, tags: &[&str], added_ms: i64) -> (Uuid, Event) {
    let id = Uuid::new_v4();
    let e = YouTubeVideoAdded {
        video_id: pb(id),
        user_id: pb(Uuid::new_v4()),
        name: name.into(),
        tags: tags.iter().map(|t| t.to_string()).collect(),
        added_date: Some(time::to_timestamp(added_ms)),
        ..Default::default()
    };
    (
        id,
        Event {
            topic: topics::YOUTUBE_VIDEO_ADDED.into(),
            key: None,
            payload: e.encode_to_vec(),
        },
    )
}

fn rated(user: Uuid, video: Uuid, rating: i32) -> Event {
    let e = UserRatedVideo {
        video_id: pb(video),
        user_id: pb(user),
        rating,
        rating_timestamp: None,
    };
    Event {
        topic: topics::USER_RATED_VIDEO.into(),
        key: None,
        payload: e.encode_to_vec(),
    }
}

#[tokio::test]
async fn related_by_shared_tags_and_suggestions_from_similar_users() {
    for db in testsuite::databases().await {
        let (pool, _) = testsuite::open(&db, &MIGRATIONS).await;
        let svc = SuggestedVideos::new(pool);
        let b = db.backend;
        let (a, ea) = video("A", &["sci-fi", "space", "Action"], 1_000);
        let (two, e2) = video("shares two", &["space", "action"], 2_000);
        let (one, e1) = video("shares one", &["sci-fi"], 3_000);
        let (none, en) = video("shares none", &["romance"], 4_000);
        for e in [&ea, &e2, &e1, &en, &e2] {
            svc.handle(e.clone()).await.unwrap();
        }
        let related = |v: Uuid, size: i32| {
            let svc = svc.clone();
            async move {
                svc.get_related_videos(Request::new(GetRelatedVideosRequest {
                    video_id: pb(v),
                    page_size: size,
                    ..Default::default()
                }))
                .await
                .unwrap()
                .into_inner()
            }
        };
        let r = related(a, 0).await;
        let ids: Vec<String> = r
            .videos
            .iter()
            .map(|v| v.video_id.clone().unwrap().value)
            .collect();
        assert_eq!(
            ids,
            vec![two.to_string(), one.to_string()],
            "{b}: most shared tags first, never the video itself"
        );
        assert_eq!(r.paging_state, "");
        assert!(
            related(Uuid::new_v4(), 4).await.videos.is_empty(),
            "{b}: unknown video, empty answer"
        );
        assert_eq!(related(a, 1).await.videos.len(), 1, "{b}");

        // me and peer both liked A; peer also liked `two` (5) and `none` (4), disliked `one` (1).
        let (me, peer) = (Uuid::new_v4(), Uuid::new_v4());
        for e in [
            rated(me, a, 5),
            rated(peer, a, 4),
            rated(peer, two, 5),
            rated(peer, none, 4),
            rated(peer, one, 1),
        ] {
            svc.handle(e.clone()).await.unwrap();
            svc.handle(e).await.unwrap();
        }
        let s = svc
            .get_suggested_for_user(Request::new(GetSuggestedForUserRequest {
                user_id: pb(me),
                page_size: 2,
                ..Default::default()
            }))
            .await
            .unwrap()
            .into_inner();
        let ids: Vec<String> = s
            .videos
            .iter()
            .map(|v| v.video_id.clone().unwrap().value)
            .collect();
        assert_eq!(
            ids,
            vec![two.to_string(), none.to_string()],
            "{b}: what the similar user liked, best first"
        );
        assert_eq!(s.user_id.unwrap().value, me.to_string());

        // A new user still gets suggestions (the best-rated videos), never an error.
        let fresh = svc
            .get_suggested_for_user(Request::new(GetSuggestedForUserRequest {
                user_id: pb(Uuid::new_v4()),
                page_size: 3,
                ..Default::default()
            }))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(fresh.videos.len(), 3, "{b}");
        assert_eq!(
            fresh.videos[0].video_id.clone().unwrap().value,
            a.to_string(),
            "{b}: A has the most rating points"
        );
    }
}

/// Ratings apply in the order they were given, not the order they arrive: a late event carrying an older
/// rating leaves the newer one in place; redelivering an event changes nothing; on both backends.
#[tokio::test]
async fn a_late_older_rating_never_overwrites_a_newer_one() {
    for db in testsuite::databases().await {
        let (pool, _) = testsuite::open(&db, &MIGRATIONS).await;
        let svc = SuggestedVideos::new(pool.clone());
        let (user, video) = (Uuid::new_v4(), Uuid::new_v4());
        let at = |rating: i32, ms: i64| {
            let mut e =
                UserRatedVideo::decode(rated(user, video, rating).payload.as_slice()).unwrap();
            e.rating_timestamp = Some(time::to_timestamp(ms));
            Event {
                topic: topics::USER_RATED_VIDEO.into(),
                key: None,
                payload: e.encode_to_vec(),
            }
        };
        let newer = at(5, 2_000_000);
        svc.handle(newer.clone()).await.unwrap();
        svc.handle(at(1, 1_000_000)).await.unwrap(); // given earlier, delivered late
        svc.handle(newer).await.unwrap(); // redelivered
        let stored: i64 =
            sqlx::query_scalar("SELECT rating FROM sv_ratings WHERE userid = $1 AND videoid = $2")
                .bind(user.to_string())
                .bind(video.to_string())
                .fetch_one(&pool)
                .await
                .unwrap();
        assert_eq!(stored, 5, "{}", db.backend);
        svc.handle(at(2, 3_000_000)).await.unwrap();
        let stored: i64 =
            sqlx::query_scalar("SELECT rating FROM sv_ratings WHERE userid = $1 AND videoid = $2")
                .bind(user.to_string())
                .bind(video.to_string())
                .fetch_one(&pool)
                .await
                .unwrap();
        assert_eq!(stored, 2, "{}: a newer rating replaces it", db.backend);
    }
}
