//! The platform every service stands on.
//!
//! A service's `main.rs` is one call:
//!
//! ```ignore
//! #[tokio::main]
//! async fn main() -> std::process::ExitCode {
//!     keel_common::run("echo", echo::build).await // async fn build(&Platform) -> anyhow::Result<Server>
//! }
//! ```
//!
//! [`run`] loads [`config::Settings`] (exit 2 with every bad key listed, before binding anything), binds the
//! listener, installs JSON logs shipped to Kafka ([`logs`]), creates the StatsD client ([`metrics`]), builds the
//! service, serves it with health, reflection, Consul registration and the server stack ([`server`]) until
//! SIGTERM/SIGINT, shuts down in order, flushes metrics and logs, and exits 0.
//! Outgoing calls go through [`client::ClientFactory`] (Consul DNS SRV discovery, p2c balancing, deadlines,
//! trace ids, retries). Errors become `tonic::Status` in one place: [`error`].
//!
//! Invariant: services reach Consul, Kafka and StatsD only through this crate.

pub mod client;
pub mod config;
pub mod consul;
pub mod context;
pub mod db;
pub mod discovery;
pub mod error;
pub mod events;
pub mod logs;
pub mod metrics;
pub mod outbox;
pub mod retry;
pub mod routing;
pub mod server;
pub mod shutdown;
#[cfg(feature = "testsuite")]
pub mod testsuite;
pub mod tls;

use std::{future::Future, process::ExitCode, sync::Arc, time::Duration};

pub use client::{Channel, ClientFactory};
pub use config::Settings;
pub use error::ServiceError;
pub use events::EventBus;
pub use metrics::Metrics;
pub use retry::{Idempotent, RetryPolicy};
pub use server::Server;

/// What a service is built from: its settings, its instance id, and handles on the platform's clients.
#[derive(Clone, Debug)]
pub struct Platform {
    /// The loaded settings.
    pub settings: Arc<Settings>,
    /// This instance's Consul service ID.
    pub instance_id: String,
    /// StatsD client.
    pub metrics: Metrics,
    /// Channels to other services.
    pub clients: ClientFactory,
    /// Domain events (Kafka, or in-process when no brokers are configured).
    pub events: EventBus,
}

impl Platform {
    /// The platform of one instance listening on `port`. Creates the StatsD client (metrics fall back to a
    /// disabled client, with a warning, when the StatsD address does not resolve) and the event bus.
    ///
    /// # Errors
    /// The Kafka producer of the event bus cannot be configured.
    pub fn new(settings: Settings, port: u16) -> anyhow::Result<Self> {
        let instance_id = settings
            .service
            .instance_id
            .clone()
            .unwrap_or_else(|| default_instance_id(&settings.service.name, port));
        let metrics = Metrics::new(&settings).unwrap_or_else(|e| {
            tracing::warn!(error = %e, "statsd unavailable; metrics disabled");
            Metrics::disabled()
        });
        let clients = ClientFactory::new(&settings, metrics.clone());
        let events = EventBus::new(&settings)?;
        Ok(Self {
            settings: Arc::new(settings),
            instance_id,
            metrics,
            clients,
            events,
        })
    }
}

/// `<service>-<host>-<port>-<4 hex>`: unique per instance, readable in Consul's UI.
pub fn default_instance_id(service: &str, port: u16) -> String {
    let host = gethostname::gethostname()
        .to_string_lossy()
        .replace(|c: char| !c.is_ascii_alphanumeric() && c != '-', "-");
    let nonce = &uuid::Uuid::new_v4().simple().to_string()[..4];
    format!("{service}-{host}-{port}-{nonce}")
}

/// Runs service `name` as a process: see the crate docs. `build` (an `async fn(&Platform)`) opens the service's
/// database, starts its background tasks and adds its gRPC services.
pub async fn run<F>(name: &str, build: F) -> ExitCode
where
    F: AsyncFnOnce(&Platform) -> anyhow::Result<Server>,
{
    run_until(name, build, shutdown::signal()).await
}

/// [`run`], with environment defaults for variables the process environment does not set (e.g.
/// `[("KEEL_GRPC__LISTEN_ADDR", "127.0.0.1:50101")]` for a process that has a well-known address).
pub async fn run_with_defaults<F>(name: &str, defaults: &[(&str, &str)], build: F) -> ExitCode
where
    F: AsyncFnOnce(&Platform) -> anyhow::Result<Server>,
{
    let mut env = config::Env::from_process();
    for (key, value) in defaults {
        if env.get(key).is_none() {
            env = env.with(*key, *value);
        }
    }
    run_in(
        name,
        Settings::from_env(name, &env),
        build,
        shutdown::signal(),
    )
    .await
}

/// Starts the server `build` makes for `settings` inside this process, on `grpc.listen_addr` (port 0: a free
/// port), serving in the background for the life of the runtime; returns the address it listens on. For tests,
/// benchmarks and embedding: unlike [`run`], it sets up no logging and handles no signal.
///
/// # Errors
/// The address cannot be bound, or the platform or `build` fails.
pub async fn spawn_server<F>(settings: Settings, build: F) -> anyhow::Result<std::net::SocketAddr>
where
    F: AsyncFnOnce(&Platform) -> anyhow::Result<Server>,
{
    let listener = tokio::net::TcpListener::bind(settings.grpc.listen_addr).await?;
    let addr = listener.local_addr()?;
    let platform = Platform::new(settings, addr.port())?;
    let server = build(&platform).await?;
    tokio::spawn(server.serve(listener, std::future::pending()));
    Ok(addr)
}

/// [`run`], stopping when `stop` resolves instead of on a signal.
pub async fn run_until<F>(name: &str, build: F, stop: impl Future<Output = ()>) -> ExitCode
where
    F: AsyncFnOnce(&Platform) -> anyhow::Result<Server>,
{
    run_in(name, Settings::load(name), build, stop).await
}

async fn run_in<F>(
    name: &str,
    settings: Result<Settings, config::ConfigErrors>,
    build: F,
    stop: impl Future<Output = ()>,
) -> ExitCode
where
    F: AsyncFnOnce(&Platform) -> anyhow::Result<Server>,
{
    let settings = match settings {
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
        .unwrap_or_else(|| default_instance_id(&settings.service.name, port));
    let telemetry = match logs::Telemetry::init(&settings, &instance_id) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("{name}: cannot set up log shipping (kafka.brokers): {e}");
            return ExitCode::from(2);
        }
    };
    for (key, value) in settings.effective() {
        tracing::info!(key, value = %value, "setting");
    }
    let mut settings = settings;
    settings.service.instance_id = Some(instance_id);
    let platform = match Platform::new(settings, port) {
        Ok(p) => p,
        Err(e) => {
            tracing::error!(error = ?e, "platform set-up failed");
            telemetry.shutdown();
            return ExitCode::from(2);
        }
    };
    let stats = telemetry.stats();
    platform
        .metrics
        .spawn_flusher(Duration::from_secs(1), move || stats.dropped());
    logs::spawn_drop_reporter(telemetry.stats(), Duration::from_secs(1));
    let code = match build(&platform).await {
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
