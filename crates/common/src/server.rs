//! The gRPC server: the one place where the server stack is assembled, and the shutdown sequence.
//!
//! ```ignore
//! Server::builder(&platform).add_service(EchoServer::new(handler)).serve(listener, shutdown::signal()).await
//! ```
//!
//! Every service gets: `grpc.health.v1` (NOT_SERVING until the port is bound and every readiness check passes,
//! re-checked every 5 s), server reflection (v1 and v1alpha, so `grpcurl list/describe` work), gzip requests
//! (and answers, to callers that compress, or to all with `grpc.gzip_responses`), message size
//! limits, HTTP/2 keepalive, `max_connection_age`, a global concurrency limit with load shedding, per-RPC
//! metrics, trace ids and deadlines, and Consul registration when Consul is configured.
//!
//! Shutdown order (Kratos, Linkerd and go-kit converged on it): health NOT_SERVING → Consul deregister → wait
//! one discovery interval and [`DISCOVERY_GRACE`] (clients re-resolve and stop sending) → stop accepting → drain in-flight calls, at
//! most `grpc.drain_timeout`, then end the calls still running with UNAVAILABLE → flush metrics. Logs are flushed by the caller ([`crate::run`]) last.

use std::{
    collections::HashSet, convert::Infallible, future::Future, net::SocketAddr, pin::Pin,
    sync::Arc, time::Duration,
};

use http::{Request, Response};
use keel_protos::ServerCodec;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::{
    body::Body, server::NamedService, service::RoutesBuilder, transport::server::TcpIncoming,
};
use tonic_health::{ServingStatus, server::HealthReporter};
use tower::{
    Service, ServiceBuilder,
    layer::util::{Identity, Stack},
};

use crate::{
    Platform,
    config::Reader,
    consul::{ConsulAgent, Instance, Registrar},
    layers::{
        AnswerEncodingLayer, ConcurrencyLimitLayer, DeadlineLayer, GrpcMetricsLayer, Readiness,
        ReadinessGateLayer, ServerContextLayer,
    },
    metrics::{Metrics, Side},
};

/// The gRPC server: address, HTTP/2 and resource limits, shutdown.
#[derive(Clone, Debug)]
pub struct GrpcSettings {
    /// Address to bind (`grpc.listen_addr`), default `127.0.0.1:0` (any free port).
    pub listen_addr: SocketAddr,
    /// Address announced to Consul (`grpc.advertise_addr`); default: the bound address, or bound to `0.0.0.0`,
    /// the address of the interface that routes to the Consul agent (a container's own address, not loopback).
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
    /// Whether answers are gzip-compressed for every caller that accepts gzip (`grpc.gzip_responses`), not only
    /// for the callers that compressed their request (default false). Compressing costs more than small
    /// messages gain (tonic makes a new gzip encoder, ~300 KB of zeroed state, per compressed message); turn
    /// it on for a service whose responses are large and compressible. Compressed requests are always accepted.
    pub gzip_responses: bool,
}

impl GrpcSettings {
    /// Reads the `grpc` section.
    pub fn read(r: &mut Reader) -> Self {
        Self {
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
            gzip_responses: r.bool("grpc.gzip_responses", false),
        }
    }
}

/// A readiness check: `Ok` when a dependency answers, `Err(why)` when it does not.
pub type ReadinessCheck =
    Arc<dyn Fn() -> Pin<Box<dyn Future<Output = Result<(), String>> + Send>> + Send + Sync>;

/// The server's tower stack, outermost first: [`ServerContextLayer`], [`GrpcMetricsLayer`],
/// [`ReadinessGateLayer`], [`DeadlineLayer`], [`ConcurrencyLimitLayer`], [`AnswerEncodingLayer`] (what each does:
/// [`crate::layers`]).
pub type ServerStack = Stack<
    AnswerEncodingLayer,
    Stack<
        ConcurrencyLimitLayer,
        Stack<
            DeadlineLayer,
            Stack<ReadinessGateLayer, Stack<GrpcMetricsLayer, Stack<ServerContextLayer, Identity>>>,
        >,
    >,
>;

/// What [`stack`] is made of besides the settings, each shared with whoever drives it.
pub struct StackParts<'a> {
    /// `grpc.request_timeout` (the deadline of a call without `grpc-timeout`) and `grpc.gzip_responses`.
    pub settings: &'a GrpcSettings,
    /// Where the calls are counted.
    pub metrics: Metrics,
    /// The services served, by full name (`keel.example.v1.Echo`): calls to any other path are counted as
    /// `unknown.unknown`, so made-up paths cannot make metrics without bound.
    pub known: HashSet<String>,
    /// What the readiness checks last found.
    pub readiness: Readiness,
    /// Cancelled when the drain timeout passes: calls still running end with UNAVAILABLE.
    pub closing: CancellationToken,
    /// The concurrency limit, kept by the caller to follow `grpc.max_concurrent_requests` live.
    pub limit: ConcurrencyLimitLayer,
}

/// The server stack every service runs, assembled here only ([`Server::serve`] uses it; the per-call allocation
/// tests and `keel-bench layers` drive it in process).
///
/// Outermost first. Context first, so even shed calls carry a trace id in logs; metrics before the deadline
/// layer, so a call it ends (deadline, drain's end) is recorded with the status the client got, and before the
/// limit, so shed calls are counted as RESOURCE_EXHAUSTED; the deadline bounds the whole response stream; the
/// readiness gate before it, so a call refused for a dependency that is down is counted and never waits; the
/// limit sheds (never queues) and holds a slot until the response's last message; last, the choice of who gets
/// gzip answers, next to the codecs that compress.
pub fn stack(parts: StackParts<'_>) -> ServerStack {
    let g = parts.settings;
    ServiceBuilder::new()
        .layer(ServerContextLayer::new(g.request_timeout))
        .layer(GrpcMetricsLayer::new(
            parts.metrics,
            Side::Server,
            parts.known,
        ))
        .layer(ReadinessGateLayer::new(parts.readiness))
        .layer(DeadlineLayer::new(g.request_timeout, parts.closing))
        .layer(parts.limit)
        .layer(AnswerEncodingLayer::new(g.gzip_responses))
        .into_inner()
}
/// Collects a process's gRPC services, then serves them.
pub struct Server {
    platform: Platform,
    routes: RoutesBuilder,
    names: Vec<&'static str>,
    checks: Vec<(String, ReadinessCheck)>,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("services", &self.names)
            .finish()
    }
}

impl Server {
    /// A server for `platform`'s settings, with no services yet.
    pub fn builder(platform: &Platform) -> Self {
        Self {
            platform: platform.clone(),
            routes: RoutesBuilder::default(),
            names: Vec::new(),
            checks: Vec::new(),
        }
    }

    /// Adds a generated tonic server (`FooServer::new(handler)`); gzip (who gets compressed answers:
    /// [`crate::layers::AnswerEncodingLayer`]) and the configured size limits are applied here.
    pub fn add_service<S>(mut self, svc: S) -> Self
    where
        S: ServerCodec
            + Service<Request<Body>, Response = Response<Body>, Error = Infallible>
            + NamedService
            + Clone
            + Send
            + Sync
            + 'static,
        S::Future: Send + 'static,
    {
        let g = &self.platform.settings.grpc;
        self.routes.add_service(
            svc.gzip(true)
                .limits(g.max_request_bytes, g.max_response_bytes),
        );
        self.names.push(S::NAME);
        self
    }

    /// Adds a readiness check (a database ping, say): health stays NOT_SERVING while any check fails.
    pub fn readiness<F, Fut>(mut self, name: &str, check: F) -> Self
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), String>> + Send + 'static,
    {
        self.checks
            .push((name.to_owned(), Arc::new(move || Box::pin(check()))));
        self
    }

    /// Serves on `listener` until `shutdown` resolves, then shuts down in order (see the module docs).
    ///
    /// # Errors
    /// The reflection service cannot be built, or the server fails while accepting.
    pub async fn serve(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()>,
    ) -> anyhow::Result<()> {
        let Server {
            platform,
            mut routes,
            names,
            checks,
        } = self;
        let settings = &platform.settings;
        let g = &settings.grpc;
        let local = listener.local_addr()?;

        let (reporter, health_service) = tonic_health::server::health_reporter();
        let health = Health {
            reporter,
            names: names.clone(),
            serving: tokio::sync::watch::Sender::new(false),
        };
        health.set(false).await;
        routes.add_service(health_service);
        routes.add_service(reflection(&names).build_v1()?);
        routes.add_service(reflection(&names).build_v1alpha()?);

        let mut known: HashSet<String> = names.iter().map(|n| n.to_string()).collect();
        known.insert("grpc.health.v1.Health".into());
        known.insert("grpc.reflection.v1.ServerReflection".into());
        known.insert("grpc.reflection.v1alpha.ServerReflection".into());
        let limit = ConcurrencyLimitLayer::new(g.max_concurrent_requests, g.request_timeout);
        // `grpc.max_concurrent_requests` follows the live settings (Consul KV).
        let mut changes = platform.live.changes();
        let follower = limit.clone();
        tokio::spawn(async move {
            while changes.changed().await.is_ok() {
                let max = changes.borrow_and_update().grpc.max_concurrent_requests;
                follower.set_max(max);
            }
        });
        // Cancelled when the drain timeout passes: calls still running end with UNAVAILABLE.
        let closing = CancellationToken::new();
        // What the readiness checks last found; calls are refused while one fails (from the first round, run as
        // the server starts: a call before it is served, as health still says NOT_SERVING to Consul).
        let readiness = Readiness::default();
        let stack = stack(StackParts {
            settings: g,
            metrics: platform.metrics.clone(),
            known,
            readiness: readiness.clone(),
            closing: closing.clone(),
            limit,
        });

        let mut builder = tonic::transport::Server::builder();
        if let Some(tls) = crate::tls::server_config(&settings.tls)? {
            // TLS only: a plaintext client is refused at the handshake.
            builder = builder.tls_config(tls)?;
        }
        let server = builder
            .http2_keepalive_interval(Some(g.keepalive_interval))
            .http2_keepalive_timeout(Some(g.keepalive_timeout))
            .max_connection_age(g.max_connection_age)
            .max_concurrent_streams(g.max_concurrent_streams)
            .layer(stack)
            .add_routes(routes.routes());

        let stop_accepting = CancellationToken::new();
        let stop = stop_accepting.clone();
        let mut serving = tokio::spawn(
            // The builder's tcp_nodelay applies only to sockets tonic accepts itself: set it on this listener's,
            // or every small answer waits for the peer's delayed ACK (Nagle), ~40 ms.
            server.serve_with_incoming_shutdown(
                TcpIncoming::from(listener).with_nodelay(Some(true)),
                async move { stop.cancelled().await },
            ),
        );
        tracing::info!(addr = %local, services = ?names, "grpc server listening");

        let background = CancellationToken::new();
        tokio::spawn(readiness_loop(
            health.clone(),
            checks,
            readiness,
            background.clone(),
        ));

        let registrar = match settings.consul.http_addr.as_ref() {
            None => None,
            Some(addr) => {
                let agent = ConsulAgent::new(addr, settings.consul.token.clone());
                let advertise = match &settings.grpc.advertise_addr {
                    Some(a) => a.clone(),
                    None => advertise_ip(local, addr, &agent).await,
                };
                Some((agent, advertise))
            }
        };
        let registrar = registrar.map(|(agent, advertise)| {
            let instance = Instance {
                name: settings.service.name.clone(),
                id: platform.instance_id.clone(),
                address: advertise,
                port: local.port(),
                version: settings.service.version.clone(),
                tags: settings.service.tags.clone(),
                tls: settings.tls.server_enabled(),
            };
            let r = Registrar::new(&settings.consul, agent, &instance);
            tokio::spawn(r.clone().run(Duration::from_secs(30), background.clone()));
            if r.needs_heartbeat() {
                tokio::spawn(
                    r.clone()
                        .heartbeat(health.serving.subscribe(), background.clone()),
                );
            }
            r
        });

        tokio::select! {
            _ = shutdown => {}
            res = &mut serving => {
                background.cancel();
                res??;
                anyhow::bail!("grpc server stopped unexpectedly");
            }
        }

        tracing::info!("shutdown: health NOT_SERVING");
        background.cancel();
        health.set(false).await;
        if let Some(r) = &registrar {
            r.deregister().await;
            let wait = settings.consul.discovery_interval + DISCOVERY_GRACE;
            tracing::info!(wait = ?wait, "shutdown: waiting for clients to re-resolve");
            tokio::time::sleep(wait).await;
        }
        tracing::info!(timeout = ?g.drain_timeout, "shutdown: draining in-flight calls");
        stop_accepting.cancel();
        if let Ok(res) = tokio::time::timeout(g.drain_timeout, &mut serving).await {
            res??;
        } else {
            tracing::warn!(timeout = ?g.drain_timeout, "shutdown: drain timed out; ending the remaining calls with UNAVAILABLE");
            closing.cancel();
            // Their statuses go out, then the connections close; a peer that does not read them is cut.
            if tokio::time::timeout(CLOSE_GRACE, &mut serving)
                .await
                .is_err()
            {
                tracing::warn!(grace = ?CLOSE_GRACE, "shutdown: connections still open; closing them");
                serving.abort();
            }
        }
        platform.metrics.flush();
        tracing::info!("shutdown: done");
        Ok(())
    }
}

/// How much longer than one discovery interval an instance leaving Consul keeps accepting calls: a client
/// looks its peers up again one interval after its last lookup *ended* (so every interval plus the lookup's
/// own time), and Consul's DNS may answer from a server a little behind the leader (stale reads, Consul's
/// default). Waiting exactly one interval raced the clients' next lookup: a call sent just before it reached
/// a closed listener (CI's rolling restart failed a cache Get so).
pub const DISCOVERY_GRACE: Duration = Duration::from_secs(1);

/// How long the statuses of the calls ended at the drain timeout get to reach their peers before the
/// connections are cut.
const CLOSE_GRACE: Duration = Duration::from_secs(1);

/// Reflection advertising exactly the services served here, plus health (and reflection itself).
fn reflection(names: &[&'static str]) -> tonic_reflection::server::Builder<'static> {
    let mut b = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(keel_protos::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .with_service_name("grpc.health.v1.Health");
    for n in names {
        b = b.with_service_name(*n);
    }
    b
}

/// The address peers reach this instance at: the bound one, or, bound to every interface (`0.0.0.0`), the
/// source address of the route to the Consul agent — the interface on the agent's network, which is what a
/// container or a machine with several interfaces must announce (not loopback); when that agent is on this
/// machine's loopback (every machine runs one), the address the agent advertises to its cluster. Found with a
/// connected UDP socket, which sends nothing; `127.0.0.1` when there is no route (a single-machine setup).
async fn advertise_ip(local: SocketAddr, agent_addr: &str, agent: &ConsulAgent) -> String {
    let routed = routed_ip(local, agent_addr);
    if routed.is_some_and(|ip| ip.is_loopback()) && local.ip().is_unspecified() {
        // The agent may be starting with this machine: ask for a while before settling for loopback.
        for _ in 0..20 {
            match agent.advertise_address().await {
                Ok(a) => return a,
                Err(e) => tracing::debug!(error = %e, "asking the consul agent for its address"),
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        tracing::warn!("the consul agent did not say its address; advertising loopback");
    }
    routed.map_or_else(|| "127.0.0.1".to_owned(), |ip| ip.to_string())
}

/// The bound address, or, bound to every interface, the source address of the route to the agent at
/// `agent_addr` (`None` when there is no route).
fn routed_ip(local: SocketAddr, agent_addr: &str) -> Option<std::net::IpAddr> {
    use std::net::ToSocketAddrs;
    if !local.ip().is_unspecified() {
        return Some(local.ip());
    }
    let hostport = agent_addr
        .trim_start_matches("http://")
        .trim_start_matches("https://");
    hostport
        .to_socket_addrs()
        .ok()
        .and_then(|mut a| a.find(SocketAddr::is_ipv4))
        .and_then(|target| {
            let s = std::net::UdpSocket::bind(("0.0.0.0", 0)).ok()?;
            s.connect(target).ok()?;
            s.local_addr().ok()
        })
        .map(|a| a.ip())
        .filter(|ip| !ip.is_unspecified())
}

/// The process's health: `grpc.health.v1` for the server (`""`) and each service, and a watch of it for the
/// Consul TTL heartbeat.
#[derive(Clone)]
struct Health {
    reporter: HealthReporter,
    names: Vec<&'static str>,
    serving: tokio::sync::watch::Sender<bool>,
}

impl Health {
    async fn set(&self, serving: bool) {
        let status = if serving {
            ServingStatus::Serving
        } else {
            ServingStatus::NotServing
        };
        self.reporter.set_service_status("", status).await;
        for n in &self.names {
            self.reporter.set_service_status(*n, status).await;
        }
        self.serving.send_replace(serving);
    }
}

/// How long one readiness check may take before it counts as failed (a database that does not answer is as
/// down as one that refuses).
const CHECK_TIMEOUT: Duration = Duration::from_secs(1);

/// SERVING once every check passes; re-checked every 500 ms, each check at most [`CHECK_TIMEOUT`], so a
/// dependency that goes away is seen within about half a second when it refuses (a database that stopped),
/// a second and a half when it stops answering: calls are then refused at once ([`ReadinessGateLayer`]) and
/// Consul's check turns the instance critical.
async fn readiness_loop(
    health: Health,
    checks: Vec<(String, ReadinessCheck)>,
    readiness: Readiness,
    cancel: CancellationToken,
) {
    let mut ready = false;
    loop {
        let mut failed = Vec::new();
        for (name, check) in &checks {
            match tokio::time::timeout(CHECK_TIMEOUT, check()).await {
                Ok(Ok(())) => {}
                Ok(Err(why)) => failed.push(format!("{name}: {why}")),
                Err(_) => failed.push(format!("{name}: no answer within {CHECK_TIMEOUT:?}")),
            }
        }
        let now_ready = failed.is_empty();
        if cancel.is_cancelled() {
            return;
        }
        readiness.set((!now_ready).then(|| failed.join("; ")));
        if now_ready != ready {
            if now_ready {
                tracing::info!("health SERVING");
            } else {
                tracing::warn!(failed = ?failed, "health NOT_SERVING: dependency not ready");
            }
            health.set(now_ready).await;
            ready = now_ready;
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_instance_bound_to_every_interface_announces_the_one_that_reaches_its_agent() {
        let any: SocketAddr = "0.0.0.0:5000".parse().unwrap();
        let loopback = Some(std::net::IpAddr::from([127, 0, 0, 1]));
        // An agent on loopback: the route says loopback, so the agent is asked (see `advertise_ip`).
        assert_eq!(routed_ip(any, "127.0.0.1:8500"), loopback);
        assert_eq!(routed_ip(any, "http://localhost:8500"), loopback);
        let bound: SocketAddr = "10.1.2.3:5000".parse().unwrap();
        assert_eq!(
            routed_ip(bound, "127.0.0.1:8500"),
            Some(bound.ip()),
            "a bound address is announced as it is"
        );
    }
}
