//! Helpers for the end-to-end tests: the real infrastructure started by `scripts/infra.sh` (its `env` output
//! names the addresses), echo processes started from the built binary, and `eventually`.

#![allow(dead_code)]

use std::{
    fs::File,
    future::Future,
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

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

/// A unique name for this test's service, so tests running in parallel never see each other.
pub fn unique(prefix: &str) -> String {
    format!(
        "{prefix}-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    )
}

/// One echo process; killed (SIGKILL) on drop if still running.
pub struct EchoProcess {
    pub child: Child,
    pub log: PathBuf,
}

impl EchoProcess {
    /// Starts `echo` with the given environment on top of a clean one (only PATH and HOME kept).
    pub fn spawn(env: &[(&str, String)]) -> Self {
        let log = std::env::temp_dir().join(format!("echo-{}.log", uuid::Uuid::new_v4().simple()));
        let out = File::create(&log).expect("log file");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_echo"));
        cmd.env_clear();
        for k in ["PATH", "HOME"] {
            if let Ok(v) = std::env::var(k) {
                cmd.env(k, v);
            }
        }
        cmd.env("KEEL_LOG__LEVEL", "info");
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .expect("spawn echo");
        Self { child, log }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn output(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// JSON log lines printed so far.
    pub fn lines(&self) -> Vec<serde_json::Value> {
        self.output()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// The address the server logged it listens on.
    pub async fn addr(&self) -> std::net::SocketAddr {
        eventually(
            "echo logs its listening address",
            Duration::from_secs(20),
            || async {
                self.lines().iter().find_map(|l| {
                    (l["message"] == "grpc server listening")
                        .then(|| l["fields"]["addr"].as_str()?.parse().ok())
                        .flatten()
                })
            },
        )
        .await
    }

    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.pid().to_string())
            .status()
            .expect("kill")
            .success();
        assert!(ok, "kill -{sig} {}", self.pid());
    }

    /// Waits for the process to exit, at most `limit`.
    pub async fn wait_exit(&mut self, limit: Duration) -> std::process::ExitStatus {
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            assert!(
                start.elapsed() < limit,
                "echo did not exit within {limit:?}; output:\n{}",
                self.output()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for EchoProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
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

/// Polls `f` every 100 ms until it returns `Some`, failing the test after `limit`.
pub async fn eventually<T, F, Fut>(what: &str, limit: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            start.elapsed() < limit,
            "timed out after {limit:?} waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until Consul reports `count` instances of `name` with every check passing; returns their ports.
pub async fn passing_ports(infra: &Infra, name: &str, count: usize) -> Vec<u16> {
    let agent = infra.agent();
    eventually(
        &format!("{count} passing instance(s) of {name} in consul"),
        Duration::from_secs(30),
        || async {
            let entries = agent.health_service(name, true).await.ok()?;
            (entries.len() == count).then(|| entries.iter().map(|e| e.service.port).collect())
        },
    )
    .await
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

/// A Kafka consumer reading `topic` from the beginning, in a fresh consumer group.
pub fn consumer(infra: &Infra, topic: &str) -> rdkafka::consumer::BaseConsumer {
    use rdkafka::consumer::Consumer;
    let c: rdkafka::consumer::BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &infra.kafka)
        .set("group.id", unique("test"))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .set("topic.metadata.refresh.interval.ms", "500")
        .create()
        .expect("consumer");
    c.subscribe(&[topic]).expect("subscribe");
    c
}

/// Polls `consumer` until a message payload satisfies `pred`, at most `limit`; returns it parsed as JSON.
pub async fn consume_until(
    consumer: rdkafka::consumer::BaseConsumer,
    limit: Duration,
    pred: impl Fn(&serde_json::Value) -> bool + Send + 'static,
) -> (serde_json::Value, rdkafka::consumer::BaseConsumer) {
    tokio::task::spawn_blocking(move || {
        use rdkafka::Message;
        let start = Instant::now();
        while start.elapsed() < limit {
            if let Some(Ok(m)) = consumer.poll(Duration::from_millis(200))
                && let Some(p) = m.payload()
                && let Ok(v) = serde_json::from_slice::<serde_json::Value>(p)
                && pred(&v)
            {
                return (v, consumer);
            }
        }
        panic!("no matching message on the topic within {limit:?}");
    })
    .await
    .expect("consumer task")
}
