//! The baselines of the platform's overhead: bare tonic servers of the same protos with none of our layers
//! (no context, metrics, call log, limits, health, reflection), run as processes of their own
//! (`keel-bench bare-echo|bare-cache --addr`) so they are measured exactly as the services are.

use std::{collections::HashMap, net::SocketAddr, sync::Mutex};

use keel_protos::{
    keel::example::v1::{
        EchoRequest, EchoResponse,
        echo_server::{Echo, EchoServer},
    },
    rpc::{
        DumpItem, DumpReq, GetReq, GetResp, StoreReq, StoreResp,
        cache_server::{Cache, CacheServer},
    },
};
use tonic::{Request, Response, Status};

struct BareEcho;

#[tonic::async_trait]
impl Echo for BareEcho {
    async fn echo(&self, req: Request<EchoRequest>) -> Result<Response<EchoResponse>, Status> {
        Ok(Response::new(EchoResponse {
            message: req.into_inner().message,
            ..Default::default()
        }))
    }
}

/// A key-value map under one lock: what the grpc-go baseline of the issue does.
#[derive(Default)]
struct BareCache {
    map: Mutex<HashMap<String, Vec<u8>>>,
}

#[tonic::async_trait]
impl Cache for BareCache {
    async fn store(&self, req: Request<StoreReq>) -> Result<Response<StoreResp>, Status> {
        let r = req.into_inner();
        self.map.lock().expect("map").insert(r.key, r.val);
        Ok(Response::new(StoreResp {}))
    }

    async fn get(&self, req: Request<GetReq>) -> Result<Response<GetResp>, Status> {
        let key = req.into_inner().key;
        match self.map.lock().expect("map").get(&key) {
            Some(val) => Ok(Response::new(GetResp { val: val.clone() })),
            None => Err(Status::not_found("no such key")),
        }
    }

    type DumpStream = futures::stream::Empty<Result<DumpItem, Status>>;

    async fn dump(&self, _: Request<DumpReq>) -> Result<Response<Self::DumpStream>, Status> {
        Err(Status::unimplemented("not part of the baseline"))
    }
}

/// Which bare server.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum Proto {
    /// `keel.example.v1.Echo`.
    Echo,
    /// `rpc.Cache` (Store, Get).
    Cache,
}

/// Serves the bare server of `proto` on `addr` until the process is killed; prints `listening <addr>`.
///
/// # Errors
/// The address cannot be bound.
pub async fn serve(proto: Proto, addr: SocketAddr) -> anyhow::Result<()> {
    // TCP_NODELAY as the platform's server sets it: the comparison is of the stacks, not of Nagle.
    let incoming = tonic::transport::server::TcpIncoming::bind(addr)?.with_nodelay(Some(true));
    println!("listening {}", incoming.local_addr()?);
    let mut server = tonic::transport::Server::builder();
    match proto {
        Proto::Echo => {
            server
                .add_service(EchoServer::new(BareEcho))
                .serve_with_incoming(incoming)
                .await?
        }
        Proto::Cache => {
            server
                .add_service(CacheServer::new(BareCache::default()))
                .serve_with_incoming(incoming)
                .await?
        }
    }
    Ok(())
}
