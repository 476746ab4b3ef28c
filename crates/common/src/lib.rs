//! The platform every service stands on.
//!
//! A service is declared once ([`Service`]: name, settings section, storage, consumed topics, handlers) and its
//! `main.rs` is one call:
//!
//! ```ignore
//! #[tokio::main]
//! async fn main() -> std::process::ExitCode {
//!     keel_common::App::of::<echo::Echo>().run().await
//! }
//! ```
//!
//! [`App::run`] loads [`config::Settings`] and every service's section (exit 2 with every bad key listed,
//! before binding anything), binds the listener, installs JSON logs shipped to Kafka ([`logs`]), creates the StatsD client ([`metrics`]), builds the
//! service, serves it with health, reflection, Consul registration and the server stack ([`server`]) until
//! SIGTERM/SIGINT, shuts down in order, flushes metrics and logs, and exits 0.
//! Outgoing calls go through [`client::ClientFactory`] (Consul DNS SRV discovery, p2c balancing, deadlines,
//! trace ids, retries). Errors become `tonic::Status` in one place: [`error`].
//!
//! Invariant: services reach Consul, Kafka and StatsD only through this crate.

pub mod client;
pub mod config;
mod connect;
pub mod consul;
pub mod context;
pub mod db;
pub mod discovery;
pub mod error;
pub mod events;
pub mod layers;
pub mod limits;
pub mod live;
pub mod logs;
pub mod memory;
pub mod metrics;
pub mod outbox;
pub mod retry;
pub mod routing;
pub mod server;
pub mod service;
pub mod service_config;
pub mod shutdown;
#[cfg(feature = "testsuite")]
pub mod testsuite;
pub mod tls;
pub mod tokens;

use std::sync::Arc;

pub use client::{Channel, ClientFactory};
pub use config::Settings;
pub use error::ServiceError;
pub use events::EventBus;
pub use layers::WaitForReady;
pub use metrics::Metrics;
pub use retry::{Idempotent, RetryPolicy};
pub use server::Server;
pub use service::{App, Resources, Service, Storage};

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
    /// The settings as they are now: `settings` with what Consul KV changed since ([`live`]); fixed when the
    /// process does not watch Consul KV.
    pub live: live::LiveSettings,
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
        let settings = Arc::new(settings);
        Ok(Self {
            live: live::LiveSettings::fixed(settings.clone()),
            settings,
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
