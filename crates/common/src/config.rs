//! Typed, layered configuration: built-in defaults, then an optional TOML file, then the environment.
//!
//! Environment keys are `KEEL_<SECTION>__<KEY>` (double underscore between section and key, e.g.
//! `KEEL_GRPC__LISTEN_ADDR=0.0.0.0:50101`), plus the ecosystem's own names where they exist:
//! `CONSUL_HTTP_ADDR` and `CONSUL_HTTP_TOKEN` (as the `consul` CLI reads them). The file is named by
//! `KEEL_CONFIG_FILE`. Durations are humantime strings (`250ms`, `5s`, `1m`).
//!
//! Every bad value is reported at once, each with its key ([`ConfigErrors`]), before anything is bound.
//! The environment is read in exactly one place ([`Env::from_process`]); tests pass an [`Env`] map instead of
//! calling `set_var`.

use std::{collections::HashMap, fmt, net::SocketAddr, time::Duration};

use config::{Config, Environment, File, FileFormat};
use serde::de::DeserializeOwned;

/// A snapshot of environment variables: the only way configuration sees the environment.
#[derive(Clone, Debug, Default)]
pub struct Env(HashMap<String, String>);

impl Env {
    /// The current process environment.
    pub fn from_process() -> Self {
        Self(std::env::vars().collect())
    }

    /// An environment made of the given pairs (for tests and embedding).
    pub fn from_pairs<K: Into<String>, V: Into<String>>(
        pairs: impl IntoIterator<Item = (K, V)>,
    ) -> Self {
        Self(
            pairs
                .into_iter()
                .map(|(k, v)| (k.into(), v.into()))
                .collect(),
        )
    }

    /// Sets one variable, returning the environment (builder style).
    pub fn with(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.0.insert(key.into(), value.into());
        self
    }

    /// Looks one variable up.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(String::as_str)
    }
}

/// A secret that never shows in `Debug` or logs.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// The secret value, for the one place that sends it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.0.is_empty() {
            "\"\""
        } else {
            "\"<redacted>\""
        })
    }
}

/// Which service this process is, and how it names itself to Consul, StatsD and Kafka.
#[derive(Clone, Debug)]
pub struct ServiceSettings {
    /// Consul service name, StatsD path segment and log topic suffix (`service.name`), e.g. `user-management`.
    pub name: String,
    /// Consul service ID, unique per instance (`service.instance_id`); default `<name>-<host>-<port>-<random>`.
    pub instance_id: Option<String>,
    /// Version reported in Consul service meta (`service.version`).
    pub version: String,
    /// Extra Consul tags (`service.tags`, comma separated in the environment).
    pub tags: Vec<String>,
}

/// The gRPC server: address, HTTP/2 and resource limits, shutdown.
#[derive(Clone, Debug)]
pub struct GrpcSettings {
    /// Address to bind (`grpc.listen_addr`), default `127.0.0.1:0` (any free port).
    pub listen_addr: SocketAddr,
    /// Address announced to Consul (`grpc.advertise_addr`); default: the bound address, with `127.0.0.1` for an
    /// unspecified IP.
    pub advertise_addr: Option<String>,
    /// Requests handled at once by this instance (`grpc.max_concurrent_requests`); more are rejected with
    /// RESOURCE_EXHAUSTED before any handler runs.
    pub max_concurrent_requests: usize,
    /// HTTP/2 streams per connection (`grpc.max_concurrent_streams`).
    pub max_concurrent_streams: u32,
    /// Largest decoded request message in bytes (`grpc.max_request_bytes`); larger is refused with OUT_OF_RANGE (tonic's code).
    pub max_request_bytes: usize,
    /// Largest encoded response message in bytes (`grpc.max_response_bytes`).
    pub max_response_bytes: usize,
    /// Connections are closed (GOAWAY) after this age so clients rebalance after a scale-up
    /// (`grpc.max_connection_age`).
    pub max_connection_age: Duration,
    /// HTTP/2 PING interval (`grpc.keepalive_interval`).
    pub keepalive_interval: Duration,
    /// HTTP/2 PING ack timeout (`grpc.keepalive_timeout`).
    pub keepalive_timeout: Duration,
    /// Longest a request may run when the caller sent no deadline (`grpc.request_timeout`).
    pub request_timeout: Duration,
    /// Hard limit on draining in-flight calls at shutdown (`grpc.drain_timeout`).
    pub drain_timeout: Duration,
}

/// Consul: agent registration and DNS discovery.
#[derive(Clone, Debug)]
pub struct ConsulSettings {
    /// Agent HTTP address (`CONSUL_HTTP_ADDR` or `consul.http_addr`), `host:port` or a URL. Unset: no
    /// registration.
    pub http_addr: Option<String>,
    /// ACL token (`CONSUL_HTTP_TOKEN` or `consul.token`), sent as `X-Consul-Token`.
    pub token: Secret,
    /// Consul DNS server (`consul.dns_addr`, `host:port`, resolved at start), default `127.0.0.1:8600`.
    pub dns_addr: SocketAddr,
    /// Use Consul DNS to find peers (`consul.dns_enabled`); default: on when `http_addr` is set.
    pub dns_enabled: bool,
    /// How Consul learns this instance's health (`consul.check`: `grpc`, `ttl`, or `auto`, the default: `ttl`
    /// when `tls.require_client_cert` is set, since Consul's agent cannot present a client certificate, else
    /// `grpc`).
    pub check: CheckKind,
    /// Interval of the `GRPC` health check, or of the instance's TTL heartbeats (`consul.check_interval`).
    pub check_interval: Duration,
    /// Consecutive failed `GRPC` checks before Consul marks the instance critical
    /// (`consul.failures_before_critical`, default 3): a busy instance answering one check late stays in DNS;
    /// a dead one leaves after about this many intervals.
    pub failures_before_critical: u32,
    /// Consul removes an instance whose check stays critical this long (`consul.deregister_critical_after`).
    pub deregister_critical_after: Duration,
    /// How often clients re-resolve peers; also how long shutdown waits after deregistering
    /// (`consul.discovery_interval`).
    pub discovery_interval: Duration,
}

/// The kind of Consul health check an instance registers with
/// (<https://developer.hashicorp.com/consul/docs/services/usage/checks>).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CheckKind {
    /// Consul's agent calls the instance's `grpc.health.v1` every `check_interval`.
    Grpc,
    /// The instance reports its own health status to the agent every `check_interval`
    /// (`PUT /v1/agent/check/update/:check_id`); Consul marks it critical when no report came for
    /// [`ConsulSettings::ttl`] (a killed instance drops out after at most that).
    Ttl,
}

impl ConsulSettings {
    /// The TTL of a [`CheckKind::Ttl`] check: three heartbeat intervals, so one lost heartbeat is no outage.
    pub fn ttl(&self) -> Duration {
        self.check_interval * 3
    }
}

/// StatsD metrics.
#[derive(Clone, Debug)]
pub struct StatsdSettings {
    /// StatsD daemon address (`statsd.addr`), `host:port` (UDP). Unset: metrics are counted but not sent.
    pub addr: Option<String>,
    /// First segment of every metric name (`statsd.prefix`), default `keel`.
    pub prefix: String,
    /// Metrics queued for the sender thread before new ones are dropped (`statsd.queue_capacity`).
    pub queue_capacity: usize,
}

/// Logs: JSON lines on stdout and shipped to Kafka.
#[derive(Clone, Debug)]
pub struct LogSettings {
    /// `tracing` filter directives (`log.level`, or `RUST_LOG`), default `info`.
    pub level: String,
    /// Write JSON lines to stdout (`log.stdout`), default true.
    pub stdout: bool,
    /// Kafka bootstrap servers (`kafka.brokers`, comma separated). Unset: logs are not shipped.
    pub kafka_brokers: Option<String>,
    /// Log topic (`log.topic`), default `logs.<service>`.
    pub topic: Option<String>,
    /// Lines buffered for the Kafka shipper before new ones are dropped (`log.buffer_lines`).
    pub buffer_lines: usize,
    /// A line Kafka has not acknowledged within this time is dropped and counted (`log.delivery_timeout`).
    pub delivery_timeout: Duration,
}

/// Outgoing calls: deadlines, retries, balancing.
#[derive(Clone, Debug)]
pub struct ClientSettings {
    /// Deadline of an outgoing call when neither the caller nor the incoming request set one
    /// (`client.default_timeout`).
    pub default_timeout: Duration,
    /// TCP connect timeout per endpoint (`client.connect_timeout`).
    pub connect_timeout: Duration,
    /// Attempts per idempotent call, first included (`client.max_attempts`).
    pub max_attempts: u32,
    /// Static endpoints by service, used when Consul DNS is off: `client.static_endpoints`, e.g.
    /// `echo=127.0.0.1:5000|127.0.0.1:5001,accounts=127.0.0.1:6000`.
    pub static_endpoints: HashMap<String, Vec<SocketAddr>>,
}

/// The service's own database.
#[derive(Clone, Debug)]
pub struct DatabaseSettings {
    /// sqlx URL (`database.url`): `postgres://user:pass@host:port/db` in deployment, or
    /// `sqlite://path/file.db?mode=rwc`; `{service}` in it is replaced by the service's name, so one setting
    /// can give every service its own database. Default: `sqlite://<database.dir>/{service}.db?mode=rwc`,
    /// the embedded default.
    pub url: Option<Secret>,
    /// Directory of the default SQLite files (`database.dir`), default `var`.
    pub dir: String,
    /// Connections in the pool (`database.max_connections`), default 8.
    pub max_connections: u32,
    /// Longest wait for a pooled connection before the call fails UNAVAILABLE (`database.acquire_timeout`).
    pub acquire_timeout: Duration,
}

/// Domain events: Kafka when `kafka.brokers` is set, otherwise an in-process bus.
#[derive(Clone, Debug)]
pub struct EventSettings {
    /// Kafka bootstrap servers for events (`events.brokers`), default `kafka.brokers`. Unset: in-process bus.
    pub brokers: Option<String>,
    /// Namespace of this process's consumer groups (`events.group_prefix`), default none. A consumer's group is
    /// `<prefix>.<consumer>` (or just `<consumer>`, e.g. `search`), so every instance of a service shares the
    /// partitions, and a test or a second environment on the same brokers can keep its own offsets.
    pub group_prefix: Option<String>,
    /// Longest wait for Kafka to acknowledge one event before the outbox retries it (`events.delivery_timeout`).
    pub delivery_timeout: Duration,
}

/// TLS (rustls) for the server and for outgoing calls; PEM files, read at start.
#[derive(Clone, Debug, Default)]
pub struct TlsSettings {
    /// This process's certificate chain (`tls.cert_file`). With `tls.key_file`, the server speaks TLS only, and
    /// outgoing calls present it as a client certificate (mutual TLS).
    pub cert_file: Option<String>,
    /// Its private key (`tls.key_file`).
    pub key_file: Option<String>,
    /// CA certificates (`tls.ca_file`): set, outgoing calls use TLS and verify servers against them, and the
    /// server can require client certificates signed by them.
    pub ca_file: Option<String>,
    /// The server refuses clients without a certificate signed by `tls.ca_file` (`tls.require_client_cert`).
    pub require_client_cert: bool,
    /// Name expected in servers' certificates (`tls.server_name`), default `localhost`: instances are dialled by
    /// IP address, so every instance's certificate carries one shared service name.
    pub server_name: String,
}

impl TlsSettings {
    /// Whether the server speaks TLS.
    pub fn server_enabled(&self) -> bool {
        self.cert_file.is_some() && self.key_file.is_some()
    }

    /// Whether outgoing calls use TLS.
    pub fn client_enabled(&self) -> bool {
        self.ca_file.is_some()
    }
}

/// Everything a service process is configured with.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Identity.
    pub service: ServiceSettings,
    /// Server.
    pub grpc: GrpcSettings,
    /// Consul.
    pub consul: ConsulSettings,
    /// Metrics.
    pub statsd: StatsdSettings,
    /// Logs.
    pub log: LogSettings,
    /// Outgoing calls.
    pub client: ClientSettings,
    /// Database.
    pub database: DatabaseSettings,
    /// Domain events.
    pub events: EventSettings,
    /// TLS.
    pub tls: TlsSettings,
    /// Every layered value, for the service's own section ([`Settings::section`]).
    raw: Raw,
}

/// The layered configuration, kept for service-specific sections; never printed (it may hold secrets).
#[derive(Clone)]
struct Raw(Config);

impl fmt::Debug for Raw {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<layered configuration>")
    }
}

/// One bad configuration value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// Dotted key, e.g. `grpc.listen_addr`.
    pub key: String,
    /// What is wrong with it.
    pub message: String,
}

/// All bad values found, reported together.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} invalid configuration value(s):", self.0.len())?;
        for e in &self.0 {
            write!(f, "\n  {}: {}", e.key, e.message)?;
        }
        Ok(())
    }
}

/// Reads typed values out of the layered [`Config`], collecting every error instead of stopping at the first.
struct Reader {
    cfg: Config,
    errors: Vec<ConfigError>,
}

impl Reader {
    fn fail(&mut self, key: &str, message: impl Into<String>) {
        self.errors.push(ConfigError {
            key: key.to_owned(),
            message: message.into(),
        });
    }

    fn get<T: DeserializeOwned>(&mut self, key: &str, default: T) -> T {
        match self.cfg.get::<T>(key) {
            Ok(v) => v,
            Err(config::ConfigError::NotFound(_)) => default,
            Err(e) => {
                let msg = e.to_string();
                self.fail(key, msg);
                default
            }
        }
    }

    fn opt_string(&mut self, key: &str) -> Option<String> {
        let v: Option<String> = self.get(key, None);
        v.filter(|s| !s.trim().is_empty())
    }

    fn parsed<T: std::str::FromStr>(&mut self, key: &str, default: T) -> T
    where
        T::Err: fmt::Display,
    {
        match self.opt_string(key) {
            None => default,
            Some(s) => match s.trim().parse() {
                Ok(v) => v,
                Err(e) => {
                    self.fail(key, format!("{s:?}: {e}"));
                    default
                }
            },
        }
    }

    /// A `host:port`, resolved once at start (a hostname such as `consul:8600` is fine).
    fn socket_addr(&mut self, key: &str, default: SocketAddr) -> SocketAddr {
        use std::net::ToSocketAddrs;
        match self.opt_string(key) {
            None => default,
            Some(s) => match s.trim().to_socket_addrs().map(|mut a| a.next()) {
                Ok(Some(addr)) => addr,
                Ok(None) => {
                    self.fail(key, format!("{s:?} resolves to no address"));
                    default
                }
                Err(e) => {
                    self.fail(key, format!("{s:?} is not a resolvable host:port: {e}"));
                    default
                }
            },
        }
    }

    fn duration(&mut self, key: &str, default: Duration) -> Duration {
        match self.opt_string(key) {
            None => default,
            Some(s) => match humantime::parse_duration(s.trim()) {
                Ok(d) => d,
                Err(e) => {
                    self.fail(
                        key,
                        format!("{s:?} is not a duration like 250ms, 5s or 1m: {e}"),
                    );
                    default
                }
            },
        }
    }

    fn positive<T: PartialOrd + Default + Copy + std::str::FromStr>(
        &mut self,
        key: &str,
        default: T,
    ) -> T
    where
        T::Err: fmt::Display,
    {
        let v = self.parsed(key, default);
        if v <= T::default() {
            self.fail(key, "must be greater than zero");
        }
        v
    }

    fn list(&mut self, key: &str) -> Vec<String> {
        self.opt_string(key)
            .map(|s| {
                s.split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(str::to_owned)
                    .collect()
            })
            .unwrap_or_default()
    }
}

impl Settings {
    /// A service's own configuration section (`[cache]` in the file, `KEEL_CACHE__MAX_BYTES` in the environment),
    /// layered like the platform's; `T::default()` when the section is absent (use `#[serde(default)]`).
    ///
    /// # Errors
    /// A value of the section does not fit `T`, reported under the section's key.
    pub fn section<T: DeserializeOwned + Default>(&self, name: &str) -> Result<T, ConfigErrors> {
        match self.raw.0.get::<T>(name) {
            Ok(v) => Ok(v),
            Err(config::ConfigError::NotFound(_)) => Ok(T::default()),
            Err(e) => Err(ConfigErrors(vec![ConfigError {
                key: name.to_owned(),
                message: e.to_string(),
            }])),
        }
    }

    /// The Kafka consumer group of `consumer` in this process: `<events.group_prefix>.<consumer>`, or
    /// `consumer` when no prefix is set.
    pub fn consumer_group(&self, consumer: &str) -> String {
        match &self.events.group_prefix {
            Some(prefix) => format!("{prefix}.{consumer}"),
            None => consumer.to_owned(),
        }
    }

    /// Loads the settings of service `name` from the process environment (and `KEEL_CONFIG_FILE`).
    ///
    /// # Errors
    /// Every bad value, each with its key.
    pub fn load(name: &str) -> Result<Self, ConfigErrors> {
        Self::from_env(name, &Env::from_process())
    }

    /// Loads the settings of service `name`: defaults, then the TOML file named by `KEEL_CONFIG_FILE`, then
    /// `KEEL_*` variables, then `CONSUL_HTTP_ADDR` / `CONSUL_HTTP_TOKEN`.
    ///
    /// # Errors
    /// Every bad value, each with its key; an unreadable file is reported under `KEEL_CONFIG_FILE`.
    pub fn from_env(name: &str, env: &Env) -> Result<Self, ConfigErrors> {
        let mut builder = Config::builder();
        if let Some(path) = env.get("KEEL_CONFIG_FILE") {
            builder = builder.add_source(File::new(path, FileFormat::Toml).required(true));
        }
        let keel_vars: HashMap<String, String> = env
            .0
            .iter()
            .filter(|(k, _)| k.starts_with("KEEL_") && *k != "KEEL_CONFIG_FILE")
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        builder = builder.add_source(
            Environment::with_prefix("KEEL")
                .prefix_separator("_")
                .separator("__")
                .source(Some(keel_vars)),
        );
        for (var, key) in [
            ("CONSUL_HTTP_ADDR", "consul.http_addr"),
            ("CONSUL_HTTP_TOKEN", "consul.token"),
        ] {
            if let Some(v) = env.get(var) {
                builder = builder.set_override(key, v).expect("static key");
            }
        }
        if let Some(v) = env.get("RUST_LOG") {
            builder = builder.set_default("log.level", v).expect("static key");
        }
        let cfg = builder.build().map_err(|e| {
            ConfigErrors(vec![ConfigError {
                key: "KEEL_CONFIG_FILE".into(),
                message: e.to_string(),
            }])
        })?;
        let raw = Raw(cfg.clone());
        let mut r = Reader {
            cfg,
            errors: Vec::new(),
        };

        let service_name: String = r.get("service.name", name.to_owned());
        if service_name.is_empty()
            || !service_name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-')
        {
            r.fail(
                "service.name",
                format!("{service_name:?}: use letters, digits and '-' (a DNS label)"),
            );
        }
        let service = ServiceSettings {
            name: service_name.clone(),
            instance_id: r.opt_string("service.instance_id"),
            version: r.get("service.version", env!("CARGO_PKG_VERSION").to_owned()),
            tags: r.list("service.tags"),
        };

        let grpc = GrpcSettings {
            listen_addr: r.parsed("grpc.listen_addr", SocketAddr::from(([127, 0, 0, 1], 0))),
            advertise_addr: r.opt_string("grpc.advertise_addr"),
            max_concurrent_requests: r.positive("grpc.max_concurrent_requests", 1024usize),
            max_concurrent_streams: r.positive("grpc.max_concurrent_streams", 256u32),
            max_request_bytes: r.positive("grpc.max_request_bytes", 4 * 1024 * 1024usize),
            max_response_bytes: r.positive("grpc.max_response_bytes", 16 * 1024 * 1024usize),
            max_connection_age: r.duration("grpc.max_connection_age", Duration::from_secs(300)),
            keepalive_interval: r.duration("grpc.keepalive_interval", Duration::from_secs(30)),
            keepalive_timeout: r.duration("grpc.keepalive_timeout", Duration::from_secs(10)),
            request_timeout: r.duration("grpc.request_timeout", Duration::from_secs(30)),
            drain_timeout: r.duration("grpc.drain_timeout", Duration::from_secs(10)),
        };

        let http_addr = r.opt_string("consul.http_addr");
        let check = r.opt_string("consul.check");
        let mut consul = ConsulSettings {
            dns_enabled: r.get("consul.dns_enabled", http_addr.is_some()),
            http_addr,
            token: Secret(r.opt_string("consul.token").unwrap_or_default()),
            dns_addr: r.socket_addr("consul.dns_addr", SocketAddr::from(([127, 0, 0, 1], 8600))),
            // Resolved below, once the TLS settings are known.
            check: CheckKind::Grpc,
            check_interval: r.duration("consul.check_interval", Duration::from_secs(2)),
            failures_before_critical: r.positive("consul.failures_before_critical", 3u32),
            deregister_critical_after: r
                .duration("consul.deregister_critical_after", Duration::from_secs(60)),
            discovery_interval: r.duration("consul.discovery_interval", Duration::from_secs(2)),
        };

        let statsd = StatsdSettings {
            addr: r.opt_string("statsd.addr"),
            prefix: r.get("statsd.prefix", "keel".to_owned()),
            queue_capacity: r.positive("statsd.queue_capacity", 10_000usize),
        };

        let log = LogSettings {
            level: r.get("log.level", "info".to_owned()),
            stdout: r.get("log.stdout", true),
            kafka_brokers: r.opt_string("kafka.brokers"),
            topic: r.opt_string("log.topic"),
            buffer_lines: r.positive("log.buffer_lines", 10_000usize),
            delivery_timeout: r.duration("log.delivery_timeout", Duration::from_secs(5)),
        };
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&log.level) {
            r.fail("log.level", format!("{:?}: {e}", log.level));
        }

        let static_raw = r.opt_string("client.static_endpoints").unwrap_or_default();
        let mut static_endpoints = HashMap::new();
        for entry in static_raw
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
        {
            match parse_static_entry(entry) {
                Ok((svc, addrs)) => {
                    static_endpoints.insert(svc, addrs);
                }
                Err(msg) => r.fail("client.static_endpoints", msg),
            }
        }
        let client = ClientSettings {
            default_timeout: r.duration("client.default_timeout", Duration::from_secs(10)),
            connect_timeout: r.duration("client.connect_timeout", Duration::from_secs(1)),
            max_attempts: r.positive("client.max_attempts", 3u32),
            static_endpoints,
        };

        let database = DatabaseSettings {
            url: r.opt_string("database.url").map(Secret),
            dir: r.get("database.dir", "var".to_owned()),
            max_connections: r.positive("database.max_connections", 8u32),
            acquire_timeout: r.duration("database.acquire_timeout", Duration::from_secs(3)),
        };
        let events = EventSettings {
            brokers: r
                .opt_string("events.brokers")
                .or_else(|| log.kafka_brokers.clone()),
            group_prefix: r.opt_string("events.group_prefix"),
            delivery_timeout: r.duration("events.delivery_timeout", Duration::from_secs(5)),
        };

        let tls = TlsSettings {
            cert_file: r.opt_string("tls.cert_file"),
            key_file: r.opt_string("tls.key_file"),
            ca_file: r.opt_string("tls.ca_file"),
            require_client_cert: r.get("tls.require_client_cert", false),
            server_name: r.get("tls.server_name", "localhost".to_owned()),
        };
        if tls.cert_file.is_some() != tls.key_file.is_some() {
            r.fail("tls.key_file", "tls.cert_file and tls.key_file go together");
        }
        if tls.require_client_cert && (tls.ca_file.is_none() || !tls.server_enabled()) {
            r.fail(
                "tls.require_client_cert",
                "needs tls.cert_file, tls.key_file and tls.ca_file (the CA client certificates are checked against)",
            );
        }
        for (key, file) in [
            ("tls.cert_file", &tls.cert_file),
            ("tls.key_file", &tls.key_file),
            ("tls.ca_file", &tls.ca_file),
        ] {
            if let Some(f) = file
                && !std::path::Path::new(f).is_file()
            {
                r.fail(key, format!("{f:?} is not a readable file"));
            }
        }
        consul.check = match check.as_deref().map(str::to_ascii_lowercase).as_deref() {
            None | Some("auto") if tls.require_client_cert => CheckKind::Ttl,
            None | Some("auto") | Some("grpc") => CheckKind::Grpc,
            Some("ttl") => CheckKind::Ttl,
            Some(other) => {
                r.fail(
                    "consul.check",
                    format!("{other:?}: expected grpc, ttl or auto"),
                );
                CheckKind::Grpc
            }
        };
        if consul.check == CheckKind::Grpc && tls.require_client_cert {
            r.fail(
                "consul.check",
                "grpc: Consul's agent cannot present a client certificate to a server with \
                 tls.require_client_cert; use ttl (or auto)",
            );
        }

        if r.errors.is_empty() {
            Ok(Settings {
                service,
                grpc,
                consul,
                statsd,
                log,
                client,
                database,
                events,
                tls,
                raw,
            })
        } else {
            Err(ConfigErrors(r.errors))
        }
    }

    /// The Kafka topic this service's logs go to: `log.topic`, or `logs.<service>`.
    pub fn log_topic(&self) -> String {
        self.log
            .topic
            .clone()
            .unwrap_or_else(|| format!("logs.{}", self.service.name))
    }

    /// This service's database URL (see [`DatabaseSettings::url`]).
    pub fn database_url(&self) -> String {
        self.database_url_of(&self.service.name)
    }

    /// The database URL of service `service` in this process (the all-in-one process hosts several, each with
    /// its own database).
    pub fn database_url_of(&self, service: &str) -> String {
        let pattern = match &self.database.url {
            Some(url) => url.expose().to_owned(),
            None => format!(
                "sqlite://{}/{{service}}.db?mode=rwc",
                self.database.dir.trim_end_matches('/')
            ),
        };
        pattern.replace("{service}", service)
    }

    /// [`Self::database_url`] with any password replaced by `***`, for logs.
    pub fn database_url_redacted(&self) -> String {
        redact_url(&self.database_url())
    }
}

/// `url` with the password of its user info replaced by `***`.
pub fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let creds = &url[scheme + 3..at];
            match creds.find(':') {
                Some(colon) => format!(
                    "{}{}:***{}",
                    &url[..scheme + 3],
                    &creds[..colon],
                    &url[at..]
                ),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}

impl Settings {
    /// The effective settings as `key=value` pairs, secrets redacted, for the start-up log line.
    pub fn effective(&self) -> Vec<(&'static str, String)> {
        vec![
            ("service.name", self.service.name.clone()),
            ("grpc.listen_addr", self.grpc.listen_addr.to_string()),
            (
                "grpc.max_concurrent_requests",
                self.grpc.max_concurrent_requests.to_string(),
            ),
            (
                "grpc.request_timeout",
                format!("{:?}", self.grpc.request_timeout),
            ),
            (
                "grpc.drain_timeout",
                format!("{:?}", self.grpc.drain_timeout),
            ),
            (
                "consul.http_addr",
                self.consul
                    .http_addr
                    .clone()
                    .unwrap_or_else(|| "(none)".into()),
            ),
            ("consul.token", format!("{:?}", self.consul.token)),
            ("consul.dns_addr", self.consul.dns_addr.to_string()),
            ("consul.dns_enabled", self.consul.dns_enabled.to_string()),
            (
                "statsd.addr",
                self.statsd.addr.clone().unwrap_or_else(|| "(none)".into()),
            ),
            ("statsd.prefix", self.statsd.prefix.clone()),
            (
                "kafka.brokers",
                self.log
                    .kafka_brokers
                    .clone()
                    .unwrap_or_else(|| "(none)".into()),
            ),
            ("log.topic", self.log_topic()),
            ("log.level", self.log.level.clone()),
            ("database.url", self.database_url_redacted()),
            (
                "events.brokers",
                self.events
                    .brokers
                    .clone()
                    .unwrap_or_else(|| "(none: in-process bus)".into()),
            ),
            (
                "events.group_prefix",
                self.events
                    .group_prefix
                    .clone()
                    .unwrap_or_else(|| "(none)".into()),
            ),
        ]
    }
}

fn parse_static_entry(entry: &str) -> Result<(String, Vec<SocketAddr>), String> {
    let (svc, addrs) = entry
        .split_once('=')
        .ok_or_else(|| format!("{entry:?}: expected service=host:port|host:port"))?;
    let addrs = addrs
        .split('|')
        .map(|a| {
            a.trim()
                .parse::<SocketAddr>()
                .map_err(|e| format!("{entry:?}: {a:?}: {e}"))
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok((svc.trim().to_owned(), addrs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_need_no_environment() {
        let s = Settings::from_env("echo", &Env::default()).unwrap();
        assert_eq!(s.service.name, "echo");
        assert_eq!(s.consul.http_addr, None);
        assert!(!s.consul.dns_enabled);
        assert_eq!(s.consul.dns_addr, "127.0.0.1:8600".parse().unwrap());
        assert_eq!(s.log_topic(), "logs.echo");
    }

    #[test]
    fn database_defaults_to_an_sqlite_file_per_service_and_events_follow_kafka() {
        let s = Settings::from_env("comments", &Env::default()).unwrap();
        assert_eq!(s.database_url(), "sqlite://var/comments.db?mode=rwc");
        assert_eq!(
            s.database_url_of("ratings"),
            "sqlite://var/ratings.db?mode=rwc"
        );
        assert_eq!(s.events.brokers, None);
        assert_eq!(s.events.group_prefix, None);
        let s = Settings::from_env(
            "comments",
            &Env::default()
                .with(
                    "KEEL_DATABASE__URL",
                    "postgres://kv:hunter2@127.0.0.1:15432/comments",
                )
                .with("KEEL_KAFKA__BROKERS", "127.0.0.1:19092"),
        )
        .unwrap();
        assert_eq!(
            s.database_url_redacted(),
            "postgres://kv:***@127.0.0.1:15432/comments"
        );
        assert!(!format!("{s:?}").contains("hunter2"));
        assert_eq!(s.events.brokers.as_deref(), Some("127.0.0.1:19092"));
    }

    #[test]
    fn service_sections_are_typed_and_layered() {
        #[derive(serde::Deserialize, Default, Debug, PartialEq)]
        #[serde(default)]
        struct Cache {
            max_bytes: u64,
            name: String,
        }
        let s = Settings::from_env(
            "cache",
            &Env::default().with("KEEL_CACHE__MAX_BYTES", "1048576"),
        )
        .unwrap();
        assert_eq!(
            s.section::<Cache>("cache").unwrap(),
            Cache {
                max_bytes: 1_048_576,
                name: String::new()
            }
        );
        assert_eq!(s.section::<Cache>("absent").unwrap(), Cache::default());
        let s = Settings::from_env(
            "cache",
            &Env::default().with("KEEL_CACHE__MAX_BYTES", "lots"),
        )
        .unwrap();
        assert_eq!(s.section::<Cache>("cache").unwrap_err().0[0].key, "cache");
        assert!(!format!("{s:?}").contains("lots"));
    }

    #[test]
    fn tls_settings_are_checked_together() {
        let err = Settings::from_env(
            "x",
            &Env::default()
                .with("KEEL_TLS__CERT_FILE", "/nonexistent.pem")
                .with("KEEL_TLS__REQUIRE_CLIENT_CERT", "true"),
        )
        .unwrap_err();
        let keys: Vec<&str> = err.0.iter().map(|e| e.key.as_str()).collect();
        assert!(
            keys.contains(&"tls.key_file") && keys.contains(&"tls.cert_file"),
            "{keys:?}"
        );
        assert!(keys.contains(&"tls.require_client_cert"), "{keys:?}");
        let s = Settings::from_env("x", &Env::default()).unwrap();
        assert!(!s.tls.server_enabled() && !s.tls.client_enabled());
    }

    #[test]
    fn consul_checks_by_ttl_when_clients_need_certificates() {
        // Only their existence is checked here.
        let file = concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml");
        let mtls = Env::default()
            .with("KEEL_TLS__CERT_FILE", file)
            .with("KEEL_TLS__KEY_FILE", file)
            .with("KEEL_TLS__CA_FILE", file)
            .with("KEEL_TLS__REQUIRE_CLIENT_CERT", "true");
        let s = Settings::from_env("x", &mtls).unwrap();
        assert_eq!(s.consul.check, CheckKind::Ttl);
        assert_eq!(s.consul.ttl(), s.consul.check_interval * 3);
        let err =
            Settings::from_env("x", &mtls.clone().with("KEEL_CONSUL__CHECK", "grpc")).unwrap_err();
        assert_eq!(err.0[0].key, "consul.check", "{err}");
        let plain = Settings::from_env("x", &Env::default()).unwrap();
        assert_eq!(plain.consul.check, CheckKind::Grpc);
        let ttl =
            Settings::from_env("x", &Env::default().with("KEEL_CONSUL__CHECK", "TTL")).unwrap();
        assert_eq!(ttl.consul.check, CheckKind::Ttl);
        let bad = Settings::from_env("x", &Env::default().with("KEEL_CONSUL__CHECK", "http"))
            .unwrap_err();
        assert_eq!(bad.0[0].key, "consul.check");
    }

    #[test]
    fn environment_overrides_and_standard_consul_names() {
        let env = Env::default()
            .with("KEEL_GRPC__LISTEN_ADDR", "0.0.0.0:50101")
            .with("KEEL_GRPC__DRAIN_TIMEOUT", "3s")
            .with("CONSUL_HTTP_ADDR", "127.0.0.1:18500")
            .with("CONSUL_HTTP_TOKEN", "s3cret")
            .with(
                "KEEL_CLIENT__STATIC_ENDPOINTS",
                "echo=127.0.0.1:1|127.0.0.1:2",
            );
        let s = Settings::from_env("echo", &env).unwrap();
        assert_eq!(s.grpc.listen_addr, "0.0.0.0:50101".parse().unwrap());
        assert_eq!(s.grpc.drain_timeout, Duration::from_secs(3));
        assert_eq!(s.consul.http_addr.as_deref(), Some("127.0.0.1:18500"));
        assert!(
            s.consul.dns_enabled,
            "DNS discovery defaults on with Consul"
        );
        assert_eq!(s.consul.token.expose(), "s3cret");
        assert!(
            !format!("{s:?}").contains("s3cret"),
            "token must not show in Debug"
        );
        assert_eq!(s.client.static_endpoints["echo"].len(), 2);
    }

    #[test]
    fn every_bad_value_is_reported_at_once_with_its_key() {
        let env = Env::default()
            .with("KEEL_GRPC__LISTEN_ADDR", "not-an-addr")
            .with("KEEL_GRPC__DRAIN_TIMEOUT", "soon")
            .with("KEEL_GRPC__MAX_CONCURRENT_REQUESTS", "0")
            .with("KEEL_LOG__LEVEL", "info,[[[")
            .with("KEEL_CLIENT__STATIC_ENDPOINTS", "echo");
        let errs = Settings::from_env("echo", &env).unwrap_err();
        let keys: Vec<&str> = errs.0.iter().map(|e| e.key.as_str()).collect();
        assert_eq!(
            keys,
            [
                "grpc.listen_addr",
                "grpc.max_concurrent_requests",
                "grpc.drain_timeout",
                "log.level",
                "client.static_endpoints"
            ]
        );
        let text = errs.to_string();
        assert!(text.contains("5 invalid"), "{text}");
        assert!(text.contains("\"soon\""), "{text}");
    }

    #[test]
    fn file_layer_sits_between_defaults_and_environment() {
        let dir = std::env::temp_dir().join(format!("keel-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("svc.toml");
        std::fs::write(
            &path,
            "[grpc]\nlisten_addr = \"127.0.0.1:7000\"\nrequest_timeout = \"7s\"\n",
        )
        .unwrap();
        let env = Env::default()
            .with("KEEL_CONFIG_FILE", path.to_string_lossy())
            .with("KEEL_GRPC__REQUEST_TIMEOUT", "9s");
        let s = Settings::from_env("echo", &env).unwrap();
        assert_eq!(s.grpc.listen_addr.port(), 7000, "file beats default");
        assert_eq!(
            s.grpc.request_timeout,
            Duration::from_secs(9),
            "environment beats file"
        );
        let missing = Settings::from_env(
            "echo",
            &Env::default().with("KEEL_CONFIG_FILE", "/nonexistent.toml"),
        );
        assert_eq!(missing.unwrap_err().0[0].key, "KEEL_CONFIG_FILE");
    }

    #[test]
    fn service_name_must_be_a_dns_label() {
        let errs = Settings::from_env("bad name", &Env::default()).unwrap_err();
        assert_eq!(errs.0[0].key, "service.name");
    }
}
