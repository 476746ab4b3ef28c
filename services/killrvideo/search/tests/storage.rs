//! The search service's event handling and RPCs, in process, on SQLite and on the real PostgreSQL.

use keel_common::{
    Service,
    events::{Event, HandlerError},
};
use keel_protos::killrvideo::{
    common::Uuid as PbUuid,
    search::{
        GetQuerySuggestionsRequest, SearchVideosRequest, search_service_server::SearchService,
    },
    video_catalog::events::YouTubeVideoAdded,
};
use killrvideo::{testsuite, time, topics};
use prost::Message;
use search::{MIGRATIONS, Search};
use tonic::{Code, Request};
use uuid::Uuid;

fn added(name: &str, tags: &[&str], description: &str, added_ms: i64) -> (Uuid, Event) {
    let id = Uuid::new_v4();
    let e = YouTubeVideoAdded {
        video_id: Some(PbUuid {
            value: id.to_string(),
        }),
        user_id: Some(PbUuid {
            value: Uuid::new_v4().to_string(),
        }),
        name: name.into(),
        description: description.into(),
        location: "abc".into(),
        preview_image_location: "//img.youtube.com/vi/abc/hqdefault.jpg".into(),
        tags: tags.iter().map(|t| t.to_string()).collect(),
        added_date: Some(time::to_timestamp(added_ms)),
        timestamp: Some(time::to_timestamp(added_ms)),
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

#[tokio::test]
async fn indexed_videos_are_found_ranked_and_suggested() {
    for db in testsuite::databases().await {
        let (pool, _) = testsuite::open(&db, &MIGRATIONS).await;
        let svc = Search::new(pool);
        let b = db.backend;
        let (sw, e1) = added(
            "Star Wars: The Force Awakens",
            &["star wars", "sci-fi"],
            "A long time ago",
            3_000,
        );
        let (st, e2) = added("Star Trek Beyond", &["star trek"], "Space adventure", 2_000);
        let (born, e3) = added(
            "A Star Is Born",
            &["drama", "music"],
            "A musician and a star",
            1_000,
        );
        let (_, e4) = added("Casablanca", &["classic"], "Of all the gin joints", 500);
        for e in [&e1, &e2, &e3, &e4, &e1] {
            svc.handle(e.clone()).await.unwrap(); // e1 twice: redelivery changes nothing
        }
        let search = |q: &str, size: i32, token: String| {
            let svc = svc.clone();
            let q = q.to_owned();
            async move {
                svc.search_videos(Request::new(SearchVideosRequest {
                    query: q,
                    page_size: size,
                    paging_state: token,
                }))
                .await
                .unwrap()
                .into_inner()
            }
        };
        let r = search("Star Wars", 10, String::new()).await;
        let ids: Vec<String> = r
            .videos
            .iter()
            .map(|v| v.video_id.clone().unwrap().value)
            .collect();
        assert_eq!(
            ids[0],
            sw.to_string(),
            "{b}: both words, in the name and the tags, rank first"
        );
        assert_eq!(ids.len(), 3, "{b}: every video with either word, each once");
        assert!(
            ids.contains(&st.to_string()) && ids.contains(&born.to_string()),
            "{b}"
        );
        assert_eq!(r.query, "Star Wars");
        assert_eq!(r.videos[0].name, "Star Wars: The Force Awakens");
        assert_eq!(r.paging_state, "", "{b}");

        let p1 = search("star", 2, String::new()).await;
        assert_eq!(p1.videos.len(), 2, "{b}");
        assert!(!p1.paging_state.is_empty(), "{b}");
        let p2 = search("star", 2, p1.paging_state.clone()).await;
        assert_eq!(p2.videos.len(), 1, "{b}");
        assert_eq!(p2.paging_state, "", "{b}");

        let none = search("zebra", 5, String::new()).await;
        assert!(none.videos.is_empty(), "{b}");

        let s = svc
            .get_query_suggestions(Request::new(GetQuerySuggestionsRequest {
                query: "St".into(),
                page_size: 5,
            }))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(s.suggestions, vec!["star", "star trek", "star wars"], "{b}");
        assert_eq!(s.query, "St");
        let s = svc
            .get_query_suggestions(Request::new(GetQuerySuggestionsRequest {
                query: "%".into(),
                page_size: 5,
            }))
            .await
            .unwrap()
            .into_inner();
        assert!(
            s.suggestions.is_empty(),
            "{b}: LIKE wildcards in the query are literal"
        );
    }
}

#[tokio::test]
async fn bad_requests_and_malformed_events() {
    let db = testsuite::sqlite().await;
    let (pool, _) = testsuite::open(&db, &MIGRATIONS).await;
    let svc = Search::new(pool);
    let err = svc
        .search_videos(Request::new(SearchVideosRequest {
            query: " ".into(),
            page_size: 5,
            ..Default::default()
        }))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let err = svc
        .search_videos(Request::new(SearchVideosRequest {
            query: "x".into(),
            page_size: 0,
            ..Default::default()
        }))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let garbage = Event {
        topic: topics::YOUTUBE_VIDEO_ADDED.into(),
        key: None,
        payload: vec![0xff, 0xff, 0xff],
    };
    assert!(matches!(
        svc.handle(garbage).await,
        Err(HandlerError::Malformed(_))
    ));
}

/// Hostile input is a clear INVALID_ARGUMENT naming the field, never INTERNAL or a panic: tens of thousands of
/// words (which used to overflow the SQL parameter limit), an over-long query, and a crafted paging state
/// whose offset is past the deepest page (which used to overflow `offset + size`).
#[tokio::test]
async fn oversized_queries_and_crafted_offsets_are_invalid_arguments() {
    let db = testsuite::sqlite().await;
    let (pool, _) = testsuite::open(&db, &MIGRATIONS).await;
    let svc = Search::new(pool);
    let many_words: String = (0..40_000).map(|i| format!("w{i} ")).collect();
    let long_word = "x".repeat(10_000);
    // Even signed with the deployment's key (as if it leaked), an offset past the deepest page is refused.
    let crafted = killrvideo::paging::encode(search::SEARCH_SCOPE, &usize::MAX);
    for (query, paging_state, field) in [
        (many_words.as_str(), String::new(), "query"),
        (long_word.as_str(), String::new(), "query"),
        ("star", crafted, "paging_state"),
    ] {
        let err = svc
            .search_videos(Request::new(SearchVideosRequest {
                query: query.into(),
                page_size: 5,
                paging_state,
            }))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{}", err.message());
        assert!(err.message().starts_with(field), "{}", err.message());
        assert!(err.message().len() < 1024);
    }
    let err = svc
        .get_query_suggestions(Request::new(GetQuerySuggestionsRequest {
            query: long_word,
            page_size: 5,
        }))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
}
