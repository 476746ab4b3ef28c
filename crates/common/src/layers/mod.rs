//! The platform's tower layers, one per file. The server stack is assembled in [`crate::server`] and the client
//! stack in [`crate::client`], each in one function with a comment on why every layer sits where it does.
//!
//! | layer | side | what it does |
//! |---|---|---|
//! | [`ServerContextLayer`] | server | trace id, deadline from `grpc-timeout`, `grpc.request` span, call already past its deadline refused |
//! | [`GrpcMetricsLayer`] | both | StatsD count/latency/status/in-flight per method, and one call-log line per call |
//! | [`ReadinessGateLayer`] | server | while a readiness check fails (database down), calls answered UNAVAILABLE at once, naming it |
//! | [`DeadlineLayer`] | server | handler and response stream stopped at the deadline (DEADLINE_EXCEEDED) or the end of the shutdown's drain (UNAVAILABLE) |
//! | [`AnswerEncodingLayer`] | server | gzip answers only for callers that compressed their request (or every accepting caller with `grpc.gzip_responses`) |
//! | [`ConcurrencyLimitLayer`] | server | at most `grpc.max_concurrent_requests` calls, streams for their whole life; over it RESOURCE_EXHAUSTED before any handler |
//! | [`MethodConfigLayer`] | client, outermost | the target's service config: `timeout`, `waitForReady`, `retryPolicy` handed down |
//! | [`ClientContextLayer`] | client | trace id and the remaining deadline out as metadata; local DEADLINE_EXCEEDED |
//! | [`TransparentRetryLayer`] | client | A6 retries: a call that never left the client at once, any method; trailers-only answers with a retryable status per `retryPolicy`, within the deadline and the budget |
//! | [`ErrorToStatusLayer`] | client | transport and balancer errors → UNAVAILABLE ([`NeverSent`] when the connection could not be made) |
//! | [`CompressionLayer`] | client | `grpc-accept-encoding: gzip` on every call, gzip answers decompressed; requests compressed for `client.gzip` targets |
//! | [`NoEndpointFastFail`] | client | no healthy instance → UNAVAILABLE at once (waits for one with [`WaitForReady`]); waits for discovery's first answer |
//! | [`Ejecting`] | client, per endpoint | timed ejection after a transport failure, half-open retry |
//!
//! The answers these layers give without a handler (deadline passed, shed, no endpoint, transport failure)
//! are built in [`crate::error`], the one place where errors become `tonic::Status`.

mod answer_encoding;
mod client_context;
mod compression;
mod concurrency;
mod deadline;
mod ejection;
mod error_to_status;
mod grpc_metrics;
mod method_config;
mod no_endpoint;
mod readiness_gate;
mod server_context;
mod transparent_retry;

pub use answer_encoding::{AnswerEncoding, AnswerEncodingLayer};
pub use client_context::{ClientContext, ClientContextLayer};
pub use compression::{Compression, CompressionLayer, MAX_DECOMPRESSED};
pub use concurrency::{ConcurrencyLimit, ConcurrencyLimitLayer};
pub use deadline::{Deadline, DeadlineLayer, SHUTTING_DOWN};
pub use ejection::{Ejecting, EndpointFailed};
pub use error_to_status::{ErrorToStatus, ErrorToStatusLayer, NeverSent};
pub use grpc_metrics::{GrpcMetrics, GrpcMetricsLayer};
pub use method_config::{AttemptPolicy, MethodConfig, MethodConfigLayer};
pub use no_endpoint::{NoEndpointFastFail, WaitForReady};
pub use readiness_gate::{Readiness, ReadinessGate, ReadinessGateLayer};
pub use server_context::{ServerContext, ServerContextLayer};
pub use transparent_retry::{TransparentRetry, TransparentRetryLayer};

/// The `grpc-status` of a header block: a response's trailers, or its headers when it is trailers-only.
pub(crate) fn grpc_status(headers: &http::HeaderMap) -> Option<tonic::Code> {
    headers
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<i32>().ok())
        .map(tonic::Code::from)
}
