//! The echo service: the smallest service on the platform, used to prove `crates/common` end to end against
//! real Consul, Kafka and StatsD/Graphite. It answers `keel.example.v1.Echo/Echo` with its instance id, the
//! trace id it saw and the deadline it was given.

use std::time::Duration;

use keel_common::{Platform, Server, ServiceError, context};
use keel_protos::keel::example::v1::{
    EchoRequest, EchoResponse,
    echo_server::{Echo, EchoServer},
};
use tonic::{Request, Response, Status};

/// Longest `delay_ms` honoured, so a request cannot hold a slot for ever.
pub const MAX_DELAY: Duration = Duration::from_secs(60);

/// The handler.
#[derive(Clone, Debug)]
pub struct EchoService {
    instance_id: String,
}

impl EchoService {
    /// A handler answering as instance `instance_id`.
    pub fn new(instance_id: impl Into<String>) -> Self {
        Self {
            instance_id: instance_id.into(),
        }
    }
}

#[tonic::async_trait]
impl Echo for EchoService {
    async fn echo(&self, request: Request<EchoRequest>) -> Result<Response<EchoResponse>, Status> {
        let req = request.into_inner();
        if !(0..=16).contains(&req.fail_with_code) {
            return Err(ServiceError::invalid(
                "fail_with_code",
                format!("{} is not a gRPC status code (0..16)", req.fail_with_code),
            )
            .into());
        }
        if req.fail_with_code != 0 {
            return Err(Status::new(
                tonic::Code::from(req.fail_with_code),
                "failure requested by fail_with_code",
            ));
        }
        let ctx = context::current();
        let deadline_remaining_ms = ctx
            .as_ref()
            .and_then(|c| c.remaining())
            .map_or(0, |d| d.as_millis() as u64);
        tracing::info!(text = %req.message, delay_ms = req.delay_ms, "echo");
        if req.delay_ms > 0 {
            tokio::time::sleep(Duration::from_millis(u64::from(req.delay_ms)).min(MAX_DELAY)).await;
        }
        Ok(Response::new(EchoResponse {
            message: req.message,
            instance_id: self.instance_id.clone(),
            trace_id: ctx.map(|c| c.trace_id).unwrap_or_default(),
            deadline_remaining_ms,
        }))
    }
}

/// The echo server of `platform`.
pub fn build(platform: &Platform) -> anyhow::Result<Server> {
    Ok(
        Server::builder(platform).add_service(EchoServer::new(EchoService::new(
            platform.instance_id.clone(),
        ))),
    )
}
