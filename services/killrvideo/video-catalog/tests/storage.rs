//! Every RPC of the video-catalog service, in process, on SQLite and on the real PostgreSQL.

use std::time::Duration;

use keel_protos::killrvideo::video_catalog::{
    GetLatestVideoPreviewsRequest, GetUserVideoPreviewsRequest, GetVideoPreviewsRequest,
    GetVideoRequest, SubmitUploadedVideoRequest, SubmitYouTubeVideoRequest, VideoPreview,
    events::YouTubeVideoAdded, video_catalog_service_server::VideoCatalogService,
};
use killrvideo::testsuite::pb;
use killrvideo::testsuite::{self, TestDatabase};
use prost::Message;
use tonic::{Code, Request};
use uuid::Uuid;
use video_catalog::{MIGRATIONS, VideoCatalog};

async fn service(db: &TestDatabase) -> (VideoCatalog, keel_common::db::Pool) {
    let (pool, outbox) = testsuite::open(db, &MIGRATIONS).await;
    (VideoCatalog::new(pool.clone(), outbox), pool)
}

fn submission(video: Uuid, user: Uuid, name: &str) -> SubmitYouTubeVideoRequest {
    SubmitYouTubeVideoRequest {
        video_id: pb(video),
        user_id: pb(user),
        name: name.into(),
        description: format!("{name}, the trailer"),
        tags: vec!["trailer".into(), "action".into(), "trailer".into()],
        you_tube_video_id: "https://www.youtube.com/watch?v=zcryCEQfTwY".into(),
    }
}

/// Submits `n` videos for `user`, a few ms apart so their added dates differ; returns their ids, oldest first.
async fn submit_many(svc: &VideoCatalog, user: Uuid, n: usize) -> Vec<Uuid> {
    let mut ids = Vec::new();
    for i in 0..n {
        let id = Uuid::new_v4();
        svc.submit_you_tube_video(Request::new(submission(id, user, &format!("video {i}"))))
            .await
            .unwrap();
        ids.push(id);
        tokio::time::sleep(Duration::from_millis(3)).await;
    }
    ids
}

fn ids_of(previews: &[VideoPreview]) -> Vec<String> {
    previews
        .iter()
        .map(|p| p.video_id.clone().unwrap().value)
        .collect()
}

fn s(ids: &[Uuid]) -> Vec<String> {
    ids.iter().map(Uuid::to_string).collect()
}

#[tokio::test]
async fn submit_then_get_video_previews_and_event() {
    for db in testsuite::databases().await {
        let (svc, pool) = service(&db).await;
        let b = db.backend;
        let (video, user) = (Uuid::new_v4(), Uuid::new_v4());
        svc.submit_you_tube_video(Request::new(submission(video, user, "Interstellar")))
            .await
            .unwrap();

        let v = svc
            .get_video(Request::new(GetVideoRequest {
                video_id: pb(video),
            }))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(v.name, "Interstellar", "{b}");
        assert_eq!(
            v.location, "https://www.youtube.com/watch?v=zcryCEQfTwY",
            "{b}: the id as submitted"
        );
        assert_eq!(v.location_type, 0, "{b}: YOUTUBE");
        assert_eq!(v.tags, vec!["action", "trailer"], "{b}: a sorted set");
        assert_eq!(v.user_id.unwrap().value, user.to_string(), "{b}");
        let added = v.added_date.unwrap();
        assert_eq!(added.nanos % 1_000_000, 0, "{b}: millisecond precision");

        let events = testsuite::queued_events(&pool, "topic-kv-videoCreation").await;
        assert_eq!(events.len(), 1, "{b}");
        let e = YouTubeVideoAdded::decode(events[0].as_slice()).unwrap();
        assert_eq!(e.tags, vec!["action", "trailer"], "{b}");
        assert_eq!(
            e.preview_image_location,
            "//img.youtube.com/vi/https://www.youtube.com/watch?v=zcryCEQfTwY/hqdefault.jpg",
            "{b}"
        );
        assert_eq!(e.added_date, Some(added), "{b}");

        let again = svc
            .submit_you_tube_video(Request::new(submission(video, user, "Other")))
            .await
            .unwrap_err();
        assert_eq!(again.code(), Code::AlreadyExists, "{b}");
        assert_eq!(
            testsuite::queued_events(&pool, "topic-kv-videoCreation")
                .await
                .len(),
            1,
            "{b}"
        );

        let missing = Uuid::new_v4();
        let err = svc
            .get_video(Request::new(GetVideoRequest {
                video_id: pb(missing),
            }))
            .await
            .unwrap_err();
        assert_eq!(
            (err.code(), err.message()),
            (
                Code::NotFound,
                format!("Video with id {missing} was not found").as_str()
            ),
            "{b}"
        );

        let other = submit_many(&svc, user, 1).await[0];
        let previews = svc
            .get_video_previews(Request::new(GetVideoPreviewsRequest {
                video_ids: vec![pb(other).unwrap(), pb(missing).unwrap(), pb(video).unwrap()],
            }))
            .await
            .unwrap()
            .into_inner()
            .video_previews;
        assert_eq!(
            ids_of(&previews),
            s(&[other, video]),
            "{b}: found ones, in request order"
        );
        assert_eq!(previews[1].name, "Interstellar");
        let err = svc
            .get_video_previews(Request::new(GetVideoPreviewsRequest {
                video_ids: (0..21).map(|_| pb(Uuid::new_v4()).unwrap()).collect(),
            }))
            .await
            .unwrap_err();
        assert!(
            err.message()
                .contains("Cannot fetch more than 20 videos at once"),
            "{b}"
        );
    }
}

#[tokio::test]
async fn user_videos_page_newest_first_with_inclusive_start_points() {
    for db in testsuite::databases().await {
        let (svc, _) = service(&db).await;
        let b = db.backend;
        let user = Uuid::new_v4();
        let v = submit_many(&svc, user, 5).await; // v[0] oldest
        submit_many(&svc, Uuid::new_v4(), 1).await; // someone else's

        let page = |size: i32, start: Option<&VideoPreview>, token: String| {
            let svc = svc.clone();
            let start = start.cloned();
            async move {
                svc.get_user_video_previews(Request::new(GetUserVideoPreviewsRequest {
                    user_id: pb(user),
                    page_size: size,
                    starting_added_date: start.as_ref().and_then(|p| p.added_date),
                    starting_video_id: start.and_then(|p| p.video_id),
                    paging_state: token,
                }))
                .await
                .unwrap()
                .into_inner()
            }
        };
        let all = page(100, None, String::new()).await;
        assert_eq!(
            ids_of(&all.video_previews),
            s(&[v[4], v[3], v[2], v[1], v[0]]),
            "{b}"
        );
        assert_eq!(all.paging_state, "", "{b}");
        assert_eq!(all.user_id.unwrap().value, user.to_string());

        // page_size 2: [v4, v3], [v2, v1], [v0], tokens after the first two pages.
        let p1 = page(2, None, String::new()).await;
        let p2 = page(2, None, p1.paging_state.clone()).await;
        let p3 = page(2, None, p2.paging_state.clone()).await;
        assert_eq!(ids_of(&p1.video_previews), s(&[v[4], v[3]]), "{b}");
        assert_eq!(ids_of(&p2.video_previews), s(&[v[2], v[1]]), "{b}");
        assert_eq!(ids_of(&p3.video_previews), s(&[v[0]]), "{b}");
        assert!(
            !p1.paging_state.is_empty()
                && !p2.paging_state.is_empty()
                && p3.paging_state.is_empty(),
            "{b}"
        );

        // A start point is inclusive, and survives paging (the web's pattern).
        let v2 = &all.video_previews[2];
        let from = page(2, Some(v2), String::new()).await;
        assert_eq!(ids_of(&from.video_previews), s(&[v[2], v[1]]), "{b}");
        let rest = page(2, Some(v2), from.paging_state).await;
        assert_eq!(ids_of(&rest.video_previews), s(&[v[0]]), "{b}");
        let same = page(1, Some(v2), String::new()).await;
        assert_eq!(
            ids_of(&same.video_previews),
            s(&[v[2]]),
            "{b}: page_size 1 returns the start point itself"
        );
    }
}

#[tokio::test]
async fn latest_videos_cover_eight_days_and_page_stably() {
    for db in testsuite::databases().await {
        let (svc, pool) = service(&db).await;
        let b = db.backend;
        let v = submit_many(&svc, Uuid::new_v4(), 3).await;
        // A row older than the window (9 days ago) is never listed.
        let old = Uuid::new_v4().to_string();
        sqlx::query("INSERT INTO latest_videos (added_ms, videoid, userid, name, preview_image_location) VALUES ($1, $2, $3, 'old', '')")
            .bind(killrvideo::time::now_ms() - 9 * 86_400_000)
            .bind(&old)
            .bind(Uuid::new_v4().to_string())
            .execute(&pool)
            .await
            .unwrap();
        let latest = |size: i32, token: String| {
            let svc = svc.clone();
            async move {
                svc.get_latest_video_previews(Request::new(GetLatestVideoPreviewsRequest {
                    page_size: size,
                    paging_state: token,
                    ..Default::default()
                }))
                .await
                .unwrap()
                .into_inner()
            }
        };
        let p1 = latest(2, String::new()).await;
        assert_eq!(ids_of(&p1.video_previews), s(&[v[2], v[1]]), "{b}");
        let p2 = latest(2, p1.paging_state).await;
        assert_eq!(
            ids_of(&p2.video_previews),
            s(&[v[0]]),
            "{b}: the 9-day-old row is outside the window"
        );
        assert_eq!(p2.paging_state, "", "{b}");

        let err = svc
            .get_latest_video_previews(Request::new(GetLatestVideoPreviewsRequest {
                page_size: 0,
                ..Default::default()
            }))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{b}");
        let err = svc
            .get_latest_video_previews(Request::new(GetLatestVideoPreviewsRequest {
                page_size: 2,
                paging_state: "not-a-token".into(),
                ..Default::default()
            }))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{b}");
    }
}

#[tokio::test]
async fn submit_validates_and_uploads_are_unimplemented() {
    let db = testsuite::sqlite().await;
    let (svc, _) = service(&db).await;
    let err = svc
        .submit_you_tube_video(Request::new(SubmitYouTubeVideoRequest {
            description: " ".into(),
            ..submission(Uuid::new_v4(), Uuid::new_v4(), "x")
        }))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message()
            .contains("description should be provided for submit youtube video request")
    );
    let err = svc
        .submit_uploaded_video(Request::new(SubmitUploadedVideoRequest::default()))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unimplemented);
}

/// Limits and ranges: too many or too long tags, an over-long name or description, and a start date outside
/// 0001–9999 are INVALID_ARGUMENT naming the field; nothing is written.
#[tokio::test]
async fn oversized_submissions_and_out_of_range_dates_are_refused() {
    let db = testsuite::sqlite().await;
    let (svc, _) = service(&db).await;
    let (video, user) = (Uuid::new_v4(), Uuid::new_v4());
    let cases: Vec<(&str, SubmitYouTubeVideoRequest)> = vec![
        ("tags", {
            let mut r = submission(video, user, "many tags");
            r.tags = (0..=killrvideo::limits::TAGS)
                .map(|i| format!("t{i}"))
                .collect();
            r
        }),
        ("tags[1]", {
            let mut r = submission(video, user, "long tag");
            r.tags = vec!["ok".into(), "t".repeat(killrvideo::limits::TAG_CHARS + 1)];
            r
        }),
        (
            "name",
            submission(
                video,
                user,
                &"n".repeat(killrvideo::limits::VIDEO_NAME_CHARS + 1),
            ),
        ),
        ("description", {
            let mut r = submission(video, user, "long description");
            r.description = "d".repeat(killrvideo::limits::DESCRIPTION_CHARS + 1);
            r
        }),
    ];
    for (field, req) in cases {
        let err = svc
            .submit_you_tube_video(Request::new(req))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{field}");
        assert!(
            err.message().starts_with(&format!("{field}:")),
            "{field}: {}",
            err.message()
        );
    }
    let none = svc
        .get_video(Request::new(GetVideoRequest {
            video_id: pb(video),
        }))
        .await
        .unwrap_err();
    assert_eq!(none.code(), Code::NotFound, "nothing was written");

    for seconds in [i64::MIN, -62_135_596_801, 253_402_300_800, i64::MAX] {
        let err = svc
            .get_user_video_previews(Request::new(GetUserVideoPreviewsRequest {
                user_id: pb(user),
                page_size: 5,
                starting_added_date: Some(prost_types::Timestamp { seconds, nanos: 0 }),
                starting_video_id: pb(video),
                ..Default::default()
            }))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{seconds}");
        assert!(
            err.message().starts_with("starting_added_date"),
            "{}",
            err.message()
        );
    }
}
