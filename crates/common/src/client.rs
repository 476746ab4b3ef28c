//! The client channel factory: given only a service name, a channel that finds the service's instances through
//! Consul DNS (or the static list) and balances calls across them.
//!
//! The stack of one [`Channel`], outermost first, and why each layer sits where it does:
//! 1. [`ClientContextLayer`](crate::layers::ClientContextLayer): trace id and the remaining deadline go out as metadata; the deadline also bounds
//!    the wait for a ready endpoint, so a call never hangs past it.
//! 2. [`GrpcMetricsLayer`](crate::layers::GrpcMetricsLayer) (client side): count, latency, status per method, as the caller experiences them.
//! 3. errors of the layers below become UNAVAILABLE statuses, so callers see one error type.
//!
//!    Then [`CompressionLayer`](crate::layers::CompressionLayer): `grpc-accept-encoding: gzip` out, gzip
//!    answers decompressed, requests compressed for `client.gzip` targets; below the metrics, so they see the
//!    call as the typed client does.
//! 4. no-endpoint fast path: when discovery answered and found no healthy instance, fail fast with UNAVAILABLE;
//!    a call made before the first answer waits for it (within its deadline) and then decides.
//! 5. the picker ([`crate::routing`]): each call goes where the load-balancing policy of the target's service
//!    config says (`loadBalancingConfig`), else the channel's default — p2c for [`ClientFactory::channel`],
//!    key affinity for [`ClientFactory::keyed_channel`]:
//!    - p2c: the less loaded of two random endpoints (power of two choices), by a peak-sensitive moving
//!      average of round-trip time times outstanding requests;
//!    - `round_robin`, `pick_first`, `key_affinity`: picked from the discovered list itself.
//! 6. per endpoint, [`Ejecting`](crate::layers::Ejecting): after a transport failure the endpoint reports not-ready for a backoff
//!    (1 s doubling to 30 s), so every policy of the picker stops picking it (key affinity hands its keys to the
//!    next instance); after the backoff one call tries it again (half-open), and success brings it back. It
//!    never returns an error from `poll_ready`: an endpoint leaves only when discovery says so.
//! 7. a lazily connecting `tonic` channel per endpoint, shared by every policy (switching opens no connection).
//!
//! Endpoint sets come from [`discovery::watch`]: added instances are inserted, vanished ones removed.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    convert::Infallible,
    net::SocketAddr,
    sync::Arc,
    time::Duration,
};

use http::{Request, Response};
use tokio::sync::watch;
use tonic::body::Body;
use tower::{BoxError, Service, ServiceBuilder, util::BoxCloneSyncService};

use crate::{
    config::{Reader, Settings},
    connect::{Dial, connect},
    discovery::{self, Source, SrvResolver},
    layers::{
        ClientContextLayer, CompressionLayer, ErrorToStatusLayer, GrpcMetricsLayer,
        MethodConfigLayer, NoEndpointFastFail, TransparentRetryLayer,
    },
    live::{LiveCount, LiveDuration, LiveSettings},
    metrics::{Metrics, Side},
    retry::{RetryBudget, RetryPolicy},
    routing::Picker,
    service_config::{LbPolicy, ServiceConfigs},
};

/// Every target's service config JSON with its origin: the caller's `client.service_config`, then what Consul
/// KV publishes (`keel/<target>/service-config`), which wins.
fn config_sources(s: &Settings) -> Vec<(&str, &str, String)> {
    let own = s
        .client
        .service_config
        .iter()
        .map(|(t, j)| (t.as_str(), j.as_str(), format!("client.service_config.{t}")));
    let kv = s.kv().service_configs.iter().map(|(t, j)| {
        (
            t.as_str(),
            j.as_str(),
            crate::config::KvSettings::kv_key(t, "service-config"),
        )
    });
    own.chain(kv).collect()
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
    /// Services every call to which waits, within its deadline, for an instance to appear instead of failing
    /// UNAVAILABLE when there is none (gRPC's wait-for-ready; `client.wait_for_ready`, comma separated, `*`
    /// for all; default none: fail fast). One call can ask with [`crate::WaitForReady`].
    pub wait_for_ready: Vec<String>,
    /// Default gRPC service configs by target (`[client.service_config]` in the file, `echo = '{…}'`: A2
    /// JSON), used when Consul KV publishes none for the target ([`crate::service_config`]).
    pub service_config: BTreeMap<String, String>,
    /// Services whose requests are sent gzip-compressed (`client.gzip`, comma separated, `*` for all; default
    /// none). Compressed answers are accepted from every service.
    pub gzip: Vec<String>,
    /// HTTP/2 PING interval on every connection, idle ones included (`client.keepalive_interval`, default 30 s).
    pub keepalive_interval: Duration,
    /// How long a PING may go unanswered before the connection is closed (`client.keepalive_timeout`, 10 s).
    pub keepalive_timeout: Duration,
    /// A connection no call has used for this long is closed, and reopened by the next call
    /// (`client.idle_timeout`, default 5 min; `0s`: never).
    pub idle_timeout: Duration,
}

impl ClientSettings {
    /// Reads the `client` section.
    pub fn read(r: &mut Reader) -> Self {
        let mut static_endpoints = HashMap::new();
        let raw = r.opt_string("client.static_endpoints").unwrap_or_default();
        for entry in raw.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            match parse_static_entry(entry) {
                Ok((svc, addrs)) => {
                    static_endpoints.insert(svc, addrs);
                }
                Err(msg) => r.fail("client.static_endpoints", msg),
            }
        }
        Self {
            default_timeout: r.duration("client.default_timeout", Duration::from_secs(10)),
            connect_timeout: r.duration("client.connect_timeout", Duration::from_secs(1)),
            max_attempts: r.positive("client.max_attempts", 3u32),
            static_endpoints,
            wait_for_ready: r.list("client.wait_for_ready"),
            gzip: r.list("client.gzip"),
            service_config: r.string_map("client.service_config"),
            keepalive_interval: nonzero(r, "client.keepalive_interval", Duration::from_secs(30)),
            keepalive_timeout: nonzero(r, "client.keepalive_timeout", Duration::from_secs(10)),
            idle_timeout: r.duration("client.idle_timeout", Duration::from_secs(300)),
        }
    }
}

/// A duration that must not be zero.
fn nonzero(r: &mut Reader, key: &str, default: Duration) -> Duration {
    let d = r.duration(key, default);
    if d.is_zero() {
        r.fail(key, "must be more than 0s");
    }
    d
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

/// A balanced, discovered channel to one service; give it to a generated client (`EchoClient::new(channel)`).
/// It never fails as a service: every failure arrives as a gRPC status in the response.
pub type Channel = BoxCloneSyncService<Request<Body>, Response<Body>, Infallible>;

/// Why a channel could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Consul DNS is off and `client.static_endpoints` has no entry for the service.
    #[error(
        "no endpoints configured for service {0:?}: enable Consul DNS or set client.static_endpoints"
    )]
    NoEndpoints(String),
    /// The client TLS files (`tls.ca_file`, `tls.cert_file`, `tls.key_file`) cannot be used.
    #[error("client TLS: {0}")]
    Tls(String),
}

/// Makes [`Channel`]s; one per process, cheap to clone.
#[derive(Clone, Debug)]
pub struct ClientFactory {
    settings: Arc<Settings>,
    /// `client.default_timeout`, changed live by [`Self::follow`].
    default_timeout: LiveDuration,
    /// `client.max_attempts`, changed live by [`Self::follow`].
    max_attempts: LiveCount,
    /// Every target's service config, replaced by [`Self::follow`].
    configs: ServiceConfigs,
    metrics: Metrics,
    resolver: Option<SrvResolver>,
    budget: Arc<RetryBudget>,
    /// `Ok(None)`: plaintext; `Err`: the TLS files could not be read (reported by [`Self::channel`]).
    tls: Result<Option<tonic::transport::ClientTlsConfig>, String>,
}

impl ClientFactory {
    /// A factory using Consul DNS when `consul.dns_enabled`, else `client.static_endpoints`.
    pub fn new(settings: &Settings, metrics: Metrics) -> Self {
        let resolver = settings
            .consul
            .dns_enabled
            .then(|| SrvResolver::new(settings.consul.dns_addr));
        Self {
            settings: Arc::new(settings.clone()),
            default_timeout: LiveDuration::new(settings.client.default_timeout),
            max_attempts: LiveCount::new(settings.client.max_attempts),
            configs: {
                let c = ServiceConfigs::default();
                c.update(config_sources(settings));
                c
            },
            metrics,
            resolver,
            budget: Arc::new(RetryBudget::default()),
            tls: crate::tls::client_config(&settings.tls).map_err(|e| e.to_string()),
        }
    }

    /// The retry policy for calls made through this factory's channels (one shared budget per process; its
    /// attempts follow `client.max_attempts` live).
    pub fn retry_policy(&self) -> RetryPolicy {
        RetryPolicy::live(self.max_attempts.clone(), self.budget.clone())
    }

    /// Keeps `client.default_timeout`, `client.max_attempts` and the targets' service configs of every
    /// channel and policy made by this factory, before or after, in step with `live` (Consul KV). Must be called inside a Tokio runtime.
    pub fn follow(&self, live: &LiveSettings) {
        let mut changes = live.changes();
        let (timeout, attempts, configs) = (
            self.default_timeout.clone(),
            self.max_attempts.clone(),
            self.configs.clone(),
        );
        tokio::spawn(async move {
            while changes.changed().await.is_ok() {
                let s = changes.borrow_and_update().clone();
                timeout.set(s.client.default_timeout);
                attempts.set(s.client.max_attempts);
                configs.update(config_sources(&s));
            }
        });
    }

    /// A channel to Consul service `service`. Must be called inside a Tokio runtime.
    ///
    /// # Errors
    /// [`ClientError::NoEndpoints`] when Consul DNS is off and no static list names the service.
    pub fn channel(&self, service: &str) -> Result<Channel, ClientError> {
        let endpoints = self.watch(service)?;
        self.tls.as_ref().map_err(|e| ClientError::Tls(e.clone()))?;
        Ok(self.balanced(service, endpoints))
    }

    /// A channel to Consul service `service` that sends each call to the instance owning its routing key
    /// ([`crate::routing`]: rendezvous hashing over the discovered instances), for sharded services: the
    /// channel of [`Self::channel`] with key affinity as its default load-balancing policy. While a key's owner
    /// is ejected (its connection refused or reset: it crashed, or is leaving), the key's calls go to the next
    /// instance in rendezvous order ([`crate::routing::owner_among`]); once discovery drops it, that one is
    /// the owner. A call to an owner that does not answer at all (a machine cut off) fails at its deadline.
    ///
    /// # Errors
    /// As [`Self::channel`].
    pub fn keyed_channel(&self, service: &str) -> Result<Channel, ClientError> {
        let endpoints = self.watch(service)?;
        self.tls.as_ref().map_err(|e| ClientError::Tls(e.clone()))?;
        Ok(self.picked(service, endpoints, LbPolicy::KeyAffinity))
    }

    /// The layers every channel of this factory shares (1–3 of the module docs: method config, client context,
    /// metrics, transparent retry, errors to statuses, compression) on top of `routing`, what picks the endpoint:
    /// the one place the client stack is assembled. `endpoints` are the target's instances as discovery
    /// publishes them (`None` until its first answer), which transparent retries consult. [`Self::channel`]
    /// puts it over the picker; benches and tests can put it over a service of their own (an in-process
    /// server).
    pub fn stack<S>(
        &self,
        service: &str,
        endpoints: watch::Receiver<Option<Vec<SocketAddr>>>,
        routing: S,
    ) -> Channel
    where
        S: Service<Request<Body>, Response = Response<Body>> + Clone + Send + Sync + 'static,
        S::Future: Send + 'static,
        S::Error: Into<BoxError>,
    {
        let svc = ServiceBuilder::new()
            .layer(MethodConfigLayer::new(self.configs.clone(), service))
            .layer(ClientContextLayer::live(self.default_timeout.clone()))
            .layer(GrpcMetricsLayer::new(
                self.metrics.clone(),
                Side::Client,
                HashSet::new(),
            ))
            .layer(TransparentRetryLayer::new(self.budget.clone()).with_endpoints(endpoints))
            .layer(ErrorToStatusLayer)
            .layer(CompressionLayer::new(
                self.settings
                    .client
                    .gzip
                    .iter()
                    .any(|s| s == "*" || s == service),
            ))
            .service(routing);
        BoxCloneSyncService::new(svc)
    }

    /// How this factory dials endpoints (`client.*`, TLS; a TLS configuration that failed to load is reported
    /// by [`Self::channel`] before any dialling).
    fn dial(&self) -> Dial {
        let c = &self.settings.client;
        Dial {
            connect_timeout: c.connect_timeout,
            keepalive_interval: c.keepalive_interval,
            keepalive_timeout: c.keepalive_timeout,
            idle_timeout: c.idle_timeout,
            tls: self.tls.clone().ok().flatten(),
        }
    }

    fn watch(
        &self,
        service: &str,
    ) -> Result<watch::Receiver<Option<Vec<SocketAddr>>>, ClientError> {
        let source = match (
            &self.resolver,
            self.settings.client.static_endpoints.get(service),
        ) {
            (Some(r), _) => Source::Consul(Box::new(r.clone())),
            (None, Some(list)) => Source::Static(list.clone()),
            (None, None) => return Err(ClientError::NoEndpoints(service.to_owned())),
        };
        Ok(discovery::watch(
            service.to_owned(),
            source,
            self.settings.consul.discovery_interval,
        ))
    }

    /// A channel over the endpoints published by `endpoints` (tests and custom discovery).
    pub fn balanced(
        &self,
        service: &str,
        endpoints: watch::Receiver<Option<Vec<SocketAddr>>>,
    ) -> Channel {
        self.picked(service, endpoints, LbPolicy::P2c)
    }

    /// The channel over `endpoints` whose calls go where their load-balancing policy says: the target's
    /// service config's, else `default`.
    fn picked(
        &self,
        service: &str,
        endpoints: watch::Receiver<Option<Vec<SocketAddr>>>,
        default: LbPolicy,
    ) -> Channel {
        let dial = self.dial();
        let picker = Picker::new(
            service,
            endpoints.clone(),
            Arc::new(move |addr| connect(addr, &dial)),
            default,
        );
        let wait = &self.settings.client.wait_for_ready;
        let wait_for_ready = wait.iter().any(|s| s == "*" || s == service);
        self.stack(
            service,
            endpoints.clone(),
            NoEndpointFastFail::new(picker, endpoints, Arc::from(service), wait_for_ready),
        )
    }
}
