//! `keel-bench layers`: what each layer of the server and client stacks costs per call, one by one, in process.
//! Server side: unary Echo calls go through each layer alone around the bare handler, then through the whole
//! stack as [`keel_common::server::stack`] assembles it, as tonic's server hands requests on
//! ([`keel_common::testsuite::calls`]). Client side: the generated client calls the bare handler through each
//! client layer alone, then through the p2c balancer over two endpoints (each the handler), then through the
//! whole client stack ([`keel_common::ClientFactory::stack`]) over that balancer. No socket and no HTTP/2; the
//! platform's logging subscriber writes its lines to a sink (stdout's writer thread, minus the `write(2)`).
//!
//! Columns, each the fastest of `--rounds` rounds (rows interleaved, so the machine's swings hit every row
//! alike): nanoseconds per call on one thread, and CPU nanoseconds per call of the process when 32 tasks on two
//! worker threads make the calls, each through a clone of the service (as hyper makes one per request) or of
//! the client (as callers clone a channel), what shared state costs: a lock or a reference count every worker
//! touches. Each with its ratio to its side's baseline and what the layer adds. The allocations each layer
//! adds per call are counted, and held, by keel-common's `allocations` test.

use std::{
    collections::HashSet,
    future::Future,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use keel_common::service_config::ServiceConfigs;
use keel_common::{
    ClientFactory, Metrics, Settings,
    config::Env,
    layers::{
        AnswerEncodingLayer, ClientContextLayer, CompressionLayer, ConcurrencyLimitLayer,
        DeadlineLayer, ErrorToStatusLayer, GrpcMetricsLayer, MethodConfigLayer, NoEndpointFastFail,
        Readiness, ReadinessGateLayer, ServerContextLayer, TransparentRetryLayer,
    },
    logs::Telemetry,
    metrics::Side,
    routing::Picker,
    server::{self, StackParts},
    testsuite::calls,
};
use keel_protos::keel::example::v1::{
    EchoRequest, echo_client::EchoClient, echo_server::EchoServer,
};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tonic::body::Body;
use tower::{Layer, Service};
use tracing::instrument::WithSubscriber;

use crate::bare::BareEcho;

/// Options of `keel-bench layers`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Calls per row and round (after 2,000 to warm up).
    #[arg(long, default_value_t = 50_000)]
    calls: u64,
    /// Rounds; a row's figure is its fastest.
    #[arg(long, default_value_t = 7)]
    rounds: usize,
    /// Only the rows whose name contains this text, and the baselines (e.g. `client:`, for a profile).
    #[arg(long)]
    only: Option<String>,
}

const PATH: &str = "/keel.example.v1.Echo/Echo";
const TIMEOUT: Duration = Duration::from_secs(30);
const CALL_LOG: &str = "info";
const NO_CALL_LOG: &str = "info,keel::calls=warn";

fn settings(log_level: &str) -> anyhow::Result<Settings> {
    Ok(Settings::from_env(
        "echo",
        &Env::from_pairs([("KEEL_LOG__LEVEL", log_level), ("KEEL_LOG__STDOUT", "true")]),
    )?)
}

fn handler() -> EchoServer<BareEcho> {
    EchoServer::new(BareEcho)
}

fn known() -> HashSet<String> {
    HashSet::from(["keel.example.v1.Echo".to_owned()])
}

fn metrics() -> GrpcMetricsLayer {
    GrpcMetricsLayer::new(Metrics::disabled(), Side::Server, known())
}

fn client_metrics() -> GrpcMetricsLayer {
    GrpcMetricsLayer::new(Metrics::disabled(), Side::Client, HashSet::new())
}

/// [`calls::ENDPOINTS`], as discovery publishes them (the list stays when its sender is gone).
fn endpoints() -> watch::Receiver<Option<Vec<SocketAddr>>> {
    watch::channel(Some(calls::ENDPOINTS.to_vec())).1
}

/// The channel's picker by p2c over two endpoints ([`calls::balanced`]), each the bare handler. Made inside a
/// Tokio runtime.
fn balanced() -> Picker<EchoServer<BareEcho>> {
    calls::balanced(handler)
}

fn stack(settings: &Settings) -> server::ServerStack {
    server::stack(StackParts {
        settings: &settings.grpc,
        metrics: Metrics::disabled(),
        known: known(),
        readiness: Readiness::default(),
        closing: CancellationToken::new(),
        limit: ConcurrencyLimitLayer::new(settings.grpc.max_concurrent_requests, TIMEOUT),
    })
}

/// Calls made the same way for every row: `n` unary Echo calls one after another, each answer read to its end.
trait Calls: Clone + Send + Sync + 'static {
    /// Makes `n` calls; fails on the first that fails or does not end OK.
    fn calls(&mut self, n: u64) -> impl Future<Output = anyhow::Result<()>> + Send;
}

/// A server-side row: requests as tonic's server hands them on ([`calls::unary`]) into `S`.
#[derive(Clone)]
struct Serve<S>(S);

impl<S: Shared> Calls for Serve<S> {
    async fn calls(&mut self, n: u64) -> anyhow::Result<()> {
        let request = echo_request();
        calls::repeat(&mut self.0, n, || calls::unary(PATH, &request))
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))
    }
}

/// A client-side row: calls through the generated client over `S`, which ends in the server's handler in
/// process (the request encoded by tonic's client, decoded by its server; no socket, no HTTP/2).
#[derive(Clone)]
struct Call<S>(EchoClient<S>);

impl<S> Calls for Call<S>
where
    S: Shared + tonic::client::GrpcService<Body, ResponseBody = Body>,
    <S as tonic::client::GrpcService<Body>>::Future: Send,
{
    async fn calls(&mut self, n: u64) -> anyhow::Result<()> {
        for _ in 0..n {
            self.0.echo(echo_request()).await?;
        }
        Ok(())
    }
}

fn echo_request() -> EchoRequest {
    EchoRequest {
        message: "bench".into(),
        ..Default::default()
    }
}

/// Nanoseconds per call over `calls` calls of the caller `make` gives (made inside the runtime), on a
/// current-thread runtime under the platform's logging subscriber at `log_level`.
fn time_per_call<C: Calls>(
    log_level: &str,
    make: impl Fn() -> C,
    calls: u64,
) -> anyhow::Result<f64> {
    let (dispatch, telemetry) =
        Telemetry::to_writer(&settings(log_level)?, "echo-1", std::io::sink())?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let timed = tracing::dispatcher::with_default(&dispatch, || {
        let mut caller = {
            let _in = runtime.enter();
            make()
        };
        runtime.block_on(caller.calls(2_000))?;
        let start = Instant::now();
        runtime.block_on(caller.calls(calls))?;
        anyhow::Ok(start.elapsed())
    })?;
    drop(runtime);
    telemetry.shutdown();
    Ok(timed.as_nanos() as f64 / calls as f64)
}

/// A service the two workers can share: cloned per call, its futures sent between threads.
trait Shared:
    Service<
        http::Request<Body>,
        Response = http::Response<Body>,
        Future: Send,
        Error: Into<tower::BoxError>,
    > + Clone
    + Send
    + Sync
    + 'static
{
}

impl<S> Shared for S where
    S: Service<
            http::Request<Body>,
            Response = http::Response<Body>,
            Future: Send,
            Error: Into<tower::BoxError>,
        > + Clone
        + Send
        + Sync
        + 'static
{
}

/// CPU nanoseconds per call of the whole process, `calls` calls made by [`TASKS`] tasks on a runtime of two
/// worker threads, each call through a clone of the caller `make` gives (as hyper clones the server's service
/// per request, and callers clone a channel per call): what a layer's shared state costs when every worker
/// touches it (a lock, a reference count).
fn cpu_per_call_shared<C: Calls>(
    log_level: &str,
    make: impl Fn() -> C,
    calls: u64,
) -> anyhow::Result<f64> {
    let (dispatch, telemetry) =
        Telemetry::to_writer(&settings(log_level)?, "echo-1", std::io::sink())?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let caller = tracing::dispatcher::with_default(&dispatch, || {
        let _in = runtime.enter();
        make()
    });
    let run = |n: u64| -> anyhow::Result<()> {
        let left = Arc::new(AtomicU64::new(n));
        runtime.block_on(async {
            let tasks: Vec<_> = (0..TASKS)
                .map(|_| {
                    let (caller, left) = (caller.clone(), left.clone());
                    tokio::spawn(
                        async move {
                            while left
                                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |l| {
                                    l.checked_sub(1)
                                })
                                .is_ok()
                            {
                                caller.clone().calls(1).await?;
                            }
                            anyhow::Ok(())
                        }
                        .with_subscriber(dispatch.clone()),
                    )
                })
                .collect();
            for task in tasks {
                task.await??;
            }
            anyhow::Ok(())
        })
    };
    run(2_000)?;
    let before = crate::procs::cpu_ns_of_threads();
    run(calls)?;
    let cpu = crate::procs::cpu_ns_of_threads().saturating_sub(before);
    drop(caller);
    drop(runtime);
    telemetry.shutdown();
    Ok(cpu as f64 / calls as f64)
}

/// Calls in flight in [`cpu_per_call_shared`], as the HTTP/2 benches run them.
const TASKS: usize = 32;

/// Both figures of a row: ns per call on one thread, CPU ns per call from two workers.
fn measure<C: Calls>(
    log_level: &str,
    make: impl Fn() -> C,
    calls: u64,
) -> anyhow::Result<(f64, f64)> {
    Ok((
        time_per_call(log_level, &make, calls)?,
        cpu_per_call_shared(log_level, &make, calls)?,
    ))
}

/// [`measure`] of `layer` around the bare handler (one layer, or the whole stack), server side.
fn layered<L>(log_level: &str, layer: L, calls: u64) -> anyhow::Result<(f64, f64)>
where
    L: Layer<EchoServer<BareEcho>>,
    L::Service: Shared,
{
    measure(log_level, || Serve(layer.layer(handler())), calls)
}

/// [`measure`] of the generated client over what `make` wraps the bare handler in, client side.
fn client<S>(
    log_level: &str,
    make: impl Fn(EchoServer<BareEcho>) -> S,
    calls: u64,
) -> anyhow::Result<(f64, f64)>
where
    S: Shared + tonic::client::GrpcService<Body, ResponseBody = Body>,
    <S as tonic::client::GrpcService<Body>>::Future: Send,
{
    measure(log_level, || Call(EchoClient::new(make(handler()))), calls)
}

/// A row's measurement: see [`measure`].
type Row<'a> = Box<dyn Fn() -> anyhow::Result<(f64, f64)> + 'a>;

/// Runs the table and prints it.
///
/// # Errors
/// A call failed or did not end OK.
pub fn run(args: &Args) -> anyhow::Result<()> {
    let with_log = settings(CALL_LOG)?;
    let n = args.calls;
    let rows: Vec<(&str, Row<'_>)> = vec![
        (
            "bare handler (baseline)",
            Box::new(|| measure(CALL_LOG, || Serve(handler()), n)),
        ),
        (
            "server context (trace id, deadline, span)",
            Box::new(|| layered(CALL_LOG, ServerContextLayer::new(TIMEOUT), n)),
        ),
        (
            "metrics and call log line",
            Box::new(|| layered(CALL_LOG, metrics(), n)),
        ),
        (
            "metrics, call log line off",
            Box::new(|| layered(NO_CALL_LOG, metrics(), n)),
        ),
        (
            "readiness gate",
            Box::new(|| layered(CALL_LOG, ReadinessGateLayer::new(Readiness::default()), n)),
        ),
        (
            "deadline",
            Box::new(|| {
                let layer = DeadlineLayer::new(TIMEOUT, CancellationToken::new());
                layered(CALL_LOG, layer, n)
            }),
        ),
        (
            "concurrency limit",
            Box::new(|| layered(CALL_LOG, ConcurrencyLimitLayer::new(1_000, TIMEOUT), n)),
        ),
        (
            "answer encoding",
            Box::new(|| layered(CALL_LOG, AnswerEncodingLayer::new(false), n)),
        ),
        (
            "whole server stack",
            Box::new(|| layered(CALL_LOG, stack(&with_log), n)),
        ),
        (
            "whole server stack, call log line off",
            Box::new(|| layered(NO_CALL_LOG, stack(&with_log), n)),
        ),
        (
            "client: generated client straight to the handler (baseline)",
            Box::new(|| client(CALL_LOG, |h| h, n)),
        ),
        (
            "client: method config",
            Box::new(|| {
                client(
                    CALL_LOG,
                    |h| MethodConfigLayer::new(ServiceConfigs::default(), "echo").layer(h),
                    n,
                )
            }),
        ),
        (
            "client: context (trace id, deadline out)",
            Box::new(|| client(CALL_LOG, |h| ClientContextLayer::new(TIMEOUT).layer(h), n)),
        ),
        (
            "client: metrics and call log line",
            Box::new(|| client(CALL_LOG, |h| client_metrics().layer(h), n)),
        ),
        (
            "client: transparent retry",
            Box::new(|| {
                client(
                    CALL_LOG,
                    |h| TransparentRetryLayer::new(Arc::default()).layer(h),
                    n,
                )
            }),
        ),
        (
            "client: errors to statuses",
            Box::new(|| client(CALL_LOG, |h| ErrorToStatusLayer.layer(h), n)),
        ),
        (
            "client: compression (gzip accepted, not sent)",
            Box::new(|| client(CALL_LOG, |h| CompressionLayer::new(false).layer(h), n)),
        ),
        (
            "client: p2c picker over 2 endpoints (PeakEWMA)",
            Box::new(|| client(CALL_LOG, |_| balanced(), n)),
        ),
        (
            "client: whole client stack over the p2c balancer",
            Box::new(|| {
                let factory = ClientFactory::new(&with_log, Metrics::disabled());
                client(
                    CALL_LOG,
                    |_| {
                        let endpoints = endpoints();
                        let fast_fail = NoEndpointFastFail::new(
                            balanced(),
                            endpoints.clone(),
                            Arc::from("echo"),
                            false,
                        );
                        factory.stack("echo", endpoints, fast_fail)
                    },
                    n,
                )
            }),
        ),
    ];
    let rows: Vec<(&str, Row<'_>)> = rows
        .into_iter()
        .filter(|(name, _)| {
            args.only
                .as_deref()
                .is_none_or(|only| name.contains(only) || name.ends_with("(baseline)"))
        })
        .collect();
    let mut figures = vec![Vec::with_capacity(args.rounds); rows.len()];
    for round in 0..args.rounds {
        eprintln!("round {} of {}", round + 1, args.rounds);
        for ((_, measure), figures) in rows.iter().zip(&mut figures) {
            figures.push(measure()?);
        }
    }
    // The fastest round of each row: the machine's slowdowns (other processes, frequency, a neighbour on the
    // host) only ever add time.
    let best: Vec<(f64, f64)> = figures
        .into_iter()
        .map(|f| {
            f.into_iter()
                .fold((f64::INFINITY, f64::INFINITY), |(a, b), (x, y)| {
                    (a.min(x), b.min(y))
                })
        })
        .collect();
    println!(
        "\nunary Echo in process (no socket, no HTTP/2), {n} calls per row and round, the fastest of {} rounds; \
         logs rendered to a sink. One thread: the calls one after another. Two workers: {TASKS} tasks on two \
         worker threads, the service (the channel) cloned per call as hyper (a caller) does, CPU of the whole \
         process. Each table against its first row.",
        args.rounds
    );
    let mut base = (1.0, 1.0);
    for ((name, _), &(ns, shared)) in rows.iter().zip(&best) {
        if name.ends_with("(baseline)") {
            base = (ns, shared);
            println!(
                "\n| layer | ns / call, one thread | × baseline | added | CPU ns / call, two workers | × baseline | added |\n\
                 |---|---:|---:|---:|---:|---:|---:|"
            );
        }
        println!(
            "| {name} | {ns:.0} | {:.2}× | {:+.0} | {shared:.0} | {:.2}× | {:+.0} |",
            ns / base.0,
            ns - base.0,
            shared / base.1,
            shared - base.1,
        );
    }
    Ok(())
}
