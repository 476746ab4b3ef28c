//! Typed, layered configuration: built-in defaults, then an optional TOML file, then Consul KV (`keel/_defaults/…`
//! for every service, then `keel/<service>/…`; [`KvSettings`], watched live by [`crate::live`]), then the
//! environment. [`Settings::source`] says which layer a value came from.
//!
//! Environment keys are `KEEL_<SECTION>__<KEY>` (double underscore between section and key, e.g.
//! `KEEL_GRPC__LISTEN_ADDR=0.0.0.0:50101`), plus the ecosystem's own names where they exist:
//! `CONSUL_HTTP_ADDR` and `CONSUL_HTTP_TOKEN` (as the `consul` CLI reads them). The file is named by
//! `KEEL_CONFIG_FILE`. Durations are humantime strings (`250ms`, `5s`, `1m`).
//!
//! Every bad value is reported at once, each with its key ([`ConfigErrors`]), before anything is bound.
//! The environment is read in exactly one place ([`Env::from_process`]); tests pass an [`Env`] map instead of
//! calling `set_var`.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    fmt,
    net::SocketAddr,
    sync::Arc,
    time::Duration,
};

pub use crate::{
    client::ClientSettings,
    consul::{CheckKind, ConsulSettings},
    db::DatabaseSettings,
    events::EventSettings,
    logs::LogSettings,
    metrics::StatsdSettings,
    server::GrpcSettings,
    tls::TlsSettings,
    tokens::TokenSettings,
};

use config::{Config, Environment, File, FileFormat, Source, Value, ValueKind};
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

impl Secret {
    /// A secret holding `value` (for tests and embedding).
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// Whether it is empty (not configured).
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// What logs and reports show of it: `<redacted>`, or nothing when unset.
    pub fn redacted(&self) -> &'static str {
        if self.0.is_empty() { "" } else { "<redacted>" }
    }
}

impl<'de> serde::Deserialize<'de> for Secret {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d).map(|s| Self(s.trim().to_owned()))
    }
}

/// Serialized redacted, so a service section holding one reports `<redacted>` among the effective settings.
impl serde::Serialize for Secret {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.redacted())
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.redacted())
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

impl ServiceSettings {
    /// Reads the `service` section; `name` is the process's own name, the default of `service.name`.
    pub fn read(r: &mut Reader, name: &str) -> Self {
        let name = r.string("service.name", name);
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
            r.fail(
                "service.name",
                format!("{name:?}: use letters, digits and '-' (a DNS label)"),
            );
        }
        Self {
            name,
            instance_id: r.opt_string("service.instance_id"),
            version: r.string("service.version", env!("CARGO_PKG_VERSION")),
            tags: r.list("service.tags"),
        }
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
    /// Tokens handed to clients (paging states).
    pub tokens: TokenSettings,
    /// Feature flags (`features.<name>`, booleans; unset: off), live from Consul KV: read them through
    /// [`crate::Platform::live`] with [`Settings::feature`].
    pub features: BTreeMap<String, bool>,
    /// Every layered value, for the service's own section ([`Settings::section`]).
    raw: Raw,
    /// What [`Settings::effective`] reports.
    effective: Vec<(String, String)>,
    /// Which keys each layer set, for [`Settings::source`].
    layers: Arc<Layers>,
}

/// Settings kept in Consul KV, as dotted keys: `keel/_defaults/<section>/<key>` for every service
/// (`defaults`), `keel/<service>/<section>/<key>` for one (`service`); `keel/echo/log/level` is `log.level`.
/// Layered between the file and the environment, service over defaults. `keel/<target>/service-config` is
/// not a setting but the target's client policy ([`crate::service_config`]), kept apart for every target.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KvSettings {
    /// From `keel/_defaults/`.
    pub defaults: BTreeMap<String, String>,
    /// From `keel/<service>/`.
    pub service: BTreeMap<String, String>,
    /// Every target's published service config (`keel/<target>/service-config`, JSON), by target.
    pub service_configs: BTreeMap<String, String>,
}

impl KvSettings {
    /// The KV prefix every setting lives under.
    pub const ROOT: &'static str = "keel/";
    /// The folder of settings shared by every service.
    pub const DEFAULTS: &'static str = "_defaults";

    /// The settings of `service` among the KV pairs under [`Self::ROOT`] (full keys, as Consul lists them).
    pub fn from_pairs(service: &str, pairs: impl IntoIterator<Item = (String, String)>) -> Self {
        let mut kv = Self::default();
        for (key, value) in pairs {
            let Some(rest) = key.strip_prefix(Self::ROOT) else {
                continue;
            };
            let Some((folder, path)) = rest.split_once('/') else {
                continue;
            };
            if path == "service-config" {
                kv.service_configs.insert(folder.to_owned(), value);
                continue;
            }
            if path.is_empty() || path.ends_with('/') {
                continue;
            }
            let dotted = path.replace('/', ".").to_ascii_lowercase();
            if NOT_FROM_KV.contains(&dotted.as_str()) {
                continue;
            }
            if folder == Self::DEFAULTS {
                kv.defaults.insert(dotted, value);
            } else if folder == service {
                kv.service.insert(dotted, value);
            }
        }
        kv
    }

    /// The Consul KV key of dotted setting `key` in `folder` (`_defaults` or a service's name).
    pub fn kv_key(folder: &str, key: &str) -> String {
        format!("{}{folder}/{}", Self::ROOT, key.replace('.', "/"))
    }

    /// The KV key `key` (dotted) comes from, service over defaults; `None` when KV does not set it.
    pub fn origin(&self, service: &str, key: &str) -> Option<String> {
        let under = |map: &BTreeMap<String, String>| {
            map.keys()
                .find(|k| {
                    *k == key
                        || k.starts_with(&format!("{key}."))
                        || key.starts_with(&format!("{k}."))
                })
                .cloned()
        };
        under(&self.service)
            .map(|k| Self::kv_key(service, &k))
            .or_else(|| under(&self.defaults).map(|k| Self::kv_key(Self::DEFAULTS, &k)))
    }

    /// With the values at or under `key` as they are in `previous` (dropped where `previous` has none).
    pub fn restore(&self, key: &str, previous: &Self) -> Self {
        let mut out = self.without(key);
        let under = |k: &String| k == key || k.starts_with(&format!("{key}."));
        out.defaults.extend(
            previous
                .defaults
                .iter()
                .filter(|(k, _)| under(k))
                .map(|(k, v)| (k.clone(), v.clone())),
        );
        out.service.extend(
            previous
                .service
                .iter()
                .filter(|(k, _)| under(k))
                .map(|(k, v)| (k.clone(), v.clone())),
        );
        out
    }

    /// Without the values at or under `key`, in both folders.
    pub fn without(&self, key: &str) -> Self {
        let keep = |k: &String| !(k == key || k.starts_with(&format!("{key}.")));
        Self {
            defaults: self
                .defaults
                .iter()
                .filter(|(k, _)| keep(k))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            service: self
                .service
                .iter()
                .filter(|(k, _)| keep(k))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            service_configs: self.service_configs.clone(),
        }
    }

    fn source(folder: &str, map: &BTreeMap<String, String>) -> FlatSource {
        FlatSource(
            map.iter()
                .map(|(k, v)| {
                    let origin = Self::kv_key(folder, k);
                    (
                        k.clone(),
                        Value::new(Some(&origin), ValueKind::String(v.clone())),
                    )
                })
                .collect(),
        )
    }
}

/// Settings Consul KV cannot set: who the process is, and how it reaches Consul itself.
const NOT_FROM_KV: &[&str] = &[
    "service.name",
    "service.instance_id",
    "consul.http_addr",
    "consul.token",
];

/// A configuration layer of dotted keys (Consul KV's).
#[derive(Clone, Debug)]
struct FlatSource(config::Map<String, Value>);

impl Source for FlatSource {
    fn clone_into_box(&self) -> Box<dyn Source + Send + Sync> {
        Box::new(self.clone())
    }
    fn collect(&self) -> Result<config::Map<String, Value>, config::ConfigError> {
        Ok(self.0.clone())
    }
}

/// Which dotted keys each layer set.
#[derive(Debug, Default)]
struct Layers {
    file: HashSet<String>,
    kv: KvSettings,
    env: HashSet<String>,
}

impl Layers {
    /// Whether `set` holds `key`, a section above it, or a key below it (a section's report names the section).
    fn has(set: &HashSet<String>, key: &str) -> bool {
        set.iter().any(|k| {
            k == key || k.starts_with(&format!("{key}.")) || key.starts_with(&format!("{k}."))
        })
    }
}

/// Every dotted key of a nested configuration map (`{"grpc": {"listen_addr": …}}` → `grpc.listen_addr`).
fn flatten(prefix: &str, map: &config::Map<String, Value>, out: &mut HashSet<String>) {
    for (k, v) in map {
        let key = if prefix.is_empty() {
            k.clone()
        } else {
            format!("{prefix}.{k}")
        };
        match &v.kind {
            ValueKind::Table(t) => flatten(&key, t, out),
            _ => {
                out.insert(key);
            }
        }
    }
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

/// Reads typed values out of the layered [`Config`], collecting every error instead of stopping at the first,
/// and recording every key it reads with its effective value (secrets redacted): the start-up report
/// ([`Settings::effective`]) is generated from the same calls that read the settings, so it cannot omit one.
///
/// Each section reads itself next to the code it configures (`GrpcSettings::read` in `server`, …), naming each
/// key and its default once.
pub struct Reader {
    cfg: Config,
    errors: Vec<ConfigError>,
    effective: Vec<(String, String)>,
}

impl fmt::Debug for Reader {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Reader")
            .field("errors", &self.errors)
            .finish()
    }
}

/// How a value shows in the effective-settings report.
fn show_opt(v: &Option<String>) -> String {
    v.clone().unwrap_or_else(|| "(none)".into())
}

impl Reader {
    /// Records one bad value.
    pub fn fail(&mut self, key: &str, message: impl Into<String>) {
        self.errors.push(ConfigError {
            key: key.to_owned(),
            message: message.into(),
        });
    }

    /// Records (or replaces) the effective value reported for `key`, for a value resolved after reading.
    pub fn report(&mut self, key: &str, value: impl Into<String>) {
        let value = value.into();
        match self.effective.iter_mut().find(|(k, _)| k == key) {
            Some(entry) => entry.1 = value,
            None => self.effective.push((key.to_owned(), value)),
        }
    }

    fn raw<T: DeserializeOwned>(&mut self, key: &str, default: T) -> T {
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

    fn raw_opt_string(&mut self, key: &str) -> Option<String> {
        let v: Option<String> = self.raw(key, None);
        v.filter(|s| !s.trim().is_empty())
    }

    /// A string, `default` when unset.
    pub fn string(&mut self, key: &str, default: &str) -> String {
        let v = self.raw(key, default.to_owned());
        self.report(key, v.clone());
        v
    }

    /// A boolean, `default` when unset.
    pub fn bool(&mut self, key: &str, default: bool) -> bool {
        let v = self.raw(key, default);
        self.report(key, v.to_string());
        v
    }

    /// A table of strings (`[client.service_config]` in the file: `echo = '{…}'`), each entry reported as
    /// `key.<name>`; empty when unset.
    pub fn string_map(&mut self, key: &str) -> BTreeMap<String, String> {
        let map: BTreeMap<String, String> = self.raw(key, BTreeMap::new());
        for (name, value) in &map {
            self.report(&format!("{key}.{name}"), value.clone());
        }
        map
    }

    /// A string that may be unset (blank counts as unset).
    pub fn opt_string(&mut self, key: &str) -> Option<String> {
        let v = self.raw_opt_string(key);
        self.report(key, show_opt(&v));
        v
    }

    /// A secret: reported as `<redacted>` when set.
    pub fn secret(&mut self, key: &str) -> Secret {
        let v = Secret(self.raw_opt_string(key).unwrap_or_default());
        self.report(key, v.redacted());
        v
    }

    /// A value parsed with `FromStr`, `default` when unset.
    pub fn parsed<T>(&mut self, key: &str, default: T) -> T
    where
        T: std::str::FromStr + fmt::Display,
        T::Err: fmt::Display,
    {
        let v = match self.raw_opt_string(key) {
            None => default,
            Some(s) => match s.trim().parse() {
                Ok(v) => v,
                Err(e) => {
                    self.fail(key, format!("{s:?}: {e}"));
                    default
                }
            },
        };
        self.report(key, v.to_string());
        v
    }

    /// A `host:port`, resolved once at start (a hostname such as `consul:8600` is fine).
    pub fn socket_addr(&mut self, key: &str, default: SocketAddr) -> SocketAddr {
        use std::net::ToSocketAddrs;
        let v = match self.raw_opt_string(key) {
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
        };
        self.report(key, v.to_string());
        v
    }

    /// A humantime duration (`250ms`, `5s`, `1m`), `default` when unset.
    pub fn duration(&mut self, key: &str, default: Duration) -> Duration {
        let v = match self.raw_opt_string(key) {
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
        };
        self.report(key, humantime::format_duration(v).to_string());
        v
    }

    /// A number greater than zero, `default` when unset.
    pub fn positive<T>(&mut self, key: &str, default: T) -> T
    where
        T: PartialOrd + Default + Copy + std::str::FromStr + fmt::Display,
        T::Err: fmt::Display,
    {
        let v = self.parsed(key, default);
        if v <= T::default() {
            self.fail(key, "must be greater than zero");
        }
        v
    }

    /// A comma-separated list.
    pub fn list(&mut self, key: &str) -> Vec<String> {
        let v: Vec<String> = self
            .raw_opt_string(key)
            .map(|s| {
                s.split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(str::to_owned)
                    .collect()
            })
            .unwrap_or_default();
        self.report(key, v.join(","));
        v
    }
}

/// A service's own configuration section (`[cache]`): serde fields with `#[serde(default)]`, checked by
/// [`SectionSettings::validate`] beside the platform's settings before anything is bound. `()` is the section
/// of a service that has none.
pub trait SectionSettings:
    DeserializeOwned + serde::Serialize + Default + fmt::Debug + Send + Sync + 'static
{
    /// What serde cannot check (ranges, combinations), each error under its dotted key
    /// (`<section>.<field>`). None by default.
    fn validate(&self, section: &str) -> Vec<ConfigError> {
        let _ = section;
        Vec::new()
    }
}

impl SectionSettings for () {}

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
        match Self::read(name, env)? {
            (settings, errors) if errors.is_empty() => Ok(settings),
            (_, errors) => Err(ConfigErrors(errors)),
        }
    }

    /// [`Settings::from_env`], returning the settings (defaults in place of bad values) beside the errors, so
    /// the services' sections can be checked against them and reported with them.
    ///
    /// # Errors
    /// Only an unreadable `KEEL_CONFIG_FILE`.
    pub fn read(name: &str, env: &Env) -> Result<(Self, Vec<ConfigError>), ConfigErrors> {
        Self::read_layered(name, env, &KvSettings::default())
    }

    /// [`Settings::read`] with the settings from Consul KV layered between the file and the environment.
    ///
    /// # Errors
    /// Only an unreadable `KEEL_CONFIG_FILE`.
    pub fn read_layered(
        name: &str,
        env: &Env,
        kv: &KvSettings,
    ) -> Result<(Self, Vec<ConfigError>), ConfigErrors> {
        let mut layers = Layers {
            kv: kv.clone(),
            ..Layers::default()
        };
        let mut builder = Config::builder();
        if let Some(path) = env.get("KEEL_CONFIG_FILE") {
            let file = File::new(path, FileFormat::Toml).required(true);
            if let Ok(map) = file.collect() {
                flatten("", &map, &mut layers.file);
            }
            builder = builder.add_source(file);
        }
        builder = builder
            .add_source(KvSettings::source(KvSettings::DEFAULTS, &kv.defaults))
            .add_source(KvSettings::source("service", &kv.service));
        // Every setting is `section.key`: a `KEEL_` variable without `__` names none. The project's own scripts
        // export such variables (`KEEL_CACHE`, the tools' directory; `KEEL_RUN_DIR`), and one named like a
        // section (`KEEL_CACHE` and the cache service's `cache` section) would otherwise replace the section.
        let keel_vars: HashMap<String, String> = env
            .0
            .iter()
            .filter(|(k, _)| {
                k.strip_prefix("KEEL_")
                    .is_some_and(|rest| rest.contains("__"))
            })
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        layers.env.extend(keel_vars.keys().filter_map(|k| {
            let rest = k.strip_prefix("KEEL_")?;
            rest.contains("__")
                .then(|| rest.to_ascii_lowercase().replace("__", "."))
        }));
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
                layers.env.insert(key.to_owned());
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
            effective: Vec::new(),
        };
        let service = ServiceSettings::read(&mut r, name);
        let grpc = GrpcSettings::read(&mut r);
        let statsd = StatsdSettings::read(&mut r);
        let log = LogSettings::read(&mut r);
        let client = ClientSettings::read(&mut r);
        let database = DatabaseSettings::read(&mut r);
        let events = EventSettings::read(&mut r, log.kafka_brokers.as_deref());
        let tls = TlsSettings::read(&mut r);
        let consul = ConsulSettings::read(&mut r, &tls);
        let tokens = TokenSettings::read(&mut r);
        let features: BTreeMap<String, bool> = r.raw("features", BTreeMap::new());
        for (flag, on) in &features {
            r.report(&format!("features.{flag}"), on.to_string());
        }
        let log_topic = log
            .topic
            .clone()
            .unwrap_or_else(|| format!("logs.{}", service.name));
        r.report("log.topic", log_topic);
        Ok((
            Settings {
                service,
                grpc,
                consul,
                statsd,
                log,
                client,
                database,
                events,
                tls,
                tokens,
                features,
                raw,
                effective: r.effective,
                layers: Arc::new(layers),
            },
            r.errors,
        ))
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
        self.database.url_pattern().replace("{service}", service)
    }

    /// [`Self::database_url`] with any password replaced by `***`, for logs.
    pub fn database_url_redacted(&self) -> String {
        redact_url(&self.database_url())
    }
}

/// `url` with every credential in it replaced by `***`: the password of its user info, and the value of any
/// query parameter whose name holds `password`, `secret` or `token` (`?sslpassword=…`, `?token=…`). Text that
/// is not a URL comes back as it is.
pub fn redact_url(url: &str) -> String {
    // `{service}` survives the round trip through the parser (which would percent-encode the braces).
    const SERVICE: &str = "keel-service-placeholder";
    let Ok(mut parsed) = url::Url::parse(&url.replace("{service}", SERVICE)) else {
        return url.to_owned();
    };
    let secret = |k: &str| {
        let k = k.to_ascii_lowercase();
        ["password", "secret", "token"]
            .iter()
            .any(|s| k.contains(s))
    };
    let secret_query = parsed.query_pairs().any(|(k, _)| secret(&k));
    if parsed.password().is_none() && !secret_query {
        return url.to_owned();
    }
    if parsed.password().is_some() {
        let _ = parsed.set_password(Some("***"));
    }
    if secret_query {
        let pairs: Vec<(String, String)> = parsed
            .query_pairs()
            .map(|(k, v)| {
                let v = if secret(&k) {
                    "***".into()
                } else {
                    v.into_owned()
                };
                (k.into_owned(), v)
            })
            .collect();
        parsed.query_pairs_mut().clear().extend_pairs(pairs);
    }
    parsed.to_string().replace(SERVICE, "{service}")
}

impl Settings {
    /// The effective value of every platform setting as `key=value` pairs, secrets redacted, in reading order:
    /// recorded by the [`Reader`] as each section read its keys, so nothing is left out. The services'
    /// sections are added by [`crate::App`]'s report.
    pub fn effective(&self) -> &[(String, String)] {
        &self.effective
    }

    /// Where the value of dotted `key` comes from: `env`, `consul-kv keel/<service>/…` (or
    /// `keel/_defaults/…`), `file`, or `default` (`RUST_LOG` counts as the default of `log.level`).
    pub fn source(&self, key: &str) -> String {
        let l = &self.layers;
        if Layers::has(&l.env, key) {
            "env".into()
        } else if let Some(kv) = l.kv.origin(&self.service.name, key) {
            format!("consul-kv {kv}")
        } else if Layers::has(&l.file, key) {
            "file".into()
        } else {
            "default".into()
        }
    }

    /// Whether feature flag `name` (`features.<name>`) is on; off when unset.
    pub fn feature(&self, name: &str) -> bool {
        self.features.get(name).copied().unwrap_or(false)
    }

    /// The Consul KV settings these were built with.
    pub fn kv(&self) -> &KvSettings {
        &self.layers.kv
    }
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
        // A variable without `__` is no setting, even one named like the section (`scripts/infra.sh env`
        // exports KEEL_CACHE, a directory): the section stays whole.
        for _ in 0..8 {
            let s = Settings::from_env(
                "cache",
                &Env::default()
                    .with("KEEL_CACHE", "/root/.cache/keel")
                    .with("KEEL_CACHE__MAX_BYTES", "1048576")
                    .with("KEEL_CACHE__NAME", "c"),
            )
            .unwrap();
            assert_eq!(
                s.section::<Cache>("cache").unwrap(),
                Cache {
                    max_bytes: 1_048_576,
                    name: "c".into()
                }
            );
        }
        let s = Settings::from_env(
            "cache",
            &Env::default().with("KEEL_CACHE__MAX_BYTES", "lots"),
        )
        .unwrap();
        assert_eq!(s.section::<Cache>("cache").unwrap_err().0[0].key, "cache");
        assert!(!format!("{s:?}").contains("lots"));
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
    fn consul_kv_sits_between_file_and_environment_and_every_value_names_its_source() {
        let dir = std::env::temp_dir().join(format!("keel-kv-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("svc.toml");
        std::fs::write(
            &path,
            "[grpc]\ndrain_timeout = \"3s\"\n[log]\nlevel = \"warn\"\n",
        )
        .unwrap();
        let pairs = [
            ("keel/_defaults/log/level", "debug"),
            ("keel/_defaults/client/default_timeout", "1s"),
            ("keel/echo/client/default_timeout", "250ms"),
            ("keel/echo/grpc/drain_timeout", "4s"),
            ("keel/other/client/max_attempts", "9"),
            ("keel/echo/service-config", "{}"),
            ("keel/echo/service/name", "impostor"),
            ("keel/echo/features/search_v2", "true"),
            ("keel/echo/", ""),
        ];
        let kv = KvSettings::from_pairs(
            "echo",
            pairs
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned())),
        );
        let env = Env::default()
            .with("KEEL_CONFIG_FILE", path.to_string_lossy())
            .with("KEEL_GRPC__DRAIN_TIMEOUT", "5s");
        let (s, errors) = Settings::read_layered("echo", &env, &kv).unwrap();
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(s.log.level, "debug", "KV defaults beat the file");
        assert_eq!(
            s.client.default_timeout,
            Duration::from_millis(250),
            "the service's KV beats the defaults"
        );
        assert_eq!(s.client.max_attempts, 3, "another service's KV is not ours");
        assert_eq!(
            s.grpc.drain_timeout,
            Duration::from_secs(5),
            "the environment beats KV"
        );
        assert_eq!(s.service.name, "echo", "KV cannot rename a service");
        assert_eq!(s.source("log.level"), "consul-kv keel/_defaults/log/level");
        assert_eq!(
            s.source("client.default_timeout"),
            "consul-kv keel/echo/client/default_timeout"
        );
        assert_eq!(s.source("grpc.drain_timeout"), "env");
        assert_eq!(s.source("grpc.listen_addr"), "default");
        assert!(s.feature("search_v2") && !s.feature("unset"));
        assert_eq!(
            s.source("features.search_v2"),
            "consul-kv keel/echo/features/search_v2"
        );
        assert!(
            s.effective()
                .contains(&("features.search_v2".into(), "true".into()))
        );
        let (plain, _) = Settings::read_layered(
            "echo",
            &Env::default().with("KEEL_CONFIG_FILE", path.to_string_lossy()),
            &KvSettings::default(),
        )
        .unwrap();
        assert_eq!(plain.source("log.level"), "file");
        assert_eq!(plain.log.level, "warn");
    }

    #[test]
    fn every_section_reports_every_key_it_reads() {
        let s = Settings::from_env("echo", &Env::default()).unwrap();
        let keys: Vec<&str> = s.effective().iter().map(|(k, _)| k.as_str()).collect();
        for key in [
            "service.name",
            "grpc.max_concurrent_streams",
            "grpc.keepalive_timeout",
            "consul.check",
            "consul.failures_before_critical",
            "statsd.timer_samples",
            "log.buffer_lines",
            "log.topic",
            "client.default_timeout",
            "client.static_endpoints",
            "database.max_connections",
            "events.delivery_timeout",
            "tls.ca_file",
            "tls.server_name",
        ] {
            assert!(keys.contains(&key), "{key} missing from {keys:?}");
        }
        let unique: std::collections::HashSet<&str> = keys.iter().copied().collect();
        assert_eq!(unique.len(), keys.len(), "each key once: {keys:?}");
    }

    #[test]
    fn urls_lose_every_credential() {
        assert_eq!(
            redact_url("postgres://kv:hunter2@db:5432/kv_{service}"),
            "postgres://kv:***@db:5432/kv_{service}"
        );
        let r = redact_url("postgres://db/x?user=a@b&sslpassword=hunter2&Token=t0k&mode=rw");
        assert!(!r.contains("hunter2") && !r.contains("t0k"), "{r}");
        assert!(r.contains("user=a%40b") && r.contains("mode=rw"), "{r}");
        assert_eq!(
            redact_url("sqlite://var/x.db?mode=rwc"),
            "sqlite://var/x.db?mode=rwc"
        );
        assert_eq!(redact_url("not a url"), "not a url");
    }

    #[test]
    fn service_name_must_be_a_dns_label() {
        let errs = Settings::from_env("bad name", &Env::default()).unwrap_err();
        assert_eq!(errs.0[0].key, "service.name");
    }
}
