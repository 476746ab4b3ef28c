//! The echo service: the smallest service on the platform, used to prove `crates/common` end to end against
//! real Consul, Kafka and StatsD/Graphite. It answers `keel.example.v1.Echo/Echo` with its instance id, the
//! trace id it saw and the deadline it was given, and can forward the call to another service by name.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use keel_common::{
    Channel, ClientFactory, Idempotent, Resources, Server, Service, ServiceError, context,
};
use keel_protos::keel::example::v1::{
    EchoRequest, EchoResponse,
    echo_client::EchoClient,
    echo_server::{Echo, EchoServer},
};
use tonic::{Request, Response, Status};

/// Longest `delay_ms` honoured, so a request cannot hold a slot for ever.
pub const MAX_DELAY: Duration = Duration::from_secs(60);

/// The handler.
#[derive(Clone, Debug)]
pub struct EchoService {
    instance_id: String,
    clients: ClientFactory,
    channels: Arc<Mutex<HashMap<String, Channel>>>,
}

impl EchoService {
    /// A handler answering as instance `instance_id`, forwarding through `clients`.
    pub fn new(instance_id: impl Into<String>, clients: ClientFactory) -> Self {
        Self {
            instance_id: instance_id.into(),
            clients,
            channels: Arc::default(),
        }
    }

    /// One channel per downstream service, made on first use.
    fn channel(&self, service: &str) -> Result<Channel, ServiceError> {
        let mut channels = self.channels.lock().expect("channels");
        if let Some(c) = channels.get(service) {
            return Ok(c.clone());
        }
        let c = self
            .clients
            .channel(service)
            .map_err(|e| ServiceError::invalid("forward_to", e.to_string()))?;
        channels.insert(service.to_owned(), c.clone());
        Ok(c)
    }

    async fn forward(&self, service: &str, req: EchoRequest) -> Result<EchoResponse, Status> {
        let client = EchoClient::new(self.channel(service)?);
        let req = EchoRequest {
            forward_to: String::new(),
            ..req
        };
        let answer = self
            .clients
            .retry_policy()
            .call(Idempotent::Yes, || {
                let mut c = client.clone();
                let r = req.clone();
                async move { c.echo(r).await }
            })
            .await?;
        Ok(answer.into_inner())
    }
}

#[tonic::async_trait]
impl Echo for EchoService {
    async fn echo(&self, request: Request<EchoRequest>) -> Result<Response<EchoResponse>, Status> {
        let req = request.into_inner();
        if !(0..=16).contains(&req.fail_with_code) {
            let why = format!("{} is not a gRPC status code (0..16)", req.fail_with_code);
            return Err(ServiceError::invalid("fail_with_code", why).into());
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
        tracing::info!(
            text = req.message.as_str(),
            delay_ms = req.delay_ms,
            forward_to = req.forward_to.as_str(),
            deadline_remaining_ms,
            "echo"
        );
        if req.delay_ms > 0 {
            tokio::time::sleep(Duration::from_millis(u64::from(req.delay_ms)).min(MAX_DELAY)).await;
        }
        let downstream = if req.forward_to.is_empty() {
            None
        } else {
            Some(Box::new(
                self.forward(&req.forward_to.clone(), req.clone()).await?,
            ))
        };
        Ok(Response::new(EchoResponse {
            message: req.message,
            instance_id: self.instance_id.clone(),
            trace_id: ctx.map(|c| c.trace_id.to_string()).unwrap_or_default(),
            deadline_remaining_ms,
            downstream,
        }))
    }
}

impl Service for EchoService {
    const NAME: &'static str = "echo";
    type Settings = ();

    async fn open(r: Resources<()>) -> anyhow::Result<Self> {
        Ok(Self::new(
            r.platform.instance_id.clone(),
            r.platform.clients.clone(),
        ))
    }

    fn add_to(self, server: Server) -> Server {
        server.add_service(EchoServer::new(self))
    }
}
