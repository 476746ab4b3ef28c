//! The platform every service stands on.
//!
//! A service's `main.rs` is one call:
//!
//! ```ignore
//! #[tokio::main]
//! async fn main() -> std::process::ExitCode {
//!     keel_common::run("echo", |platform| Ok(Server::builder(platform).add_service(EchoServer::new(Echo::new(platform))))).await
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
pub mod discovery;
pub mod error;
pub mod logs;
pub mod metrics;
pub mod retry;
pub mod server;
pub mod shutdown;

use std::{future::Future, process::ExitCode, sync::Arc, time::Duration};

pub use client::{Channel, ClientFactory};
pub use config::Settings;
pub use error::ServiceError;
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
}

impl Platform {
    /// The platform of one instance listening on `port`. Creates the StatsD client (metrics fall back to a
    /// disabled client, with a warning, when the StatsD address does not resolve).
    pub fn new(settings: Settings, port: u16) -> Self {
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
        Self {
            settings: Arc::new(settings),
            instance_id,
            metrics,
            clients,
        }
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

/// Runs service `name` as a process: see the crate docs. `build` adds the service's gRPC services.
pub async fn run<F>(name: &str, build: F) -> ExitCode
where
    F: FnOnce(&Platform) -> anyhow::Result<Server>,
{
    run_until(name, build, shutdown::signal()).await
}

/// [`run`], stopping when `stop` resolves instead of on a signal.
pub async fn run_until<F>(name: &str, build: F, stop: impl Future<Output = ()>) -> ExitCode
where
    F: FnOnce(&Platform) -> anyhow::Result<Server>,
{
    let settings = match Settings::load(name) {
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
    let platform = Platform::new(settings, port);
    let stats = telemetry.stats();
    platform
        .metrics
        .spawn_flusher(Duration::from_secs(1), move || stats.dropped());
    logs::spawn_drop_reporter(telemetry.stats(), Duration::from_secs(1));
    let code = match build(&platform) {
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
