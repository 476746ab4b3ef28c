//! Every RPC of every KillrVideo service fuzzed in process on SQLite (the embedded server): hostile requests
//! built from the protos get a documented status within their deadline, never INTERNAL or a reset stream.
//! `KEEL_FUZZ_CASES` per service (300 here; `make fuzz`: 100,000), `KEEL_FUZZ_SEED` to replay a failure.

use keel_common::testsuite::fuzz;

const SERVICES: &[&str] = &[
    "killrvideo.user_management.UserManagementService",
    "killrvideo.video_catalog.VideoCatalogService",
    "killrvideo.comments.CommentsService",
    "killrvideo.ratings.RatingsService",
    "killrvideo.statistics.StatisticsService",
    "killrvideo.search.SearchService",
    "killrvideo.suggested_videos.SuggestedVideoService",
    "killrvideo.uploads.UploadsService",
];

#[tokio::test]
async fn hostile_requests_to_every_killrvideo_rpc_get_documented_statuses() {
    let (addr, _) = crate::support::start_embedded().await;
    let (seed, cases) = fuzz::settings(300);
    let findings = fuzz::run(addr, SERVICES, cases, seed, &[]).await;
    assert!(
        findings.is_empty(),
        "seed {seed} (KEEL_FUZZ_SEED={seed} to replay), {cases} cases per service: {findings:#?}"
    );
}
