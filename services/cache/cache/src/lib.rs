//! The multi-tenant cache of `shared/seeds/003_grpc_in_production_cache.txt`: package `rpc`, service `Cache`
//! (Store, Get, Dump), wire-compatible with the talk's protos.
//!
//! - Every call names its account by token: the request's `account_token`, or `authorization: Bearer <token>`
//!   metadata. The accounts service resolves it (an unknown token is UNAUTHENTICATED); the caller's deadline
//!   and trace id travel with that call. A resolved token is remembered for `cache.token_ttl` (default 5 s;
//!   only its SHA-256), and concurrent lookups of one token share one call. Keys are namespaced per account:
//!   no account reads another's.
//! - Quota: a Store of a key new to the account first reserves one key from the account's `max_cache_keys` at
//!   the accounts service, atomically across every cache instance; over it, the accounts service's
//!   FAILED_PRECONDITION with its QuotaFailure detail reaches the caller as it is. Concurrent reservations of
//!   one account are sent as one (see [`Quota`]). Keys evicted or expired give their quota back.
//! - Memory: at most `cache.max_bytes` (default 64 MiB, changed live through Consul KV) per instance, least
//!   recently used keys evicted first;
//!   `ttl_ms` per key (at most [`MAX_TTL_MS`], a year); keys of at most [`MAX_KEY_BYTES`].
//! - Dump streams the account's pairs in key order, 256 keys at a time through a bounded channel: memory stays
//!   bounded and a slow reader slows the sender (HTTP/2 flow control), never the cache.
//! - `dry-run: true` on Store validates, authenticates and checks the quota, and stores nothing.

mod quota;
mod store;

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use keel_common::{
    Channel, Idempotent, Resources, RetryPolicy, Server, Service, ServiceError,
    config::{ConfigError, Secret, SectionSettings},
    context::{self, is_dry_run},
};
use keel_protos::rpc::{
    DumpItem, DumpReq, GetByTokenReq, GetReq, GetResp, StoreReq, StoreResp,
    accounts_client::AccountsClient,
    cache_server::{Cache as CacheRpc, CacheServer},
};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, metadata::MetadataMap};

pub use quota::Quota;
pub use store::{ENTRY_OVERHEAD, Put, Store};

/// Consul service name.
pub const SERVICE: &str = "cache";
/// Consul name of the accounts service the cache asks, by default.
pub const ACCOUNTS: &str = "accounts";
/// Longest `ttl_ms` a Store may ask for: 365 days. (A larger one used to overflow the expiry instant and
/// panic the handler.)
pub const MAX_TTL_MS: i64 = 365 * 24 * 3600 * 1000;
/// Longest key, in bytes.
pub const MAX_KEY_BYTES: usize = 1024;

/// INVALID_ARGUMENT on `key` past [`MAX_KEY_BYTES`].
fn check_key(key: &str) -> Result<(), ServiceError> {
    keel_common::limits::bytes("key", key, MAX_KEY_BYTES)
}

/// Keys streamed per chunk by Dump.
pub const DUMP_CHUNK: usize = 256;

/// The `[cache]` configuration section (`KEEL_CACHE__MAX_BYTES`, …).
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(default)]
pub struct CacheSettings {
    /// Most bytes of keys and values this instance holds (`cache.max_bytes`), default 64 MiB.
    pub max_bytes: usize,
    /// Consul name of the accounts service (`cache.accounts_service`), default `accounts`.
    pub accounts_service: String,
    /// How long a resolved account token is trusted without asking accounts again (`cache.token_ttl`, a
    /// duration such as `5s`; `0s`: ask on every call). Bounds how long a changed account goes unnoticed.
    #[serde(with = "humantime_serde")]
    pub token_ttl: Duration,
    /// The credential this cache presents to accounts for its ReserveKeys and ReleaseKeys calls on the tenants'
    /// behalf (`cache.accounts_token`, `KEEL_CACHE__ACCOUNTS_TOKEN`): accounts' `accounts.admin_token`. Unset:
    /// none (with mutual TLS the client certificate is the credential).
    pub accounts_token: Secret,
}

impl SectionSettings for CacheSettings {
    fn validate(&self, section: &str) -> Vec<ConfigError> {
        let mut errors = Vec::new();
        if self.max_bytes == 0 {
            errors.push(ConfigError {
                key: format!("{section}.max_bytes"),
                message: "must be greater than zero".into(),
            });
        }
        if self.accounts_service.trim().is_empty() {
            errors.push(ConfigError {
                key: format!("{section}.accounts_service"),
                message: "names the accounts service in Consul; it cannot be empty".into(),
            });
        }
        errors
    }
}

impl Default for CacheSettings {
    fn default() -> Self {
        Self {
            max_bytes: 64 << 20,
            accounts_service: ACCOUNTS.to_owned(),
            token_ttl: Duration::from_secs(5),
            accounts_token: Secret::default(),
        }
    }
}

/// The gRPC handler.
#[derive(Clone, Debug)]
pub struct Cache {
    store: Arc<Mutex<Store>>,
    accounts: AccountsClient<Channel>,
    quota: Quota,
    /// SHA-256 of a token → account id; `None` when `token_ttl` is zero.
    tokens: Option<moka::future::Cache<[u8; 32], String>>,
    retry: RetryPolicy,
}

/// An authenticated account.
struct Tenant {
    id: String,
}

impl Cache {
    /// A cache of `settings.max_bytes` asking `accounts`; idempotent calls to it (token lookups) are retried
    /// on UNAVAILABLE by `retry`, inside the caller's deadline and the process's retry budget.
    pub fn new(
        settings: &CacheSettings,
        accounts: AccountsClient<Channel>,
        retry: RetryPolicy,
    ) -> Self {
        let tokens = (!settings.token_ttl.is_zero()).then(|| {
            moka::future::Cache::builder()
                .max_capacity(100_000)
                .time_to_live(settings.token_ttl)
                .build()
        });
        Self {
            store: Arc::new(Mutex::new(Store::new(settings.max_bytes))),
            quota: Quota::new(accounts.clone(), settings.accounts_token.clone()),
            accounts,
            tokens,
            retry,
        }
    }

    /// The quota reservations of this instance.
    pub fn quota(&self) -> &Quota {
        &self.quota
    }

    /// Changes the memory bound (`cache.max_bytes`); what no longer fits is evicted at once, its quota given
    /// back.
    pub fn set_max_bytes(&self, max_bytes: usize) {
        let evicted = self.lock().set_max_bytes(max_bytes);
        if !evicted.is_empty() {
            tracing::info!(
                max_bytes,
                evicted = evicted.len(),
                "memory bound changed; keys evicted"
            );
        }
        self.release(evicted);
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.lock().bytes()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Store> {
        self.store.lock().unwrap_or_else(|p| p.into_inner())
    }

    async fn tenant(&self, field_token: &str, metadata: &MetadataMap) -> Result<Tenant, Status> {
        let token = if field_token.is_empty() {
            context::bearer_token(metadata)
                .unwrap_or_default()
                .to_owned()
        } else {
            field_token.to_owned()
        };
        if token.is_empty() {
            return Err(ServiceError::Unauthenticated(
                "an account token is required (account_token, or authorization: Bearer <token>)"
                    .into(),
            )
            .into());
        }
        let id = match &self.tokens {
            Some(tokens) => {
                let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
                tokens
                    .try_get_with(digest, self.lookup(token))
                    .await
                    .map_err(|e: Arc<Status>| (*e).clone())?
            }
            None => self.lookup(token).await?,
        };
        Ok(Tenant { id })
    }

    /// The id of the account of `token`, from the accounts service (retried on UNAVAILABLE).
    async fn lookup(&self, token: String) -> Result<String, Status> {
        let account = self
            .retry
            .call(Idempotent::Yes, || {
                let mut c = self.accounts.clone();
                let token = token.clone();
                async move { c.get_by_token(GetByTokenReq { token }).await }
            })
            .await?
            .into_inner()
            .account
            .ok_or_else(|| {
                ServiceError::Internal(anyhow::anyhow!("accounts answered without an account"))
            })?;
        Ok(account.id)
    }

    /// Gives quota back for evicted or expired keys (one account id per key), one call per account, off the
    /// request path.
    fn release(&self, accounts: Vec<String>) {
        let mut counts: HashMap<String, i64> = HashMap::new();
        for a in accounts {
            *counts.entry(a).or_default() += 1;
        }
        for (account_id, n) in counts {
            self.quota.release(account_id, n);
        }
    }
}

impl Service for Cache {
    const NAME: &'static str = SERVICE;
    type Settings = CacheSettings;
    const LIVE: &'static [&'static str] = &["cache.max_bytes"];

    /// Its `[cache]` section, and the accounts service found through the platform's discovery;
    /// `cache.max_bytes` follows the live settings (Consul KV).
    async fn open(r: Resources<CacheSettings>) -> anyhow::Result<Self> {
        let clients = &r.platform.clients;
        let cache = Self::new(
            &r.settings,
            AccountsClient::new(clients.channel(&r.settings.accounts_service)?),
            clients.retry_policy(),
        );
        let mut changes = r.platform.live.changes();
        let live = cache.clone();
        tokio::spawn(async move {
            while changes.changed().await.is_ok() {
                let settings = changes.borrow_and_update().clone();
                if let Ok(section) = settings.section::<CacheSettings>(SERVICE) {
                    live.set_max_bytes(section.max_bytes);
                }
            }
        });
        Ok(cache)
    }

    fn add_to(self, server: Server) -> Server {
        server.add_service(CacheServer::new(self))
    }
}

#[tonic::async_trait]
impl CacheRpc for Cache {
    async fn store(&self, request: Request<StoreReq>) -> Result<Response<StoreResp>, Status> {
        let dry_run = is_dry_run(&request);
        let (metadata, _, r) = request.into_parts();
        if r.key.is_empty() {
            return Err(ServiceError::invalid("key", "key should be provided").into());
        }
        check_key(&r.key)?;
        if !(0..=MAX_TTL_MS).contains(&r.ttl_ms) {
            return Err(ServiceError::invalid(
                "ttl_ms",
                format!(
                    "{}: must be within 0..={MAX_TTL_MS} (0: no expiry)",
                    r.ttl_ms
                ),
            )
            .into());
        }
        let tenant = self.tenant(&r.account_token, &metadata).await?;
        if !self.lock().fits(&tenant.id, &r.key, r.val.len()) {
            return Err(ServiceError::invalid(
                "val",
                format!("{} bytes do not fit in this cache at all", r.val.len()),
            )
            .into());
        }
        let now = Instant::now();
        let exists = self.lock().contains(&tenant.id, &r.key, now);
        if dry_run {
            if !exists {
                self.quota.check(&tenant.id).await?;
            }
            return Ok(Response::new(StoreResp {}));
        }
        if !exists {
            self.quota.reserve(&tenant.id).await?;
        }
        let expires = (r.ttl_ms > 0).then(|| now + Duration::from_millis(r.ttl_ms as u64));
        let put = self.lock().put(&tenant.id, &r.key, r.val, expires);
        let mut release = put.evicted;
        match (exists, put.created) {
            // A concurrent Store created the key first: the reservation made here is one too many.
            (false, false) => release.push(tenant.id.clone()),
            // The key was evicted or expired meanwhile (its quota given back): take one again.
            (true, true) => {
                if let Err(status) = self.quota.reserve(&tenant.id).await {
                    self.lock().remove(&tenant.id, &r.key);
                    self.release(release);
                    return Err(status);
                }
            }
            _ => {}
        }
        self.release(release);
        Ok(Response::new(StoreResp {}))
    }

    async fn get(&self, request: Request<GetReq>) -> Result<Response<GetResp>, Status> {
        let (metadata, _, r) = request.into_parts();
        check_key(&r.key)?;
        let tenant = self.tenant(&r.account_token, &metadata).await?;
        let (val, expired) = self.lock().get(&tenant.id, &r.key, Instant::now());
        self.release(expired.into_iter().collect());
        match val {
            Some(val) => Ok(Response::new(GetResp { val })),
            None => Err(ServiceError::NotFound(format!("key not found: {}", r.key)).into()),
        }
    }

    type DumpStream = ReceiverStream<Result<DumpItem, Status>>;

    async fn dump(&self, request: Request<DumpReq>) -> Result<Response<Self::DumpStream>, Status> {
        let (metadata, _, r) = request.into_parts();
        let tenant = self.tenant(&r.account_token, &metadata).await?;
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        let this = self.clone();
        tokio::spawn(async move {
            let mut after: Option<String> = None;
            loop {
                let keys = this
                    .lock()
                    .keys_after(&tenant.id, after.as_deref(), DUMP_CHUNK);
                let Some(last) = keys.last().cloned() else {
                    break;
                };
                for key in keys {
                    let (val, expired) = this.lock().get(&tenant.id, &key, Instant::now());
                    this.release(expired.into_iter().collect());
                    if let Some(val) = val {
                        // Waits while the client is not reading; ends when it went away.
                        if tx.send(Ok(DumpItem { key, val })).await.is_err() {
                            return;
                        }
                    }
                }
                after = Some(last);
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}
