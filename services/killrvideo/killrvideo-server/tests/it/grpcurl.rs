//! A client that knows only the .proto files (grpcurl with `-proto`, no reflection, no generated code) calls
//! every KillrVideo service of the embedded server.

use std::{path::PathBuf, process::Command};

fn grpcurl(addr: &str, proto: &str, method: &str, body: &str) -> (bool, String) {
    let bin = std::env::var("KEEL_GRPCURL").expect(
        "KEEL_GRPCURL is not set: `make infra-install` builds grpcurl; run the tests with `make test`",
    );
    let protos = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../protos/killrvideo");
    let out = Command::new(bin)
        .args(["-plaintext", "-import-path"])
        .arg(&protos)
        .args(["-proto", proto, "-d", body, addr, method])
        .output()
        .expect("run grpcurl");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

// grpcurl runs as a blocking child process: the server needs threads of its own meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_service_answers_a_proto_only_client() {
    let (addr, _) = crate::support::start_embedded().await;
    let addr = addr.to_string();
    let user = uuid::Uuid::new_v4();
    let video = uuid::Uuid::new_v4();
    let calls = [
        (
            "user-management/user_management_service.proto",
            "killrvideo.user_management.UserManagementService/CreateUser",
            format!(
                r#"{{"user_id":{{"value":"{user}"}},"first_name":"G","last_name":"R","email":"g@r.pc","password":"pw"}}"#
            ),
            "{}",
        ),
        (
            "video-catalog/video_catalog_service.proto",
            "killrvideo.video_catalog.VideoCatalogService/SubmitYouTubeVideo",
            format!(
                r#"{{"video_id":{{"value":"{video}"}},"user_id":{{"value":"{user}"}},"name":"grpcurl","description":"d","tags":["cli"],"you_tube_video_id":"abc"}}"#
            ),
            "{}",
        ),
        (
            "video-catalog/video_catalog_service.proto",
            "killrvideo.video_catalog.VideoCatalogService/GetVideo",
            format!(r#"{{"video_id":{{"value":"{video}"}}}}"#),
            "\"name\": \"grpcurl\"",
        ),
        (
            "comments/comments_service.proto",
            "killrvideo.comments.CommentsService/GetVideoComments",
            format!(r#"{{"video_id":{{"value":"{video}"}},"page_size":5}}"#),
            &format!("\"value\": \"{video}\""),
        ),
        (
            "ratings/ratings_service.proto",
            "killrvideo.ratings.RatingsService/GetRating",
            format!(r#"{{"video_id":{{"value":"{video}"}}}}"#),
            &format!("\"value\": \"{video}\""),
        ),
        (
            "statistics/statistics_service.proto",
            "killrvideo.statistics.StatisticsService/GetNumberOfPlays",
            format!(r#"{{"video_ids":[{{"value":"{video}"}}]}}"#),
            "\"stats\"",
        ),
        (
            "search/search_service.proto",
            "killrvideo.search.SearchService/GetQuerySuggestions",
            r#"{"query":"cl","page_size":5}"#.to_owned(),
            "\"query\": \"cl\"",
        ),
        (
            "suggested-videos/suggested_videos_service.proto",
            "killrvideo.suggested_videos.SuggestedVideoService/GetRelatedVideos",
            format!(r#"{{"video_id":{{"value":"{video}"}},"page_size":4}}"#),
            &format!("\"value\": \"{video}\""),
        ),
    ];
    for (proto, method, body, want) in &calls {
        let (ok, out) = grpcurl(&addr, proto, method, body);
        assert!(ok && out.contains(want), "{method}: {out}");
    }
    let (ok, out) = grpcurl(
        &addr,
        "uploads/uploads_service.proto",
        "killrvideo.uploads.UploadsService/GetUploadDestination",
        r#"{"file_name":"a.mp4"}"#,
    );
    assert!(
        !ok && out.contains("Unimplemented")
            && out.contains("Uploading videos is currently not supported"),
        "{out}"
    );
}
