//! The baselines of the platform's overhead: bare tonic servers of the same protos with none of our layers
//! (no context, metrics, call log, limits, health, reflection), run as processes of their own
//! (`keel-bench bare --proto echo|cache|accounts`) so they are measured exactly as the services are.
//! `accounts` answers GetByToken with the service's own statement on sqlx's typed PostgreSQL pool: what
//! tonic and sqlx alone reach for a database-bound call on this machine, beside pgbench (the database alone).

use std::{collections::HashMap, net::SocketAddr, sync::Mutex};

use keel_protos::{
    keel::example::v1::{
        EchoRequest, EchoResponse,
        echo_server::{Echo, EchoServer},
    },
    rpc::{
        Account, CreateAccountReq, CreateAccountResp, DumpItem, DumpReq, GetByTokenReq,
        GetByTokenResp, GetReq, GetResp, ListAccountsReq, ListAccountsResp, ReleaseKeysReq,
        ReleaseKeysResp, ReserveKeysReq, ReserveKeysResp, StoreReq, StoreResp, UpdateAccountReq,
        UpdateAccountResp,
        accounts_server::{Accounts, AccountsServer},
        cache_server::{Cache, CacheServer},
    },
};
use sqlx::Row as _;
use tonic::{Request, Response, Status};

/// Answers Echo at once: the handler of the bare server and of `keel-bench layers`.
pub(crate) struct BareEcho;

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

/// GetByToken as the accounts service answers it (the token's SHA-256 digest looked up by the service's
/// statement), on sqlx's typed PostgreSQL pool with its defaults but the service's pool size.
struct BareAccounts {
    pool: sqlx::PgPool,
}

fn not_in_baseline<T>() -> Result<Response<T>, Status> {
    Err(Status::unimplemented("not part of the baseline"))
}

#[tonic::async_trait]
impl Accounts for BareAccounts {
    async fn get_by_token(
        &self,
        req: Request<GetByTokenReq>,
    ) -> Result<Response<GetByTokenResp>, Status> {
        let digest = accounts::token_digest(&req.into_inner().token);
        let row = sqlx::query(accounts::storage::BY_TOKEN_DIGEST)
            .bind(&digest)
            .fetch_optional(&self.pool)
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?
            .ok_or_else(|| Status::unauthenticated("unknown account token"))?;
        let internal = |e: sqlx::Error| Status::internal(e.to_string());
        let account = Account {
            id: row.try_get(0).map_err(internal)?,
            name: row.try_get(1).map_err(internal)?,
            max_cache_keys: row.try_get(2).map_err(internal)?,
            used_cache_keys: row.try_get(3).map_err(internal)?,
        };
        Ok(Response::new(GetByTokenResp {
            account: Some(account),
        }))
    }

    async fn create_account(
        &self,
        _: Request<CreateAccountReq>,
    ) -> Result<Response<CreateAccountResp>, Status> {
        not_in_baseline()
    }

    async fn update_account(
        &self,
        _: Request<UpdateAccountReq>,
    ) -> Result<Response<UpdateAccountResp>, Status> {
        not_in_baseline()
    }

    async fn list_accounts(
        &self,
        _: Request<ListAccountsReq>,
    ) -> Result<Response<ListAccountsResp>, Status> {
        not_in_baseline()
    }

    async fn reserve_keys(
        &self,
        _: Request<ReserveKeysReq>,
    ) -> Result<Response<ReserveKeysResp>, Status> {
        not_in_baseline()
    }

    async fn release_keys(
        &self,
        _: Request<ReleaseKeysReq>,
    ) -> Result<Response<ReleaseKeysResp>, Status> {
        not_in_baseline()
    }
}

/// Which bare server.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum Proto {
    /// `keel.example.v1.Echo`.
    Echo,
    /// `rpc.Cache` (Store, Get).
    Cache,
    /// `rpc.Accounts` (GetByToken only) on the PostgreSQL database of `--database` (accounts' schema).
    Accounts,
}

/// Serves the bare server of `proto` on `addr` until the process is killed; prints `listening <addr>`.
/// `database`: the PostgreSQL URL `Proto::Accounts` reads (a database the accounts service migrated).
///
/// # Errors
/// The address cannot be bound; `Proto::Accounts` without a database, or one that cannot be reached.
pub async fn serve(proto: Proto, addr: SocketAddr, database: Option<&str>) -> anyhow::Result<()> {
    // TCP_NODELAY as the platform's server sets it: the comparison is of the stacks, not of Nagle.
    let incoming = tonic::transport::server::TcpIncoming::bind(addr)?.with_nodelay(Some(true));
    let local = incoming.local_addr()?;
    let mut server = tonic::transport::Server::builder();
    match proto {
        Proto::Echo => {
            println!("listening {local}");
            server
                .add_service(EchoServer::new(BareEcho))
                .serve_with_incoming(incoming)
                .await?
        }
        Proto::Cache => {
            println!("listening {local}");
            server
                .add_service(CacheServer::new(BareCache::default()))
                .serve_with_incoming(incoming)
                .await?
        }
        Proto::Accounts => {
            let url =
                database.ok_or_else(|| anyhow::anyhow!("--proto accounts needs --database"))?;
            // The pool's first connection before the load starts, as a service opens its database first.
            let pool = sqlx::postgres::PgPoolOptions::new()
                .max_connections(8)
                .connect(url)
                .await?;
            println!("listening {local}");
            server
                .add_service(AccountsServer::new(BareAccounts { pool }))
                .serve_with_incoming(incoming)
                .await?
        }
    }
    Ok(())
}
