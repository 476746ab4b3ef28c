//! What the echo end-to-end tests share beyond `keel_common::testsuite`: the real servers' addresses from
//! `scripts/infra.sh env` and the environment of an echo registered in Consul.

#![allow(dead_code)]

use std::{path::PathBuf, process::Command, time::Duration};

pub use keel_common::testsuite::{ServiceProcess, TopicReader, eventually, passing_ports, unique};
use keel_common::{
    config::{Env, Settings},
    consul::ConsulAgent,
};

/// Addresses of the real servers, from the environment `scripts/infra.sh env` prints.
#[derive(Clone, Debug)]
pub struct Infra {
    pub consul_http: String,
    pub consul_dns: String,
    pub kafka: String,
    pub statsd: String,
    pub whisper_dir: PathBuf,
    /// graphite-web's base URL (render API).
    pub graphite_url: String,
    pub grpcurl: PathBuf,
    pub infra_script: PathBuf,
}

impl Infra {
    /// Fails the test (never skips it) when the infrastructure is not configured.
    pub fn get() -> Self {
        let var = |k: &str| {
            std::env::var(k).unwrap_or_else(|_| {
                panic!("{k} is not set: start the real servers with `make infra-up` and run the tests with `make test`")
            })
        };
        Self {
            consul_http: var("CONSUL_HTTP_ADDR"),
            consul_dns: var("KEEL_CONSUL_DNS_ADDR"),
            kafka: var("KEEL_KAFKA_BROKERS"),
            statsd: var("KEEL_STATSD_ADDR"),
            whisper_dir: var("KEEL_WHISPER_DIR").into(),
            graphite_url: var("KEEL_GRAPHITE_URL"),
            grpcurl: var("KEEL_GRPCURL").into(),
            infra_script: PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join("../../../scripts/infra.sh"),
        }
    }

    pub fn agent(&self) -> ConsulAgent {
        ConsulAgent::new(&self.consul_http, Default::default())
    }

    /// Settings of a test client that discovers through Consul DNS.
    pub fn client_settings(&self) -> Settings {
        let env = Env::default()
            .with("CONSUL_HTTP_ADDR", &self.consul_http)
            .with("KEEL_CONSUL__DNS_ADDR", &self.consul_dns)
            .with("KEEL_CONSUL__DISCOVERY_INTERVAL", "500ms");
        Settings::from_env("test-client", &env).expect("test client settings")
    }
}

/// How long a test waits for Consul to report an instance passing.
pub const CONSUL_WAIT: Duration = Duration::from_secs(30);

/// One echo process in a clean environment with just `env` (see [`ServiceProcess::bare`]).
pub fn echo_process(env: &[(&str, String)]) -> ServiceProcess {
    ServiceProcess::bare("echo", env)
}

/// The environment of an echo instance registered in Consul under `name`.
pub fn consul_env(infra: &Infra, name: &str) -> Vec<(&'static str, String)> {
    vec![
        ("KEEL_SERVICE__NAME", name.to_owned()),
        ("CONSUL_HTTP_ADDR", infra.consul_http.clone()),
        ("KEEL_CONSUL__DNS_ADDR", infra.consul_dns.clone()),
        ("KEEL_CONSUL__CHECK_INTERVAL", "1s".into()),
        ("KEEL_CONSUL__DEREGISTER_CRITICAL_AFTER", "1m".into()),
        ("KEEL_CONSUL__DISCOVERY_INTERVAL", "1s".into()),
    ]
}

/// A direct (not discovered) channel to one address.
pub fn direct(addr: std::net::SocketAddr) -> tonic::transport::Channel {
    tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_lazy()
}

/// Runs a command, returning stdout; fails the test with stderr when it fails.
pub fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}
