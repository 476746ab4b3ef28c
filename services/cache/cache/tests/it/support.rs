//! Service processes of the cache tests: one accounts process on a fresh PostgreSQL database, and cache
//! processes asking it, registered in the real Consul under names unique to the test.

#![allow(dead_code)]

use std::time::Duration;

use keel_common::{
    Channel, ClientFactory, Metrics,
    config::{Env, Settings},
    testsuite::{self, ServiceProcess, TestDatabase, infra_var, passing_ports},
};
use keel_protos::rpc::{GetByTokenReq, accounts_client::AccountsClient};

/// The operator credential of the accounts under test (`accounts.admin_token`), which the caches present too
/// (`cache.accounts_token`).
pub const ADMIN_TOKEN: &str = "cache-tests-admin-token";

/// `msg` as the operator sends it to accounts.
pub fn as_operator<T>(msg: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    keel_common::context::set_bearer_token(&mut r, &keel_common::config::Secret::new(ADMIN_TOKEN));
    r
}

/// An accounts process and the names its caches register under.
pub struct Deployment {
    /// Consul name of the accounts process.
    pub accounts_name: String,
    /// Consul name of the cache processes.
    pub cache_name: String,
    /// The accounts database.
    pub db: TestDatabase,
    /// The accounts process.
    pub accounts: ServiceProcess,
    /// Its port.
    pub accounts_port: u16,
}

impl Deployment {
    /// Starts the accounts process and waits until it passes in Consul (so caches started next find it at once).
    pub async fn start() -> Self {
        let run = uuid::Uuid::new_v4().simple().to_string()[..8].to_owned();
        let (accounts_name, cache_name) = (format!("accounts-{run}"), format!("cache-{run}"));
        let db = testsuite::postgres().await;
        let accounts = ServiceProcess::spawn(
            "accounts",
            &accounts_name,
            &[
                ("KEEL_DATABASE__URL", db.url.clone()),
                ("KEEL_ACCOUNTS__ADMIN_TOKEN", ADMIN_TOKEN.into()),
            ],
        );
        let accounts_port = passing_ports(&accounts_name, 1, Duration::from_secs(60)).await[0];
        Self {
            accounts_port,
            accounts_name,
            cache_name,
            db,
            accounts,
        }
    }

    /// Starts one cache process asking this accounts service, with `env` on top.
    pub fn cache(&self, env: &[(&str, String)]) -> ServiceProcess {
        let mut all = vec![
            ("KEEL_CACHE__ACCOUNTS_SERVICE", self.accounts_name.clone()),
            ("KEEL_CACHE__ACCOUNTS_TOKEN", ADMIN_TOKEN.into()),
        ];
        all.extend(env.iter().cloned());
        ServiceProcess::spawn("cache", &self.cache_name, &all)
    }
}

/// The platform's clients as a service of the test would have them: peers found through the real Consul's
/// DNS, with `extra` settings on top.
pub fn consul_clients(extra: &[(&str, &str)]) -> ClientFactory {
    let mut env = Env::default()
        .with("CONSUL_HTTP_ADDR", infra_var("CONSUL_HTTP_ADDR"))
        .with("KEEL_CONSUL__DNS_ADDR", infra_var("KEEL_CONSUL_DNS_ADDR"));
    for (k, v) in extra {
        env = env.with(*k, *v);
    }
    ClientFactory::new(
        &Settings::from_env("cache-test-client", &env).unwrap(),
        Metrics::disabled(),
    )
}

/// The keys accounts counts in use for the account of `token`.
pub async fn used_cache_keys(accounts: &AccountsClient<Channel>, token: &str) -> i64 {
    accounts
        .clone()
        .get_by_token(GetByTokenReq {
            token: token.into(),
        })
        .await
        .unwrap()
        .into_inner()
        .account
        .unwrap()
        .used_cache_keys
}
