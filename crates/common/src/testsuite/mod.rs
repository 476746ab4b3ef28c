//! Test support (feature `testsuite`), the one place the services' test suites take their helpers from: a
//! fresh database per test on both backends, service processes started from the built binaries, polling
//! assertions ([`eventually`]), Consul and Kafka readers, unique names.
//!
//! PostgreSQL is the real server started by `scripts/infra.sh` (`make infra-up`); its admin URL comes from
//! `KEEL_DATABASE_URL` (`scripts/infra.sh env`). When it is not set the PostgreSQL half of a test fails with a
//! message saying so: tests never skip.

pub mod calls;
pub mod fuzz;

use crate::db::sqlx::{self, Connection};

/// One backend a test runs on.
#[derive(Clone, Debug)]
pub struct TestDatabase {
    /// `sqlite` or `postgres`, for assertion messages.
    pub backend: &'static str,
    /// A sqlx URL of a database nobody else uses.
    pub url: String,
}

/// A fresh SQLite file and a fresh PostgreSQL database.
///
/// # Panics
/// `KEEL_DATABASE_URL` is unset or PostgreSQL does not answer (start it with `make infra-up`).
pub async fn databases() -> Vec<TestDatabase> {
    vec![sqlite().await, postgres().await]
}

/// A fresh SQLite file under the system temp directory.
pub async fn sqlite() -> TestDatabase {
    let dir = std::env::temp_dir().join("keel-tests");
    std::fs::create_dir_all(&dir).expect("temp dir");
    let file = dir.join(format!("{}.db", uuid::Uuid::new_v4().simple()));
    TestDatabase {
        backend: "sqlite",
        url: format!("sqlite://{}?mode=rwc", file.display()),
    }
}

/// A fresh database on the real PostgreSQL server.
///
/// # Panics
/// As [`databases`].
pub async fn postgres() -> TestDatabase {
    let admin = std::env::var("KEEL_DATABASE_URL").expect(
        "KEEL_DATABASE_URL is not set: start PostgreSQL with `make infra-up` and run tests through `make test`",
    );
    let name = format!("keeltest_{}", uuid::Uuid::new_v4().simple());
    let mut conn = sqlx::PgConnection::connect(&admin)
        .await
        .unwrap_or_else(|e| {
            panic!("PostgreSQL at {admin} does not answer ({e}): run `make infra-up`")
        });
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(&mut conn)
        .await
        .expect("create test database");
    let base = admin.rsplit_once('/').map(|(b, _)| b).unwrap_or(&admin);
    TestDatabase {
        backend: "postgres",
        url: format!("{base}/{name}"),
    }
}

/// Opens `db` with `migrations` applied, and an outbox on an in-process bus whose relay is not running, so a
/// test can read what was queued with [`queued_events`].
///
/// # Panics
/// The database cannot be opened.
pub async fn open(
    db: &TestDatabase,
    migrations: &sqlx::migrate::Migrator,
) -> (crate::db::Pool, crate::outbox::Outbox) {
    let pool = crate::db::connect_url(&db.url, 4, std::time::Duration::from_secs(5), migrations)
        .await
        .unwrap_or_else(|e| panic!("{}: {e:#}", db.backend));
    let outbox = crate::outbox::Outbox::new(pool.clone(), crate::EventBus::in_process());
    (pool, outbox)
}

/// The payloads queued in the outbox for `topic`, oldest first.
///
/// # Panics
/// The query fails.
pub async fn queued_events(pool: &crate::db::Pool, topic: &str) -> Vec<Vec<u8>> {
    use base64::Engine;
    use sqlx::Row;
    sqlx::query("SELECT payload FROM keel_outbox WHERE topic = $1 ORDER BY id")
        .bind(topic)
        .fetch_all(pool)
        .await
        .expect("read outbox")
        .iter()
        .map(|r| {
            base64::engine::general_purpose::STANDARD
                .decode(r.get::<String, _>(0))
                .expect("base64 payload")
        })
        .collect()
}

/// A variable of the real servers' environment (`scripts/infra.sh env`).
///
/// # Panics
/// It is not set: the message says how to start the servers.
pub fn infra_var(key: &str) -> String {
    std::env::var(key).unwrap_or_else(|_| {
        panic!("{key} is not set: start the real servers with `make infra-up` and run the tests with `make test`")
    })
}

/// The workspace's built binary `name` (`make test` builds every binary before the tests).
///
/// # Panics
/// It is missing.
pub fn binary(name: &str) -> std::path::PathBuf {
    let target = std::env::var("CARGO_TARGET_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|_| {
            std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target")
        });
    let path = target.join("debug").join(name);
    assert!(
        path.exists(),
        "{} is missing: `make test` builds every binary first",
        path.display()
    );
    path
}

/// A name unique to this test run, `<prefix>-<8 hex>`, so tests running in parallel never see each other.
pub fn unique(prefix: &str) -> String {
    format!(
        "{prefix}-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    )
}

/// Polls `f` every 100 ms until it returns `Some`, failing the test after `limit` (instead of a fixed sleep).
///
/// # Panics
/// `f` still answers `None` after `limit`.
pub async fn eventually<T, F, Fut>(what: &str, limit: std::time::Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let start = std::time::Instant::now();
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            start.elapsed() < limit,
            "timed out after {limit:?} waiting for: {what}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

/// A Kafka topic read from its beginning in a fresh consumer group, for tests that check what reached it.
pub struct TopicReader {
    consumer: rdkafka::consumer::BaseConsumer,
}

impl std::fmt::Debug for TopicReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TopicReader")
    }
}

impl TopicReader {
    /// Subscribes to `topic` on `brokers`.
    ///
    /// # Panics
    /// The consumer cannot be configured.
    pub fn new(brokers: &str, topic: &str) -> Self {
        use rdkafka::consumer::Consumer;
        let consumer: rdkafka::consumer::BaseConsumer = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", brokers)
            .set("group.id", unique("test"))
            .set("auto.offset.reset", "earliest")
            .set("enable.auto.commit", "false")
            .set("topic.metadata.refresh.interval.ms", "500")
            .create()
            .expect("consumer");
        consumer.subscribe(&[topic]).expect("subscribe");
        Self { consumer }
    }

    /// Reads until a message's payload, parsed as JSON, satisfies `pred` (at most `limit`); returns it and the
    /// reader, positioned after it.
    ///
    /// # Panics
    /// No such message within `limit`.
    pub async fn until(
        self,
        limit: std::time::Duration,
        pred: impl Fn(&serde_json::Value) -> bool + Send + 'static,
    ) -> (serde_json::Value, Self) {
        tokio::task::spawn_blocking(move || {
            use rdkafka::Message;
            let start = std::time::Instant::now();
            while start.elapsed() < limit {
                if let Some(Ok(m)) = self.consumer.poll(std::time::Duration::from_millis(200))
                    && let Some(p) = m.payload()
                    && let Ok(v) = serde_json::from_slice::<serde_json::Value>(p)
                    && pred(&v)
                {
                    drop(m);
                    return (v, self);
                }
            }
            panic!("no matching message on the topic within {limit:?}");
        })
        .await
        .expect("consumer task")
    }
    /// Reads until a message (key, payload and headers) satisfies `pred` (at most `limit`); returns it and the
    /// reader, positioned after it.
    ///
    /// # Panics
    /// No such message within `limit`.
    pub async fn record_until(
        self,
        limit: std::time::Duration,
        pred: impl Fn(&Record) -> bool + Send + 'static,
    ) -> (Record, Self) {
        let start = std::time::Instant::now();
        let mut reader = self;
        loop {
            let left = limit.saturating_sub(start.elapsed());
            assert!(
                !left.is_zero(),
                "no matching message on the topic within {limit:?}"
            );
            let (mut got, r) = reader.records(1, left).await;
            reader = r;
            let record = got.remove(0);
            if pred(&record) {
                return (record, reader);
            }
        }
    }

    /// Reads the next `n` messages (at most `limit` in all) with their keys and headers; returns them and the
    /// reader, positioned after them.
    ///
    /// # Panics
    /// Fewer than `n` messages within `limit`.
    pub async fn records(self, n: usize, limit: std::time::Duration) -> (Vec<Record>, Self) {
        tokio::task::spawn_blocking(move || {
            use rdkafka::message::{Headers, Message};
            let start = std::time::Instant::now();
            let mut out = Vec::new();
            while out.len() < n {
                assert!(
                    start.elapsed() < limit,
                    "{} of {n} messages on the topic within {limit:?}: {out:?}",
                    out.len()
                );
                if let Some(Ok(m)) = self.consumer.poll(std::time::Duration::from_millis(200)) {
                    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
                    out.push(Record {
                        key: m.key().map(text),
                        payload: m.payload().unwrap_or_default().to_vec(),
                        headers: m
                            .headers()
                            .map(|h| {
                                h.iter()
                                    .map(|h| {
                                        (h.key.to_owned(), h.value.map(text).unwrap_or_default())
                                    })
                                    .collect()
                            })
                            .unwrap_or_default(),
                    });
                }
            }
            (out, self)
        })
        .await
        .expect("consumer task")
    }
}

/// The shape of a Kafka topic: how many partitions it has and its `retention.ms`.
///
/// # Panics
/// Kafka does not answer within 10 s, or the topic is missing.
pub fn topic_shape(brokers: &str, topic: &str) -> (usize, String) {
    use rdkafka::{
        admin::{AdminClient, AdminOptions, ResourceSpecifier},
        client::DefaultClientContext,
        consumer::{BaseConsumer, Consumer},
    };
    let timeout = std::time::Duration::from_secs(10);
    let consumer: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .expect("consumer");
    let metadata = consumer
        .fetch_metadata(Some(topic), timeout)
        .expect("topic metadata");
    let partitions = metadata
        .topics()
        .first()
        .map_or(0, |t| t.partitions().len());
    let admin: AdminClient<DefaultClientContext> = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .expect("admin");
    let configs = futures::executor::block_on(admin.describe_configs(
        [&ResourceSpecifier::Topic(topic)],
        &AdminOptions::new().request_timeout(Some(timeout)),
    ))
    .expect("describe configs");
    let retention = configs
        .into_iter()
        .flatten()
        .flat_map(|r| r.entries)
        .find(|e| e.name == "retention.ms")
        .and_then(|e| e.value)
        .unwrap_or_default();
    (partitions, retention)
}

/// A Kafka message as [`TopicReader::records`] read it.
#[derive(Clone, Debug)]
pub struct Record {
    /// Its key, as text.
    pub key: Option<String>,
    /// Its payload.
    pub payload: Vec<u8>,
    /// Its headers, in order, values as text.
    pub headers: Vec<(String, String)>,
}

impl Record {
    /// The value of header `name`, if present.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// A service process of a test, on the real Consul and Kafka; SIGKILLed on drop.
#[derive(Debug)]
pub struct ServiceProcess {
    child: std::process::Child,
    /// Where its stdout and stderr go.
    pub log: std::path::PathBuf,
}

impl ServiceProcess {
    /// Starts binary `binary` registered in Consul as `name`, in a clean environment (PATH kept) with the
    /// Consul, Kafka and StatsD addresses of the real servers, fast checks and discovery, plus `env`.
    ///
    /// # Panics
    /// The binary is missing or does not start.
    pub fn spawn(binary_name: &str, name: &str, env: &[(&str, String)]) -> Self {
        let log = std::env::temp_dir().join(format!(
            "keel-test-{name}-{}.log",
            uuid::Uuid::new_v4().simple()
        ));
        let file = std::fs::File::create(&log).expect("log file");
        let mut cmd = std::process::Command::new(binary(binary_name));
        cmd.env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("CONSUL_HTTP_ADDR", infra_var("CONSUL_HTTP_ADDR"))
            .env("KEEL_CONSUL__DNS_ADDR", infra_var("KEEL_CONSUL_DNS_ADDR"))
            .env("KEEL_CONSUL__CHECK_INTERVAL", "500ms")
            .env("KEEL_CONSUL__DISCOVERY_INTERVAL", "500ms")
            .env("KEEL_KAFKA__BROKERS", infra_var("KEEL_KAFKA_BROKERS"))
            .env("KEEL_SERVICE__NAME", name)
            .stdin(std::process::Stdio::null())
            .stdout(file.try_clone().expect("log file"))
            .stderr(file);
        for (k, v) in env {
            cmd.env(k, v);
        }
        Self {
            child: cmd.spawn().expect("start the service"),
            log,
        }
    }

    /// Starts binary `binary_name` in a clean environment (only PATH and HOME kept, `RUST_LOG=info`) with just
    /// `env`: for tests that set every address themselves (a server that is down, TLS, limits).
    ///
    /// # Panics
    /// The binary is missing or does not start.
    pub fn bare(binary_name: &str, env: &[(&str, String)]) -> Self {
        let log = std::env::temp_dir().join(format!(
            "keel-test-{binary_name}-{}.log",
            uuid::Uuid::new_v4().simple()
        ));
        let file = std::fs::File::create(&log).expect("log file");
        let mut cmd = std::process::Command::new(binary(binary_name));
        cmd.env_clear();
        for k in ["PATH", "HOME"] {
            if let Ok(v) = std::env::var(k) {
                cmd.env(k, v);
            }
        }
        // As the default of `log.level` (below the file and Consul KV), so a test can change it through either.
        cmd.env("RUST_LOG", "info")
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .stdin(std::process::Stdio::null())
            .stdout(file.try_clone().expect("log file"))
            .stderr(file);
        Self {
            child: cmd.spawn().expect("start the service"),
            log,
        }
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The JSON log lines it printed so far.
    pub fn lines(&self) -> Vec<serde_json::Value> {
        self.output()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// The address its server logged it listens on (waits up to 20 s).
    ///
    /// # Panics
    /// It does not log one in time.
    pub async fn addr(&self) -> std::net::SocketAddr {
        eventually(
            "the service logs its listening address",
            std::time::Duration::from_secs(20),
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

    /// Sends signal `sig` (`TERM`, `KILL`, `STOP`, …) with `kill(1)`.
    ///
    /// # Panics
    /// `kill` fails.
    pub fn signal(&self, sig: &str) {
        let ok = std::process::Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.pid().to_string())
            .status()
            .expect("kill")
            .success();
        assert!(ok, "kill -{sig} {}", self.pid());
    }

    /// Its exit status, waiting at most `limit`.
    ///
    /// # Panics
    /// It still runs after `limit` (the message shows its output).
    pub async fn wait_exit(&mut self, limit: std::time::Duration) -> std::process::ExitStatus {
        match self.wait(limit).await {
            Some(status) => status,
            None => panic!(
                "the service did not exit within {limit:?}; output:\n{}",
                self.output()
            ),
        }
    }

    /// What it printed so far.
    pub fn output(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Its exit status once it exits, waiting at most `within`; `None` while it still runs.
    ///
    /// # Panics
    /// The status cannot be read.
    pub async fn wait(&mut self, within: std::time::Duration) -> Option<std::process::ExitStatus> {
        let deadline = std::time::Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().expect("child status") {
                return Some(status);
            }
            if std::time::Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }

    /// SIGKILL, and wait for it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for ServiceProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The ports of the passing instances of Consul service `name`, once there are `n` of them (at most `within`).
///
/// # Panics
/// Fewer than `n` pass in time.
pub async fn passing_ports(name: &str, n: usize, within: std::time::Duration) -> Vec<u16> {
    let url = format!(
        "http://{}/v1/health/service/{name}?passing",
        infra_var("CONSUL_HTTP_ADDR")
    );
    let deadline = std::time::Instant::now() + within;
    loop {
        if let Ok(resp) = reqwest::get(&url).await
            && let Ok(v) = resp.json::<serde_json::Value>().await
        {
            let ports: Vec<u16> = v
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|e| e["Service"]["Port"].as_u64().map(|p| p as u16))
                .collect();
            if ports.len() == n {
                return ports;
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{name}: {n} passing instances not seen within {within:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}
