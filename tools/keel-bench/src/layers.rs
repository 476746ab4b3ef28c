//! `keel-bench layers`: what each layer of the server stack costs per call, one by one, in process. Unary Echo
//! calls go through each layer alone around the bare handler, then through the whole stack as
//! [`keel_common::server::stack`] assembles it, with no socket and no HTTP/2 ([`keel_common::testsuite::calls`]),
//! one after another on one thread, under the platform's logging subscriber writing its lines to a sink (stdout's
//! writer thread, minus the `write(2)`).
//!
//! Columns: nanoseconds per call (the median of `--rounds` rounds, rows interleaved so the machine's swings hit
//! every row alike), the ratio to the bare handler, and what the layer adds to it. The allocations each layer
//! adds per call are counted, and held, by keel-common's `allocations` test.

use std::{
    collections::HashSet,
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

use crate::bare::BareEcho;

/// Options of `keel-bench layers`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Calls per row and round (after 2,000 to warm up).
    #[arg(long, default_value_t = 100_000)]
    calls: u64,
    /// Rounds; a row's figure is its median.
    #[arg(long, default_value_t = 5)]
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

/// A row's measurement: nanoseconds per call.
type Row<'a> = Box<dyn Fn() -> anyhow::Result<f64> + 'a>;

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
            Box::new(|| time_per_call(CALL_LOG, handler(), n)),
        ),
        (
            "server context (trace id, deadline, span)",
            Box::new(|| {
                time_per_call(
                    CALL_LOG,
                    ServerContextLayer::new(TIMEOUT).layer(handler()),
                    n,
                )
            }),
        ),
        (
            "metrics and call log line",
            Box::new(|| time_per_call(CALL_LOG, metrics().layer(handler()), n)),
        ),
        (
            "metrics, call log line off",
            Box::new(|| time_per_call(NO_CALL_LOG, metrics().layer(handler()), n)),
        ),
        (
            "readiness gate",
            Box::new(|| {
                let layer = ReadinessGateLayer::new(Readiness::default());
                time_per_call(CALL_LOG, layer.layer(handler()), n)
            }),
        ),
        (
            "deadline",
            Box::new(|| {
                let layer = DeadlineLayer::new(TIMEOUT, CancellationToken::new());
                time_per_call(CALL_LOG, layer.layer(handler()), n)
            }),
        ),
        (
            "concurrency limit",
            Box::new(|| {
                let layer = ConcurrencyLimitLayer::new(1_000, TIMEOUT);
                time_per_call(CALL_LOG, layer.layer(handler()), n)
            }),
        ),
        (
            "answer encoding",
            Box::new(|| {
                time_per_call(
                    CALL_LOG,
                    AnswerEncodingLayer::new(false).layer(handler()),
                    n,
                )
            }),
        ),
        (
            "whole server stack",
            Box::new(|| time_per_call(CALL_LOG, stack(&with_log).layer(handler()), n)),
        ),
        (
            "whole server stack, call log line off",
            Box::new(|| time_per_call(NO_CALL_LOG, stack(&with_log).layer(handler()), n)),
        ),
    ];
    let mut figures = vec![Vec::with_capacity(args.rounds); rows.len()];
    for round in 0..args.rounds {
        eprintln!("round {} of {}", round + 1, args.rounds);
        for ((_, measure), figures) in rows.iter().zip(&mut figures) {
            figures.push(measure()?);
        }
    }
    let medians: Vec<f64> = figures
        .into_iter()
        .map(|mut f| {
            f.sort_by(f64::total_cmp);
            f[f.len() / 2]
        })
        .collect();
    let base = medians[0];
    println!(
        "\nunary Echo in process (no socket, no HTTP/2), {n} calls per row and round, median of {} rounds; \
         logs rendered to a sink\n",
        args.rounds
    );
    println!("| layer | ns / call | × bare handler | added ns / call |\n|---|---:|---:|---:|");
    for ((name, _), ns) in rows.iter().zip(&medians) {
        println!(
            "| {name} | {ns:.0} | {:.2}× | {:+.0} |",
            ns / base,
            ns - base
        );
    }
    Ok(())
}
