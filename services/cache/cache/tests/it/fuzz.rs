//! Every RPC of accounts and cache fuzzed in process on SQLite: hostile requests built from the protos (with
//! and without credentials and dry-run) get a documented status within their deadline, never INTERNAL or a
//! reset stream. `KEEL_FUZZ_CASES` per service (300 here; `make fuzz`: 100,000), `KEEL_FUZZ_SEED` to replay.

use keel_common::{App, config::Env, testsuite::fuzz};

use crate::support::ADMIN_TOKEN;

#[tokio::test]
async fn hostile_requests_to_every_accounts_and_cache_rpc_get_documented_statuses() {
    let dir = std::env::temp_dir().join(format!("keel-fuzz-{}", uuid::Uuid::new_v4().simple()));
    let env = Env::default()
        .with(
            "KEEL_DATABASE__URL",
            format!("sqlite://{}/accounts.db?mode=rwc", dir.display()),
        )
        .with("KEEL_ACCOUNTS__ADMIN_TOKEN", ADMIN_TOKEN)
        .with("KEEL_LOG__STDOUT", "false");
    let accounts = App::of::<accounts::Accounts>();
    let accounts_addr = accounts
        .spawn(accounts.settings(&env).unwrap())
        .await
        .unwrap();
    let env = Env::default()
        .with(
            "KEEL_CLIENT__STATIC_ENDPOINTS",
            format!("accounts={accounts_addr}"),
        )
        .with("KEEL_CACHE__ACCOUNTS_TOKEN", ADMIN_TOKEN)
        .with("KEEL_LOG__STDOUT", "false");
    let cache = App::of::<cache::Cache>();
    let cache_addr = cache.spawn(cache.settings(&env).unwrap()).await.unwrap();

    // A tenant with a small quota, so Stores also reach the quota's refusals.
    let tenant = keel_protos::rpc::accounts_client::AccountsClient::new(
        tonic::transport::Endpoint::from_shared(format!("http://{accounts_addr}"))
            .unwrap()
            .connect()
            .await
            .unwrap(),
    )
    .create_account(crate::support::as_operator(
        keel_protos::rpc::CreateAccountReq {
            name: "fuzz".into(),
            max_cache_keys: 50,
        },
    ))
    .await
    .unwrap()
    .into_inner()
    .token;
    let credentials = [ADMIN_TOKEN.to_owned(), tenant];
    let (seed, cases) = fuzz::settings(300);
    let mut findings = fuzz::run(accounts_addr, &["rpc.Accounts"], cases, seed, &credentials).await;
    findings.extend(fuzz::run(cache_addr, &["rpc.Cache"], cases, seed, &credentials).await);
    assert!(
        findings.is_empty(),
        "seed {seed} (KEEL_FUZZ_SEED={seed} to replay), {cases} cases per service: {findings:#?}"
    );
}
