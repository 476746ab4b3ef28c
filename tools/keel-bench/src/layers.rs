//! `keel-bench layers`: what each layer of the server stack costs per call, one by one, in process. Unary Echo
//! calls go through each layer alone around the bare handler, then through the whole stack as
//! [`keel_common::server::stack`] assembles it, with no socket and no HTTP/2 ([`keel_common::testsuite::calls`]),
//! one after another on one thread, under the platform's logging subscriber writing its lines to a sink (stdout's
//! writer thread, minus the `write(2)`).
//!
//! Columns, each the fastest of `--rounds` rounds (rows interleaved, so the machine's swings hit every row
//! alike): nanoseconds per call on one thread, and CPU nanoseconds per call of the process when 32 tasks on two
//! worker threads make the calls, each through a clone of the service as hyper makes one per request (what
//! shared state costs: a lock or a reference count every worker touches), each with its ratio to the bare
//! handler and what the layer adds. The allocations each layer
//! adds per call are counted, and held, by keel-common's `allocations` test.

use std::{
    collections::HashSet,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use keel_common::{
    Metrics, Settings,
    config::Env,
    layers::{
        AnswerEncodingLayer, ConcurrencyLimitLayer, DeadlineLayer, GrpcMetricsLayer, Readiness,
        ReadinessGateLayer, ServerContextLayer,
    },
    logs::Telemetry,
    metrics::Side,
    server::{self, StackParts},
    testsuite::calls,
};
use keel_protos::keel::example::v1::{EchoRequest, echo_server::EchoServer};
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

/// Nanoseconds per call of `service` over `calls` calls, on a current-thread runtime under the platform's
/// logging subscriber at `log_level`.
fn time_per_call<S>(log_level: &str, mut service: S, calls: u64) -> anyhow::Result<f64>
where
    S: Service<http::Request<Body>, Response = http::Response<Body>>,
    S::Error: Into<tower::BoxError>,
{
    let (dispatch, telemetry) =
        Telemetry::to_writer(&settings(log_level)?, "echo-1", std::io::sink())?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let request = EchoRequest {
        message: "bench".into(),
        ..Default::default()
    };
    let timed = tracing::dispatcher::with_default(&dispatch, || {
        let mut run = |n| {
            runtime
                .block_on(calls::repeat(&mut service, n, || {
                    calls::unary(PATH, &request)
                }))
                .map_err(|e| anyhow::anyhow!("{e}"))
        };
        run(2_000)?;
        let start = Instant::now();
        run(calls)?;
        anyhow::Ok(start.elapsed())
    })?;
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
/// worker threads, each call through a clone of `service` as hyper makes one per request: what a layer's
/// shared state costs when every worker touches it (a lock, a reference count).
fn cpu_per_call_shared<S: Shared>(log_level: &str, service: S, calls: u64) -> anyhow::Result<f64> {
    let (dispatch, telemetry) =
        Telemetry::to_writer(&settings(log_level)?, "echo-1", std::io::sink())?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let run = |n: u64| -> anyhow::Result<()> {
        let left = Arc::new(AtomicU64::new(n));
        runtime.block_on(async {
            let tasks: Vec<_> = (0..TASKS)
                .map(|_| {
                    let (service, left) = (service.clone(), left.clone());
                    tokio::spawn(
                        async move {
                            let request = EchoRequest {
                                message: "bench".into(),
                                ..Default::default()
                            };
                            while left
                                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |l| {
                                    l.checked_sub(1)
                                })
                                .is_ok()
                            {
                                let mut service = service.clone();
                                calls::repeat(&mut service, 1, || calls::unary(PATH, &request))
                                    .await
                                    .map_err(|e| anyhow::anyhow!("{e}"))?;
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
    drop(runtime);
    telemetry.shutdown();
    Ok(cpu as f64 / calls as f64)
}

/// Calls in flight in [`cpu_per_call_shared`], as the HTTP/2 benches run them.
const TASKS: usize = 32;

/// Both figures of a row: ns per call on one thread, CPU ns per call from two workers.
fn measure<S: Shared>(
    log_level: &str,
    make: impl Fn() -> S,
    calls: u64,
) -> anyhow::Result<(f64, f64)> {
    Ok((
        time_per_call(log_level, make(), calls)?,
        cpu_per_call_shared(log_level, make(), calls)?,
    ))
}

/// [`measure`] of `layer` around the bare handler (one layer, or the whole stack).
fn layered<L>(log_level: &str, layer: L, calls: u64) -> anyhow::Result<(f64, f64)>
where
    L: Layer<EchoServer<BareEcho>>,
    L::Service: Shared,
{
    measure(log_level, || layer.layer(handler()), calls)
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
            Box::new(|| measure(CALL_LOG, handler, n)),
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
    ];
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
    let (base, base_shared) = best[0];
    println!(
        "\nunary Echo in process (no socket, no HTTP/2), {n} calls per row and round, the fastest of {} rounds; \
         logs rendered to a sink. One thread: the calls one after another. Two workers: {TASKS} tasks on two \
         worker threads, the service cloned per call as hyper does, CPU of the whole process\n",
        args.rounds
    );
    println!(
        "| layer | ns / call, one thread | × bare handler | added | CPU ns / call, two workers | × bare handler | added |\n\
         |---|---:|---:|---:|---:|---:|---:|"
    );
    for ((name, _), (ns, shared)) in rows.iter().zip(&best) {
        println!(
            "| {name} | {ns:.0} | {:.2}× | {:+.0} | {shared:.0} | {:.2}× | {:+.0} |",
            ns / base,
            ns - base,
            shared / base_shared,
            shared - base_shared,
        );
    }
    Ok(())
}
