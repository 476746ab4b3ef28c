//! A service declared once: its name, its settings, the resources the platform opens for it, and how it adds
//! itself to a server. [`App`] runs one or several declared services as a process (`main.rs`), inside a test
//! or the bench ([`App::spawn`]), or all in one process (the KillrVideo embedded default).
//!
//! ```ignore
//! impl keel_common::Service for Comments {
//!     const NAME: &'static str = "comments";
//!     type Settings = ();
//!     fn storage() -> Storage { Storage::with_outbox(&MIGRATIONS) }
//!     async fn open(r: Resources<()>) -> anyhow::Result<Self> { let db = r.database()?; Ok(Self::new(db.pool, db.outbox)) }
//!     fn add_to(self, server: Server) -> Server { server.add_service(CommentsServiceServer::new(self)) }
//! }
//! // main.rs
//! keel_common::App::of::<comments::Comments>().run().await
//! ```
//!
//! What the platform does for a declared service, in this order, so no service repeats it:
//! 1. before anything is bound, reads its `[SECTION]` section into `Settings` and validates it together with the
//!    platform's settings (every bad value reported at once, exit 2);
//! 2. opens its database (`database.url` with `{service}` = `NAME`, migrations applied) and adds a readiness
//!    check `"<NAME> database"`;
//! 3. calls [`Service::open`], then subscribes [`Service::handle`] to [`Service::consumes`] in consumer group
//!    `NAME` (behind `events.group_prefix`);
//! 4. once every service of the process is open and subscribed, starts the outbox relays, so an in-process
//!    consumer never misses an event published at start.

use std::{future::Future, net::SocketAddr, process::ExitCode, time::Duration};

use futures::future::LocalBoxFuture;
use sqlx::migrate::Migrator;

use crate::db::Pool;

use crate::{
    Platform, Server,
    config::{ConfigError, ConfigErrors, Env, KvSettings, SectionSettings, Settings},
    db,
    events::{Event, HandlerError},
    logs,
    outbox::Outbox,
    shutdown,
};

/// The database a service owns.
#[derive(Clone, Copy, Debug)]
pub enum Storage {
    /// None.
    None,
    /// Its own database with these migrations; `outbox`: it publishes domain events through the
    /// transactional outbox, relayed to the event bus.
    Database {
        /// `sqlx::migrate!` of the service.
        migrations: &'static Migrator,
        /// Whether the outbox relay runs.
        outbox: bool,
    },
}

impl Storage {
    /// A database that publishes no events.
    pub const fn database(migrations: &'static Migrator) -> Self {
        Self::Database {
            migrations,
            outbox: false,
        }
    }

    /// A database whose transactions publish events through the outbox.
    pub const fn with_outbox(migrations: &'static Migrator) -> Self {
        Self::Database {
            migrations,
            outbox: true,
        }
    }
}

/// An opened database: the pool (migrated) and its outbox.
#[derive(Clone, Debug)]
pub struct Database {
    /// The service's pool.
    pub pool: Pool,
    /// Its outbox (relayed only when declared with [`Storage::with_outbox`]).
    pub outbox: Outbox,
}

/// What the platform opened for a service, handed to [`Service::open`].
#[derive(Debug)]
pub struct Resources<T> {
    /// The process's platform (settings, clients, metrics, events).
    pub platform: Platform,
    /// The service's own section, validated.
    pub settings: T,
    database: Option<Database>,
}

impl<T> Resources<T> {
    /// The database declared by [`Service::storage`].
    ///
    /// # Errors
    /// The service declared [`Storage::None`].
    pub fn database(&self) -> anyhow::Result<Database> {
        self.database
            .clone()
            .ok_or_else(|| anyhow::anyhow!("no database: the service declares Storage::None"))
    }
}

/// A service of the platform; see the module docs.
pub trait Service: Sized + Clone + Send + Sync + 'static {
    /// Consul service name, `{service}` in `database.url`, consumer group and settings section, e.g.
    /// `comments`. A DNS label.
    const NAME: &'static str;

    /// The name of its configuration section: `[SECTION]` in the file, `KEEL_<SECTION>__<KEY>` in the
    /// environment. Default `NAME`; a name with `-` should give one with `_`, which a shell can set.
    const SECTION: &'static str = Self::NAME;

    /// Its configuration section; `()` when it has none.
    type Settings: SectionSettings;

    /// Dotted keys of its own settings that change without a restart when Consul KV changes them
    /// (`cache.max_bytes`); the service applies them by watching [`crate::Platform::live`]. None by default.
    const LIVE: &'static [&'static str] = &[];

    /// Checks of the platform's settings this service needs beyond their own rules (geo-search needs a
    /// PostgreSQL `database.url`), run with the rest before anything is bound. None by default.
    fn check(settings: &Settings) -> Vec<ConfigError> {
        let _ = settings;
        Vec::new()
    }

    /// The database it owns; none by default.
    fn storage() -> Storage {
        Storage::None
    }

    /// Topics it consumes in consumer group `NAME`; each event goes to [`Service::handle`]. None by default.
    fn consumes() -> &'static [&'static str] {
        &[]
    }

    /// Builds the service from what the platform opened for it.
    ///
    /// # Errors
    /// Whatever keeps it from starting (the process exits 1 with it logged).
    fn open(
        resources: Resources<Self::Settings>,
    ) -> impl Future<Output = anyhow::Result<Self>> + Send;

    /// Applies one consumed event; see [`crate::events`] for retries and dead letters.
    ///
    /// # Errors
    /// [`HandlerError::Unavailable`] is waited out; [`HandlerError::Failed`] is retried `events.max_attempts`
    /// times and [`HandlerError::Malformed`] not at all before the event is dead-lettered.
    fn handle(&self, event: Event) -> impl Future<Output = Result<(), HandlerError>> + Send {
        let topic = event.topic;
        async move {
            Err(HandlerError::Malformed(format!(
                "{} consumes no topic (got {topic})",
                Self::NAME
            )))
        }
    }

    /// Adds its gRPC services to `server`.
    fn add_to(self, server: Server) -> Server;
}

/// A service being opened: the server with it added, and its outbox when it relays one.
type Opening = LocalBoxFuture<'static, anyhow::Result<(Server, Option<(&'static str, Outbox)>)>>;

/// One declared service, type-erased.
#[derive(Clone, Copy)]
struct Unit {
    name: &'static str,
    live: &'static [&'static str],
    check: fn(&Settings) -> Vec<ConfigError>,
    report: fn(&Settings) -> Vec<(String, String)>,
    open: fn(Platform, Server) -> Opening,
}

fn check<S: Service>(settings: &Settings) -> Vec<ConfigError> {
    let mut errors = S::check(settings);
    match settings.section::<S::Settings>(S::SECTION) {
        Ok(section) => errors.extend(section.validate(S::SECTION)),
        Err(ConfigErrors(e)) => errors.extend(e),
    }
    errors
}

/// The service's section as `<NAME>.<field>=value` pairs (nested tables dotted), for the start-up report.
fn report<S: Service>(settings: &Settings) -> Vec<(String, String)> {
    fn flatten(prefix: &str, value: &serde_json::Value, out: &mut Vec<(String, String)>) {
        match value {
            serde_json::Value::Object(map) => {
                for (k, v) in map {
                    flatten(&format!("{prefix}.{k}"), v, out);
                }
            }
            serde_json::Value::Null => {}
            serde_json::Value::String(s) => out.push((prefix.to_owned(), s.clone())),
            other => out.push((prefix.to_owned(), other.to_string())),
        }
    }
    let mut out = Vec::new();
    if let Ok(section) = settings.section::<S::Settings>(S::SECTION)
        && let Ok(value) = serde_json::to_value(&section)
    {
        flatten(S::SECTION, &value, &mut out);
    }
    out
}

fn open<S: Service>(platform: Platform, mut server: Server) -> Opening {
    Box::pin(async move {
        let settings = platform
            .settings
            .section::<S::Settings>(S::SECTION)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let (database, relay) = match S::storage() {
            Storage::None => (None, None),
            Storage::Database { migrations, outbox } => {
                let pool = db::connect(&platform.settings, S::NAME, migrations).await?;
                let url = platform.settings.database_url_of(S::NAME);
                server = server.readiness(&format!("{} database", S::NAME), db::ping(&url));
                let database = Database {
                    outbox: Outbox::new(pool.clone(), platform.events.clone()),
                    pool,
                };
                let relay = outbox.then(|| (S::NAME, database.outbox.clone()));
                (Some(database), relay)
            }
        };
        let service = S::open(Resources {
            platform: platform.clone(),
            settings,
            database,
        })
        .await?;
        let topics = S::consumes();
        if !topics.is_empty() {
            let handler = service.clone();
            platform.events.consume(
                &platform.settings.consumer_group(S::NAME),
                topics,
                move |e| {
                    let h = handler.clone();
                    async move { h.handle(e).await }
                },
            )?;
        }
        Ok((service.add_to(server), relay))
    })
}

/// A process of one or several declared services on one server.
#[derive(Clone)]
pub struct App {
    name: &'static str,
    defaults: Vec<(&'static str, &'static str)>,
    units: Vec<Unit>,
}

impl std::fmt::Debug for App {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("App")
            .field("name", &self.name)
            .field(
                "services",
                &self.units.iter().map(|u| u.name).collect::<Vec<_>>(),
            )
            .finish()
    }
}

impl App {
    /// The process of service `S` alone, named `S::NAME`.
    pub fn of<S: Service>() -> Self {
        Self::named(S::NAME).with::<S>()
    }

    /// A process named `name` (its `service.name` in Consul, StatsD and logs) with no service yet.
    pub fn named(name: &'static str) -> Self {
        Self {
            name,
            defaults: Vec::new(),
            units: Vec::new(),
        }
    }

    /// Adds service `S`; services are opened in the order they are added.
    pub fn with<S: Service>(mut self) -> Self {
        self.units.push(Unit {
            name: S::NAME,
            live: S::LIVE,
            check: check::<S>,
            report: report::<S>,
            open: open::<S>,
        });
        self
    }

    /// An environment default for a variable the process environment does not set (e.g.
    /// `("KEEL_GRPC__LISTEN_ADDR", "127.0.0.1:50101")` for a process with a well-known address).
    pub fn default_env(mut self, key: &'static str, value: &'static str) -> Self {
        self.defaults.push((key, value));
        self
    }

    /// The process's name.
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// The settings of this process from `env`: the platform's and every service's section, every bad value
    /// reported at once with its key.
    ///
    /// # Errors
    /// As above.
    pub fn settings(&self, env: &Env) -> Result<Settings, ConfigErrors> {
        self.settings_layered(env, &KvSettings::default())
    }

    /// [`App::settings`] with the settings from Consul KV between the file and the environment.
    ///
    /// # Errors
    /// As [`App::settings`]; a bad KV value is reported under its setting's key.
    pub fn settings_layered(&self, env: &Env, kv: &KvSettings) -> Result<Settings, ConfigErrors> {
        let mut env = env.clone();
        for (key, value) in &self.defaults {
            if env.get(key).is_none() {
                env = env.with(*key, *value);
            }
        }
        let (settings, mut errors) = Settings::read_layered(self.name, &env, kv)?;
        for unit in &self.units {
            errors.extend((unit.check)(&settings));
        }
        if errors.is_empty() {
            Ok(settings)
        } else {
            Err(ConfigErrors(errors))
        }
    }

    /// The settings its services change without a restart ([`Service::LIVE`]).
    pub fn live_keys(&self) -> Vec<&'static str> {
        self.units
            .iter()
            .flat_map(|u| u.live.iter().copied())
            .collect()
    }

    /// Every effective setting of this process, platform and services, as `key=value` pairs with secrets
    /// redacted: what [`App::run`] logs at start.
    pub fn effective(&self, settings: &Settings) -> Vec<(String, String)> {
        let mut all = settings.effective().to_vec();
        for unit in &self.units {
            all.extend((unit.report)(settings));
        }
        all
    }

    /// Opens every service (see the module docs) and adds it to one server of `platform`.
    ///
    /// # Errors
    /// A database cannot be opened or migrated, a consumer cannot be configured, or a service's `open` fails.
    pub async fn build(&self, platform: &Platform) -> anyhow::Result<Server> {
        let mut server = Server::builder(platform);
        let mut relays = Vec::new();
        for unit in &self.units {
            let (s, relay) = (unit.open)(platform.clone(), server).await?;
            server = s;
            relays.extend(relay);
        }
        let metrics = &platform.metrics;
        let bus = platform.events.clone();
        metrics.sample("events.dead_letters", move || bus.dead_letters());
        let bus = platform.events.clone();
        metrics.sample("events.consumer_lag", move || bus.consumer_lag());
        for (name, outbox) in relays {
            let counts = outbox.counts();
            let name = crate::metrics::sanitize(name);
            let c = counts.clone();
            metrics.sample(format!("outbox.{name}.backlog"), move || {
                c.backlog.load(std::sync::atomic::Ordering::Relaxed)
            });
            metrics.sample(format!("outbox.{name}.dead_letters"), move || {
                counts
                    .dead_letters
                    .load(std::sync::atomic::Ordering::Relaxed)
            });
            outbox.spawn_relay();
        }
        Ok(server)
    }

    /// Starts this app's server for `settings` inside this process, on `grpc.listen_addr` (port 0: a free
    /// port), serving in the background for the life of the runtime; returns the address it listens on. For
    /// tests, benchmarks and embedding: unlike [`App::run`], it sets up no logging and handles no signal.
    ///
    /// # Errors
    /// A service's section is invalid, the address cannot be bound, or the platform or a service fails.
    pub async fn spawn(&self, settings: Settings) -> anyhow::Result<SocketAddr> {
        let errors: Vec<ConfigError> = self
            .units
            .iter()
            .flat_map(|u| (u.check)(&settings))
            .collect();
        if !errors.is_empty() {
            anyhow::bail!("{}", ConfigErrors(errors));
        }
        crate::tokens::install(&settings.tokens);
        let listener = tokio::net::TcpListener::bind(settings.grpc.listen_addr).await?;
        let addr = listener.local_addr()?;
        let platform = Platform::new(settings, addr.port())?;
        let server = self.build(&platform).await?;
        tokio::spawn(server.serve(listener, std::future::pending()));
        Ok(addr)
    }

    /// Runs the process until SIGTERM/SIGINT: settings from the process environment (exit 2 with every bad
    /// value listed, before binding anything), listener, JSON logs shipped to Kafka, StatsD, the services,
    /// serving with health, reflection and Consul registration, the shutdown order, flushes, exit 0.
    ///
    /// With `--settings` as its argument the process prints every effective setting with its source (default,
    /// file, Consul KV, env) and exits instead.
    pub async fn run(self) -> ExitCode {
        if std::env::args().skip(1).any(|a| a == "--settings") {
            return self.print_settings(&Env::from_process()).await;
        }
        self.run_until(shutdown::signal()).await
    }

    /// The settings of `env` and, when `consul.kv_watch` is on and Consul answers, Consul KV; the KV index read
    /// and the warnings to log once logging is up (refused KV values, Consul unreachable).
    async fn settings_at_start(
        &self,
        env: &Env,
    ) -> Result<(Settings, u64, Vec<String>), ConfigErrors> {
        let settings = self.settings(env)?;
        if !settings.consul.kv_watch {
            return Ok((settings, 0, Vec::new()));
        }
        match crate::live::read_at_start(&settings).await {
            Ok((kv, index)) => {
                let (settings, refused) =
                    crate::live::layered(self, env, kv, &KvSettings::default())?;
                let warnings = refused
                    .into_iter()
                    .map(|r| {
                        format!(
                            "invalid value in consul kv refused: {} ({}): {}",
                            r.kv_key, r.setting, r.reason
                        )
                    })
                    .collect();
                Ok((settings, index, warnings))
            }
            Err(e) => Ok((
                settings,
                0,
                vec![format!(
                    "consul kv unreachable at start ({e}); starting on file and environment, watching for it"
                )],
            )),
        }
    }

    /// `--settings`: key, value and source of every setting, one per line; exit 2 when one is invalid.
    async fn print_settings(&self, env: &Env) -> ExitCode {
        match self.settings_at_start(env).await {
            Ok((settings, _, warnings)) => {
                for w in warnings {
                    eprintln!("{}: {w}", self.name);
                }
                let report = self.effective(&settings);
                let width = report.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
                for (key, value) in &report {
                    println!("{key:width$}  {value}  ({})", settings.source(key));
                }
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{}: {e}", self.name);
                ExitCode::from(2)
            }
        }
    }

    /// [`App::run`], stopping when `stop` resolves instead of on a signal.
    pub async fn run_until(self, stop: impl Future<Output = ()>) -> ExitCode {
        let name = self.name;
        let env = Env::from_process();
        let (settings, kv_index, kv_warnings) = match self.settings_at_start(&env).await {
            Ok(s) => s,
            Err(e) => {
                eprintln!("{name}: {e}");
                return ExitCode::from(2);
            }
        };
        let listener = match tokio::net::TcpListener::bind(settings.grpc.listen_addr).await {
            Ok(l) => l,
            Err(e) => {
                eprintln!(
                    "{name}: cannot listen on {} (grpc.listen_addr): {e}",
                    settings.grpc.listen_addr
                );
                return ExitCode::from(2);
            }
        };
        let port = listener.local_addr().map(|a| a.port()).unwrap_or(0);
        let instance_id = settings
            .service
            .instance_id
            .clone()
            .unwrap_or_else(|| crate::default_instance_id(&settings.service.name, port));
        let telemetry = match logs::Telemetry::init(&settings, &instance_id) {
            Ok(t) => t,
            Err(e) => {
                eprintln!("{name}: cannot set up log shipping (kafka.brokers): {e}");
                return ExitCode::from(2);
            }
        };
        for w in &kv_warnings {
            tracing::warn!("{w}");
        }
        for (key, value) in self.effective(&settings) {
            let value = if key == "service.instance_id" {
                instance_id.as_str()
            } else {
                value.as_str()
            };
            let source = settings.source(&key);
            tracing::info!(key = key.as_str(), value, source, "setting");
        }
        crate::tokens::install(&settings.tokens);
        let mut settings = settings;
        settings.service.instance_id = Some(instance_id);
        let mut platform = match Platform::new(settings, port) {
            Ok(p) => p,
            Err(e) => {
                tracing::error!(error = ?e, "platform set-up failed");
                telemetry.shutdown();
                return ExitCode::from(2);
            }
        };
        let restart = std::sync::Arc::new(tokio::sync::Notify::new());
        if platform.settings.consul.kv_watch {
            let notify = restart.clone();
            platform.live = crate::live::watch(crate::live::Watch {
                app: self.clone(),
                env,
                initial: platform.settings.clone(),
                index: kv_index,
                restart: Box::new(move || notify.notify_one()),
            });
            platform.clients.follow(&platform.live);
            let mut changes = platform.live.changes();
            let level = telemetry.log_level();
            let mut current = platform.settings.log.level.clone();
            tokio::spawn(async move {
                while changes.changed().await.is_ok() {
                    let wanted = changes.borrow_and_update().log.level.clone();
                    if wanted != current {
                        if let Err(e) = level.set(&wanted) {
                            tracing::warn!(
                                level = wanted.as_str(),
                                error = e.as_str(),
                                "log level not changed"
                            );
                        }
                        current = wanted;
                    }
                }
            });
        }
        let stop = async move {
            tokio::select! {
                () = stop => {}
                () = restart.notified() => {}
            }
        };
        let stats = telemetry.stats();
        platform
            .metrics
            .spawn_flusher(Duration::from_secs(1), move || stats.dropped());
        logs::spawn_drop_reporter(telemetry.stats(), Duration::from_secs(1));
        crate::memory::spawn_trimmer();
        let code = match self.build(&platform).await {
            Ok(server) => match server.serve(listener, stop).await {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!(error = ?e, "server failed");
                    ExitCode::FAILURE
                }
            },
            Err(e) => {
                tracing::error!(error = ?e, "service failed to start");
                ExitCode::FAILURE
            }
        };
        platform.metrics.flush();
        telemetry.shutdown();
        code
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Clone, Debug, Default, serde::Deserialize, serde::Serialize)]
    #[serde(default)]
    struct Limits {
        max_items: u32,
    }

    impl SectionSettings for Limits {
        fn validate(&self, section: &str) -> Vec<ConfigError> {
            if self.max_items == 0 {
                vec![ConfigError {
                    key: format!("{section}.max_items"),
                    message: "must be greater than zero".into(),
                }]
            } else {
                Vec::new()
            }
        }
    }

    #[derive(Clone)]
    struct Shelf;

    impl Service for Shelf {
        const NAME: &'static str = "shelf";
        type Settings = Limits;

        async fn open(_: Resources<Limits>) -> anyhow::Result<Self> {
            Ok(Self)
        }

        fn add_to(self, server: Server) -> Server {
            server
        }
    }

    #[test]
    fn a_bad_service_section_is_reported_with_the_platform_errors_before_anything_is_bound() {
        let env = Env::default()
            .with("KEEL_GRPC__DRAIN_TIMEOUT", "soon")
            .with("KEEL_SHELF__MAX_ITEMS", "0");
        let keys: Vec<String> = App::of::<Shelf>()
            .settings(&env)
            .unwrap_err()
            .0
            .into_iter()
            .map(|e| e.key)
            .collect();
        assert_eq!(keys, ["grpc.drain_timeout", "shelf.max_items"]);

        let env = Env::default().with("KEEL_SHELF__MAX_ITEMS", "many");
        let err = App::of::<Shelf>().settings(&env).unwrap_err();
        assert_eq!(err.0[0].key, "shelf", "{err}");

        let ok = Env::default()
            .with("KEEL_SHELF__MAX_ITEMS", "3")
            .with(
                "KEEL_DATABASE__URL",
                "postgres://kv:hunter2@db:5432/{service}",
            )
            .with("CONSUL_HTTP_TOKEN", "s3cret");
        let app = App::of::<Shelf>();
        let report = app.effective(&app.settings(&ok).unwrap());
        let value = |key: &str| {
            report
                .iter()
                .find(|(k, _)| k == key)
                .map(|(_, v)| v.clone())
                .unwrap_or_else(|| panic!("{key} missing from {report:?}"))
        };
        assert_eq!(value("shelf.max_items"), "3");
        assert_eq!(value("database.url"), "postgres://kv:***@db:5432/{service}");
        assert_eq!(value("consul.token"), "<redacted>");
        assert_eq!(value("grpc.drain_timeout"), "10s");
        let text = format!("{report:?}");
        assert!(
            !text.contains("hunter2") && !text.contains("s3cret"),
            "{text}"
        );
    }

    #[test]
    fn an_app_default_applies_only_where_the_environment_is_silent() {
        let app = App::of::<Shelf>().default_env("KEEL_GRPC__LISTEN_ADDR", "127.0.0.1:50101");
        let ok = Env::default().with("KEEL_SHELF__MAX_ITEMS", "1");
        assert_eq!(app.settings(&ok).unwrap().grpc.listen_addr.port(), 50101);
        let set = ok.with("KEEL_GRPC__LISTEN_ADDR", "127.0.0.1:7");
        assert_eq!(app.settings(&set).unwrap().grpc.listen_addr.port(), 7);
    }
}
