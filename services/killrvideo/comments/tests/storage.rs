//! Every RPC of the comments service, in process, on SQLite and on the real PostgreSQL.

use comments::{Comments, MIGRATIONS};
use keel_protos::killrvideo::{
    comments::{
        CommentOnVideoRequest, GetUserCommentsRequest, GetVideoCommentsRequest,
        comments_service_server::CommentsService, events::UserCommentedOnVideo,
    },
    common::TimeUuid,
};
use killrvideo::testsuite::{self, pb};
use prost::Message;
use tonic::{Code, Request};
use uuid::{Uuid, timestamp::context::ContextV1};

fn tu(id: Uuid) -> Option<TimeUuid> {
    Some(TimeUuid {
        value: id.to_string(),
    })
}

/// A version-1 id at `secs` past 2023-11-14 (so ids made in any order sort by that time).
fn time_id(secs: u64) -> Uuid {
    let ctx = ContextV1::new_random();
    Uuid::new_v1(
        uuid::Timestamp::from_unix(&ctx, 1_700_000_000 + secs, 250_000_000),
        &[1, 2, 3, 4, 5, 6],
    )
}

#[tokio::test]
async fn comments_by_video_and_by_user_newest_first_with_start_points() {
    for db in testsuite::databases().await {
        let (pool, outbox) = testsuite::open(&db, &MIGRATIONS).await;
        let svc = Comments::new(pool.clone(), outbox);
        let b = db.backend;
        let (video, user) = (Uuid::new_v4(), Uuid::new_v4());
        // Sent out of time order: the list follows the time in the ids, not arrival.
        let ids: Vec<Uuid> = (0..5).map(time_id).collect();
        for i in [2usize, 0, 4, 1, 3] {
            svc.comment_on_video(Request::new(CommentOnVideoRequest {
                video_id: pb(video),
                user_id: pb(user),
                comment_id: tu(ids[i]),
                comment: format!("comment {i}"),
            }))
            .await
            .unwrap();
        }
        // A retry of the same comment changes nothing.
        svc.comment_on_video(Request::new(CommentOnVideoRequest {
            video_id: pb(video),
            user_id: pb(user),
            comment_id: tu(ids[0]),
            comment: "comment 0".into(),
        }))
        .await
        .unwrap();
        let events = testsuite::queued_events(&pool, "topic-kv-commentCreation").await;
        assert_eq!(events.len(), 5, "{b}");
        let e = UserCommentedOnVideo::decode(events[0].as_slice()).unwrap();
        assert_eq!(e.comment_id.unwrap().value, ids[2].to_string(), "{b}");

        let page = |size: i32, start: Option<Uuid>, token: String| {
            let svc = svc.clone();
            async move {
                svc.get_video_comments(Request::new(GetVideoCommentsRequest {
                    video_id: pb(video),
                    page_size: size,
                    starting_comment_id: start.and_then(tu),
                    paging_state: token,
                }))
                .await
                .unwrap()
                .into_inner()
            }
        };
        let want = |idx: &[usize]| idx.iter().map(|i| ids[*i].to_string()).collect::<Vec<_>>();
        let got = |r: &[keel_protos::killrvideo::comments::VideoComment]| {
            r.iter()
                .map(|c| c.comment_id.clone().unwrap().value)
                .collect::<Vec<_>>()
        };
        let p1 = page(2, None, String::new()).await;
        assert_eq!(got(&p1.comments), want(&[4, 3]), "{b}");
        assert_eq!(p1.video_id.clone().unwrap().value, video.to_string());
        let c = &p1.comments[0];
        assert_eq!(c.comment, "comment 4");
        assert_eq!(c.user_id.clone().unwrap().value, user.to_string());
        let ts = c.comment_timestamp.unwrap();
        assert_eq!(
            (ts.seconds, ts.nanos),
            (1_700_000_004, 250_000_000),
            "{b}: the time in the id"
        );
        let p2 = page(2, None, p1.paging_state.clone()).await;
        let p3 = page(2, None, p2.paging_state.clone()).await;
        assert_eq!(
            (got(&p2.comments), got(&p3.comments)),
            (want(&[2, 1]), want(&[0])),
            "{b}"
        );
        assert_eq!(p3.paging_state, "", "{b}");

        let from = page(1, Some(ids[2]), String::new()).await;
        assert_eq!(got(&from.comments), want(&[2]), "{b}: inclusive start");
        let next = page(1, Some(ids[2]), from.paging_state).await;
        assert_eq!(got(&next.comments), want(&[1]), "{b}");

        let by_user = svc
            .get_user_comments(Request::new(GetUserCommentsRequest {
                user_id: pb(user),
                page_size: 10,
                ..Default::default()
            }))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(by_user.comments.len(), 5, "{b}");
        assert_eq!(
            by_user.comments[0].video_id.clone().unwrap().value,
            video.to_string()
        );
        assert_eq!(by_user.user_id.unwrap().value, user.to_string());
    }
}

#[tokio::test]
async fn comment_requests_are_validated() {
    let db = testsuite::sqlite().await;
    let (pool, outbox) = testsuite::open(&db, &MIGRATIONS).await;
    let svc = Comments::new(pool, outbox);
    let ok = CommentOnVideoRequest {
        video_id: pb(Uuid::new_v4()),
        user_id: pb(Uuid::new_v4()),
        comment_id: tu(time_id(1)),
        comment: "hi".into(),
    };
    for (bad, what) in [
        (
            CommentOnVideoRequest {
                comment_id: tu(Uuid::new_v4()),
                ..ok.clone()
            },
            "version 1",
        ),
        (
            CommentOnVideoRequest {
                comment: "  ".into(),
                ..ok.clone()
            },
            "comment should be provided",
        ),
        (
            CommentOnVideoRequest {
                video_id: None,
                ..ok.clone()
            },
            "video_id should be provided",
        ),
    ] {
        let err = svc.comment_on_video(Request::new(bad)).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument);
        assert!(err.message().contains(what), "{}", err.message());
    }
    let err = svc
        .get_video_comments(Request::new(GetVideoCommentsRequest {
            video_id: pb(Uuid::new_v4()),
            page_size: 0,
            ..Default::default()
        }))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
}

/// A comment whose time UUID predates 1970 comes back dated when it says (it used to come back in the year
/// ~60,000, which protobuf JSON clients cannot print); an over-long comment is INVALID_ARGUMENT on `comment`.
#[tokio::test]
async fn comment_times_before_1970_and_oversized_comments() {
    let db = testsuite::sqlite().await;
    let (pool, outbox) = testsuite::open(&db, &MIGRATIONS).await;
    let svc = Comments::new(pool, outbox);
    let (video, user) = (Uuid::new_v4(), Uuid::new_v4());
    // 1969-12-31T00:00:00Z: one day before the Unix epoch.
    let old = Uuid::new_v1(
        uuid::Timestamp::from_gregorian_time(0x01B2_1DD2_1381_4000 - 864_000_000_000, 0),
        &[1, 2, 3, 4, 5, 6],
    );
    svc.comment_on_video(Request::new(CommentOnVideoRequest {
        video_id: pb(video),
        user_id: pb(user),
        comment_id: tu(old),
        comment: "from the past".into(),
    }))
    .await
    .unwrap();
    let listed = svc
        .get_video_comments(Request::new(GetVideoCommentsRequest {
            video_id: pb(video),
            page_size: 5,
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner()
        .comments;
    let ts = listed[0].comment_timestamp.unwrap();
    assert_eq!((ts.seconds, ts.nanos), (-86_400, 0));

    let err = svc
        .comment_on_video(Request::new(CommentOnVideoRequest {
            video_id: pb(video),
            user_id: pb(user),
            comment_id: tu(time_id(1)),
            comment: "x".repeat(killrvideo::limits::COMMENT_CHARS + 1),
        }))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().starts_with("comment:"), "{}", err.message());
}

/// A paging state pages only the list it came from: one of video A's comments list given for video B, or for
/// a user's list, or changed by a single character, is INVALID_ARGUMENT on `paging_state`, never a wrong page.
#[tokio::test]
async fn paging_states_are_tamper_proof_and_bound_to_their_list() {
    let db = testsuite::sqlite().await;
    let (pool, outbox) = testsuite::open(&db, &MIGRATIONS).await;
    let svc = Comments::new(pool, outbox);
    let (video, other, user) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
    for (v, i) in [(video, 1), (video, 2), (video, 3), (other, 4)] {
        svc.comment_on_video(Request::new(CommentOnVideoRequest {
            video_id: pb(v),
            user_id: pb(user),
            comment_id: tu(time_id(i)),
            comment: format!("comment {i}"),
        }))
        .await
        .unwrap();
    }
    let token = svc
        .get_video_comments(Request::new(GetVideoCommentsRequest {
            video_id: pb(video),
            page_size: 1,
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner()
        .paging_state;
    assert!(!token.is_empty());
    let mut tampered = token.clone().into_bytes();
    let last = tampered.len() - 1;
    tampered[last] = if tampered[last] == b'A' { b'B' } else { b'A' };
    let tampered = String::from_utf8(tampered).unwrap();
    for (video_id, paging_state) in [
        (other, token.clone()),
        (video, tampered),
        (video, format!("{token}x")),
    ] {
        let err = svc
            .get_video_comments(Request::new(GetVideoCommentsRequest {
                video_id: pb(video_id),
                page_size: 1,
                paging_state,
                ..Default::default()
            }))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument);
        assert!(
            err.message().starts_with("paging_state"),
            "{}",
            err.message()
        );
    }
    let err = svc
        .get_user_comments(Request::new(GetUserCommentsRequest {
            user_id: pb(user),
            page_size: 1,
            paging_state: token.clone(),
            ..Default::default()
        }))
        .await
        .unwrap_err();
    assert_eq!(
        err.code(),
        Code::InvalidArgument,
        "a video list's token on a user list"
    );
    // The genuine token still pages on.
    svc.get_video_comments(Request::new(GetVideoCommentsRequest {
        video_id: pb(video),
        page_size: 1,
        paging_state: token,
        ..Default::default()
    }))
    .await
    .unwrap();
}
