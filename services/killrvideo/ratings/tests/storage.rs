//! Every RPC of the ratings service, in process, on SQLite and on the real PostgreSQL.

use keel_protos::killrvideo::ratings::{
    GetRatingRequest, GetUserRatingRequest, RateVideoRequest, events::UserRatedVideo,
    ratings_service_server::RatingsService,
};
use killrvideo::testsuite;
use killrvideo::testsuite::pb;
use prost::Message;
use ratings::{MIGRATIONS, Ratings};
use tonic::{Code, Request};
use uuid::Uuid;

#[tokio::test]
async fn ratings_total_counts_and_per_user_values() {
    for db in testsuite::databases().await {
        let (pool, outbox) = testsuite::open(&db, &MIGRATIONS).await;
        let svc = Ratings::new(pool.clone(), outbox);
        let b = db.backend;
        let video = Uuid::new_v4();
        let rating = |v: Uuid| {
            let svc = svc.clone();
            async move {
                svc.get_rating(Request::new(GetRatingRequest { video_id: pb(v) }))
                    .await
                    .unwrap()
                    .into_inner()
            }
        };
        let unrated = rating(video).await;
        assert_eq!(
            (unrated.ratings_count, unrated.ratings_total),
            (0, 0),
            "{b}"
        );
        assert_eq!(unrated.video_id.unwrap().value, video.to_string());

        let users: Vec<Uuid> = (0..3).map(|_| Uuid::new_v4()).collect();
        for (u, r) in users.iter().zip([4, 2, 5]) {
            svc.rate_video(Request::new(RateVideoRequest {
                video_id: pb(video),
                user_id: pb(*u),
                rating: r,
            }))
            .await
            .unwrap();
        }
        let r = rating(video).await;
        assert_eq!((r.ratings_count, r.ratings_total), (3, 11), "{b}");

        // Re-rating replaces: the count stays, the total moves by the difference.
        svc.rate_video(Request::new(RateVideoRequest {
            video_id: pb(video),
            user_id: pb(users[1]),
            rating: 5,
        }))
        .await
        .unwrap();
        let r = rating(video).await;
        assert_eq!((r.ratings_count, r.ratings_total), (3, 14), "{b}");

        let mine = svc
            .get_user_rating(Request::new(GetUserRatingRequest {
                video_id: pb(video),
                user_id: pb(users[1]),
            }))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(mine.rating, 5, "{b}");
        assert_eq!(mine.user_id.unwrap().value, users[1].to_string());
        let none = svc
            .get_user_rating(Request::new(GetUserRatingRequest {
                video_id: pb(video),
                user_id: pb(Uuid::new_v4()),
            }))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(none.rating, 0, "{b}");

        let events = testsuite::queued_events(&pool, "topic-kv-videoRating").await;
        assert_eq!(events.len(), 4, "{b}");
        let e = UserRatedVideo::decode(events[3].as_slice()).unwrap();
        assert_eq!(
            (e.rating, e.user_id.unwrap().value),
            (5, users[1].to_string()),
            "{b}"
        );
        assert!(e.rating_timestamp.is_some());
    }
}

#[tokio::test]
async fn ratings_outside_one_to_five_are_invalid() {
    let db = testsuite::sqlite().await;
    let (pool, outbox) = testsuite::open(&db, &MIGRATIONS).await;
    let svc = Ratings::new(pool.clone(), outbox);
    for bad in [0, 6, -1] {
        let err = svc
            .rate_video(Request::new(RateVideoRequest {
                video_id: pb(Uuid::new_v4()),
                user_id: pb(Uuid::new_v4()),
                rating: bad,
            }))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{bad}");
    }
    assert!(
        testsuite::queued_events(&pool, "topic-kv-videoRating")
            .await
            .is_empty()
    );
}

#[tokio::test]
async fn concurrent_ratings_of_one_video_all_count_once() {
    for db in testsuite::databases().await {
        let (pool, outbox) = testsuite::open(&db, &MIGRATIONS).await;
        let svc = Ratings::new(pool, outbox);
        let video = Uuid::new_v4();
        let user = Uuid::new_v4();
        let results = futures::future::join_all((0..24).map(|i| {
            let svc = svc.clone();
            // Every fourth call re-rates the same user: it must replace, never add.
            let u = if i % 4 == 0 { user } else { Uuid::new_v4() };
            async move {
                svc.rate_video(Request::new(RateVideoRequest {
                    video_id: pb(video),
                    user_id: pb(u),
                    rating: 4,
                }))
                .await
            }
        }))
        .await;
        for r in &results {
            assert!(r.is_ok(), "{}: {r:?}", db.backend);
        }
        let r = svc
            .get_rating(Request::new(GetRatingRequest {
                video_id: pb(video),
            }))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            (r.ratings_count, r.ratings_total),
            (19, 76),
            "{}: 18 users once + 1 user 6 times",
            db.backend
        );
    }
}
