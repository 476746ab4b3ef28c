//! Every RPC of geo-search fuzzed in process on the real PostgreSQL + PostGIS: hostile requests built from its
//! proto get a documented status within their deadline, never INTERNAL or a reset stream.
//! `KEEL_FUZZ_CASES` (300 here; `make fuzz`: 100,000), `KEEL_FUZZ_SEED` to replay a failure.

use keel_common::{App, config::Env, testsuite};

#[tokio::test]
async fn hostile_requests_to_every_geo_search_rpc_get_documented_statuses() {
    let db = testsuite::postgres().await;
    let env = Env::default()
        .with("KEEL_DATABASE__URL", &db.url)
        .with("KEEL_LOG__STDOUT", "false");
    let app = App::of::<geo_search::GeoSearch>();
    let addr = app.spawn(app.settings(&env).unwrap()).await.unwrap();
    let (seed, cases) = testsuite::fuzz::settings(300);
    let findings = testsuite::fuzz::run(addr, &["Search"], cases, seed, &[]).await;
    assert!(
        findings.is_empty(),
        "seed {seed} (KEEL_FUZZ_SEED={seed} to replay), {cases} cases: {findings:#?}"
    );
}
