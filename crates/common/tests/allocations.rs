//! Allocations per call through the server and client stacks, layer by layer, counted (not timed) around a
//! handler that answers at once: what each layer adds to the same call without it. A layer that starts
//! allocating per call again (a boxed future, a formatted metric name, a `String` per log field or header)
//! fails here. Client side, the generated client calls the handler in process through the layers.
//!
//! Calls are driven in process ([`keel_common::testsuite::calls`]) on a current-thread runtime with the
//! platform's logging subscriber, writing its lines to a sink, so every allocation a call makes is on the test's
//! thread and counted (`allocation_counter` counts the current thread's).

use std::{collections::HashSet, time::Duration};

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
    server::{self, StackParts},
    service_config::ServiceConfigs,
    testsuite::{self, calls},
};
use keel_protos::keel::example::v1::{
    EchoRequest, EchoResponse,
    echo_client::EchoClient,
    echo_server::{Echo, EchoServer},
};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, body::Body};
use tower::{Layer, Service};

const PATH: &str = "/keel.example.v1.Echo/Echo";

/// Calls counted, after as many calls to warm caches (a method's metrics, a thread's log buffers, span slots).
/// A buffer that grows now and then (the latency samples kept until the next flush) adds a fraction of an
/// allocation per call: rounded away.
const CALLS: u64 = 1_000;

/// Answers at once, allocating nothing of its own.
struct Answer;

#[tonic::async_trait]
impl Echo for Answer {
    async fn echo(&self, request: Request<EchoRequest>) -> Result<Response<EchoResponse>, Status> {
        Ok(Response::new(EchoResponse {
            message: request.into_inner().message,
            ..Default::default()
        }))
    }
}

fn settings(log_level: &str) -> Settings {
    Settings::from_env(
        "echo",
        &Env::from_pairs([("KEEL_LOG__LEVEL", log_level), ("KEEL_LOG__STDOUT", "true")]),
    )
    .expect("settings")
}

/// As [`settings`] at `info`, with the lines shipped to the real Kafka of `scripts/infra.sh` too.
fn shipping_settings() -> Settings {
    let brokers = testsuite::infra_var("KEEL_KAFKA_BROKERS");
    Settings::from_env(
        "echo",
        &Env::from_pairs([
            ("KEEL_LOG__LEVEL", "info"),
            ("KEEL_LOG__STDOUT", "true"),
            ("KEEL_KAFKA__BROKERS", brokers.as_str()),
        ]),
    )
    .expect("settings")
}

fn known() -> HashSet<String> {
    HashSet::from(["keel.example.v1.Echo".to_owned()])
}

/// The server stack as every service runs it.
fn stack() -> server::ServerStack {
    server::stack(StackParts {
        settings: &settings("info").grpc,
        metrics: Metrics::disabled(),
        known: known(),
        readiness: Readiness::default(),
        closing: CancellationToken::new(),
        limit: ConcurrencyLimitLayer::new(100, TIMEOUT),
    })
}

/// Allocations per call (rounded to the nearest) of `service`, on a current-thread runtime under the platform's
/// logging subscriber at `log_level`; every call must end OK.
fn allocations_per_call<S>(log_level: &str, service: S) -> u64
where
    S: Service<http::Request<Body>, Response = http::Response<Body>>,
    S::Error: Into<tower::BoxError>,
{
    allocations_logging_as(&settings(log_level), service)
}

/// As [`allocations_per_call`], logging as `settings` say.
fn allocations_logging_as<S>(settings: &Settings, mut service: S) -> u64
where
    S: Service<http::Request<Body>, Response = http::Response<Body>>,
    S::Error: Into<tower::BoxError>,
{
    let (dispatch, telemetry) =
        Telemetry::to_writer(settings, "echo-1", std::io::sink()).expect("logs");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let request = EchoRequest {
        message: "bench".into(),
        ..Default::default()
    };
    let counted = tracing::dispatcher::with_default(&dispatch, || {
        let mut calls_of = |n: u64| {
            runtime
                .block_on(calls::repeat(&mut service, n, || {
                    calls::unary(PATH, &request)
                }))
                .expect("every call answered OK")
        };
        calls_of(CALLS);
        allocation_counter::measure(|| calls_of(CALLS))
    });
    telemetry.shutdown();
    (counted.count_total + CALLS / 2) / CALLS
}

/// What `layer` adds to a call of the bare handler, in allocations per call.
fn added_by<L>(layer: L) -> u64
where
    L: Layer<EchoServer<Answer>>,
    L::Service: Service<http::Request<Body>, Response = http::Response<Body>>,
    <L::Service as Service<http::Request<Body>>>::Error: Into<tower::BoxError>,
{
    let bare = allocations_per_call("info", EchoServer::new(Answer));
    let layered = allocations_per_call("info", layer.layer(EchoServer::new(Answer)));
    layered.saturating_sub(bare)
}

const TIMEOUT: Duration = Duration::from_secs(30);

/// Each layer's count is what it needs today; a layer that allocates more per call fails its test.
#[test]
fn the_deadline_layer_allocates_only_its_response_body_for_a_handler_that_answers_at_once() {
    // The body that stops the response stream at the deadline (tonic's `Body` boxes it); no timer, no boxed
    // future.
    let added = added_by(DeadlineLayer::new(TIMEOUT, CancellationToken::new()));
    assert!(added <= 1, "{added} allocations per call");
}

#[test]
fn the_concurrency_limit_allocates_only_its_response_body() {
    // The body that holds the slot until the answer's end; the slot is shared (an `Arc`) only with a timer that
    // a unary answer, ready at once, never needs.
    let added = added_by(ConcurrencyLimitLayer::new(100, TIMEOUT));
    assert!(added <= 1, "{added} allocations per call");
}

#[test]
fn the_readiness_gate_allocates_nothing_per_call() {
    assert_eq!(added_by(ReadinessGateLayer::new(Readiness::default())), 0);
}

#[test]
fn the_answer_encoding_layer_allocates_nothing_per_call() {
    assert_eq!(added_by(AnswerEncodingLayer::new(false)), 0);
}

#[test]
fn the_server_context_allocates_its_trace_id_its_two_extensions_and_its_span() {
    // The trace id (shared by the context's clones), the call's deadline and context in the request's
    // extensions, the span's fields rendered once (a buffer, kept in the span's extensions).
    let added = added_by(ServerContextLayer::new(TIMEOUT));
    assert!(added <= 5, "{added} allocations per call");
}

#[test]
fn the_metrics_layer_allocates_only_its_counted_bodies() {
    // The request's message counter (shared with its body) and the two bodies that count messages; the
    // method's metrics are found by its path, the peer written into the line, and the call log line is
    // rendered in its thread's buffer and copied into the writer's queue.
    let added = added_by(GrpcMetricsLayer::new(
        Metrics::disabled(),
        Side::Server,
        known(),
    ));
    assert!(added <= 3, "{added} allocations per call");
}

#[test]
fn the_whole_server_stack_adds_ten_allocations_per_call_and_its_call_log_line_none() {
    let bare = allocations_per_call("info", EchoServer::new(Answer));
    let logged = allocations_per_call("info", stack().layer(EchoServer::new(Answer)));
    let quiet = allocations_per_call(
        "info,keel::calls=warn",
        stack().layer(EchoServer::new(Answer)),
    );
    assert!(
        logged - bare <= 10,
        "{bare} allocations per call without the stack, {logged} with it"
    );
    assert_eq!(logged, quiet, "the call log line allocates nothing");
}

#[test]
fn a_call_log_line_shipped_to_kafka_too_allocates_nothing_more() {
    // The line is copied into the shipper's queue as into stdout's, and the shipper reads the trace id for
    // its record's header back from the line on its own thread: nothing is parsed for it on the call's.
    let stdout = allocations_per_call("info", stack().layer(EchoServer::new(Answer)));
    let shipped =
        allocations_logging_as(&shipping_settings(), stack().layer(EchoServer::new(Answer)));
    assert_eq!(
        shipped, stdout,
        "{stdout} allocations per call logging to stdout, {shipped} to stdout and Kafka"
    );
}

// The client stack, layer by layer: the generated client calls the handler in process through each client layer
// alone, then through the p2c balancer, then through the whole client stack over that balancer.

/// Allocations per call (rounded to the nearest) of the generated client over the channel `make` gives (made
/// inside the runtime), under the platform's logging subscriber at `log_level`; every call must end OK.
fn client_allocations_per_call<S>(log_level: &str, make: impl FnOnce() -> S) -> u64
where
    S: tonic::client::GrpcService<Body>,
    S::Error: Into<tower::BoxError>,
    S::ResponseBody: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    <S::ResponseBody as http_body::Body>::Error: Into<tower::BoxError> + Send,
{
    let (dispatch, telemetry) =
        Telemetry::to_writer(&settings(log_level), "echo-1", std::io::sink()).expect("logs");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let counted = tracing::dispatcher::with_default(&dispatch, || {
        let mut client = {
            let _in = runtime.enter();
            EchoClient::new(make())
        };
        let mut calls_of = |n: u64| {
            runtime.block_on(async {
                for _ in 0..n {
                    client
                        .echo(EchoRequest {
                            message: "bench".into(),
                            ..Default::default()
                        })
                        .await
                        .expect("every call answered OK");
                }
            })
        };
        calls_of(CALLS);
        allocation_counter::measure(|| calls_of(CALLS))
    });
    telemetry.shutdown();
    (counted.count_total + CALLS / 2) / CALLS
}

/// What `layer` adds to a call of the bare handler made through the generated client, in allocations per call.
fn client_added_by<L>(layer: L) -> u64
where
    L: Layer<EchoServer<Answer>>,
    L::Service: tonic::client::GrpcService<Body>,
    <L::Service as tonic::client::GrpcService<Body>>::Error: Into<tower::BoxError>,
    <L::Service as tonic::client::GrpcService<Body>>::ResponseBody:
        http_body::Body<Data = bytes::Bytes> + Send + 'static,
    <<L::Service as tonic::client::GrpcService<Body>>::ResponseBody as http_body::Body>::Error:
        Into<tower::BoxError> + Send,
{
    let bare = client_allocations_per_call("info", || EchoServer::new(Answer));
    let layered = client_allocations_per_call("info", || layer.layer(EchoServer::new(Answer)));
    layered.saturating_sub(bare)
}

/// The channel's picker by p2c over two endpoints, each the bare handler.
fn balanced() -> keel_common::routing::Picker<EchoServer<Answer>> {
    calls::balanced(|| EchoServer::new(Answer))
}

/// The whole client stack as a channel assembles it ([`ClientFactory::stack`]) over the p2c balancer.
fn whole_client_stack(
    factory: &ClientFactory,
    endpoints: &tokio::sync::watch::Receiver<Option<Vec<std::net::SocketAddr>>>,
) -> keel_common::Channel {
    let fast_fail = NoEndpointFastFail::new(
        balanced(),
        endpoints.clone(),
        std::sync::Arc::from("echo"),
        false,
    );
    factory.stack("echo", endpoints.clone(), fast_fail)
}

#[test]
fn the_method_config_layer_allocates_nothing_per_call_for_a_target_without_a_config() {
    assert_eq!(
        client_added_by(MethodConfigLayer::new(ServiceConfigs::default(), "echo")),
        0
    );
}

#[test]
fn the_client_context_allocates_only_its_trace_id_and_deadline_header_values() {
    // Each value in a buffer its clones share; no boxed future, no string formatted for either, no header
    // name copied (inserted by `HeaderName`, not by `&str`).
    assert_eq!(client_added_by(ClientContextLayer::new(TIMEOUT)), 2);
}

#[test]
fn the_client_metrics_layer_allocates_only_its_counted_bodies() {
    let added = client_added_by(GrpcMetricsLayer::new(
        Metrics::disabled(),
        Side::Client,
        HashSet::new(),
    ));
    assert!(added <= 3, "{added} allocations per call");
}

#[test]
fn the_transparent_retry_layer_allocates_the_copy_of_the_request_it_keeps() {
    // The request kept to be sent again: its headers and extensions cloned, its message kept as it came
    // (not copied), the body that sends it, and the retry loop's future.
    let added = client_added_by(TransparentRetryLayer::new(Default::default()));
    assert!(added <= 7, "{added} allocations per call");
}

#[test]
fn errors_to_statuses_and_compression_allocate_nothing_per_call() {
    assert_eq!(client_added_by(ErrorToStatusLayer), 0);
    assert_eq!(client_added_by(CompressionLayer::new(false)), 0);
}

#[test]
fn the_p2c_picker_allocates_only_the_call_s_future() {
    // The call's future, boxed once (with the instance's load counted until the answer); the ejection layer's
    // future is not boxed, and no task stands between the caller and the instance (a buffer's worker brought
    // the answer back through a oneshot channel: 2 allocations).
    let bare = client_allocations_per_call("info", || EchoServer::new(Answer));
    let balanced = client_allocations_per_call("info", balanced);
    assert!(
        balanced - bare <= 1,
        "{bare} allocations per call bare, {balanced} balanced"
    );
}

#[test]
fn the_whole_client_stack_adds_sixteen_allocations_per_call_and_its_call_log_line_none() {
    let (_publishing, endpoints) = tokio::sync::watch::channel(Some(calls::ENDPOINTS.to_vec()));
    let factory = ClientFactory::new(&settings("info"), Metrics::disabled());
    let bare = client_allocations_per_call("info", || EchoServer::new(Answer));
    let logged = client_allocations_per_call("info", || whole_client_stack(&factory, &endpoints));
    let quiet = client_allocations_per_call("info,keel::calls=warn", || {
        whole_client_stack(&factory, &endpoints)
    });
    assert!(
        logged - bare <= 16,
        "{bare} allocations per call without the stack, {logged} with it"
    );
    assert_eq!(logged, quiet, "the call log line allocates nothing");
}
