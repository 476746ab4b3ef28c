//! The accounts service of the multi-tenant cache (`shared/seeds/003_grpc_in_production_cache.txt`): package
//! `rpc`, service `Accounts`, wire-compatible with the talk's `GetByToken`, plus account administration and the
//! key quota the cache instances share.
//!
//! - A token is 32 random bytes (base64url, prefix `kc_`), returned once by CreateAccount; only its SHA-256
//!   is stored, looked up by digest and compared in constant time. An unknown token is UNAUTHENTICATED.
//! - ReserveKeys takes keys of an account's `max_cache_keys` in one conditional UPDATE, so the limit holds
//!   exactly however many cache instances reserve at once; over it: FAILED_PRECONDITION with a QuotaFailure.
//!   With `up_to` it takes what is left, up to `count` (a cache instance reserving for a batch of Stores).
//! - Every mutating call honours `dry-run: true` metadata: it validates and answers what would happen, and
//!   writes nothing.
//! - Administration is the operator's, a tenant acts only on its own account: see [`auth`].

pub mod auth;
pub mod storage;

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};

use keel_common::db::Pool;
use keel_common::{
    Resources, Server, Service, ServiceError, Storage,
    config::{Secret, SectionSettings},
    context::is_dry_run,
};
use keel_protos::rpc::{
    Account, CreateAccountReq, CreateAccountResp, GetByTokenReq, GetByTokenResp, ListAccountsReq,
    ListAccountsResp, ReleaseKeysReq, ReleaseKeysResp, ReserveKeysReq, ReserveKeysResp,
    UpdateAccountReq, UpdateAccountResp,
    accounts_server::{Accounts as AccountsRpc, AccountsServer},
};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tonic::{Request, Response, Status};

pub use storage::{Reservation, Reserved, Store};

/// Consul service name and database name.
pub const SERVICE: &str = "accounts";

/// The migrations of this service's database.
pub static MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// Accounts listed per page when the request asks for none; and the most a page holds.
pub const DEFAULT_PAGE: usize = 100;
/// See [`DEFAULT_PAGE`].
pub const MAX_PAGE: usize = 1000;

/// SHA-256 hex digest of a token.
pub fn token_digest(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

fn new_token() -> String {
    let bytes: [u8; 32] = rand::random();
    format!("kc_{}", URL_SAFE_NO_PAD.encode(bytes))
}

impl From<storage::Account> for Account {
    fn from(a: storage::Account) -> Self {
        Self {
            id: a.id,
            name: a.name,
            max_cache_keys: a.max_cache_keys,
            used_cache_keys: a.used_cache_keys,
        }
    }
}

/// The `[accounts]` configuration section.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(default)]
pub struct AccountsSettings {
    /// The operator's credential (`accounts.admin_token`, `KEEL_ACCOUNTS__ADMIN_TOKEN`), sent as
    /// `authorization: Bearer <token>`; also what trusted services such as the cache present
    /// (`cache.accounts_token`). Unset: only clients with a verified certificate are operators.
    pub admin_token: Secret,
}

impl SectionSettings for AccountsSettings {}

/// The gRPC handler: a thin adapter over [`Store`], behind [`auth`].
#[derive(Clone, Debug)]
pub struct Accounts {
    store: Store,
    admin_token: Secret,
    /// The server verifies client certificates: a client that presented one is a trusted service.
    trust_client_certs: bool,
}

impl Accounts {
    /// The service over `pool` (already migrated); `admin_token` is the operator's credential (empty: none).
    pub fn new(pool: Pool, admin_token: Secret) -> Self {
        Self {
            store: Store::new(pool),
            admin_token,
            trust_client_certs: false,
        }
    }

    /// The account `token` was issued for: looked up by its digest, compared in constant time.
    async fn account_of(&self, token: &str) -> Result<Option<storage::Account>, ServiceError> {
        let digest = token_digest(token);
        Ok(match self.store.by_token_digest(&digest).await? {
            Some((account, stored)) if bool::from(stored.as_bytes().ct_eq(digest.as_bytes())) => {
                Some(account)
            }
            _ => None,
        })
    }

    async fn by_id(&self, id: &str) -> Result<storage::Account, ServiceError> {
        self.store
            .by_id(id)
            .await?
            .ok_or_else(|| ServiceError::NotFound(format!("account {id:?} does not exist")))
    }
}

impl Service for Accounts {
    const NAME: &'static str = SERVICE;
    type Settings = AccountsSettings;

    fn storage() -> Storage {
        Storage::database(&MIGRATIONS)
    }

    async fn open(r: Resources<AccountsSettings>) -> anyhow::Result<Self> {
        let mut accounts = Self::new(r.database()?.pool, r.settings.admin_token);
        accounts.trust_client_certs = r.platform.settings.tls.require_client_cert;
        let store = accounts.store.clone();
        // Idempotency keys older than storage::RETENTION go, once a minute (every instance: deletes are idempotent).
        tokio::spawn(async move {
            let mut every = tokio::time::interval(std::time::Duration::from_secs(60));
            loop {
                every.tick().await;
                if let Err(e) = store.purge_operations().await {
                    tracing::warn!(error = %e, "purging quota idempotency keys failed");
                }
            }
        });
        Ok(accounts)
    }

    fn add_to(self, server: Server) -> Server {
        server.add_service(AccountsServer::new(self))
    }
}

/// Longest account name, in characters.
pub const MAX_NAME_CHARS: usize = 256;

fn check_name(name: &str) -> Result<(), ServiceError> {
    keel_common::limits::chars("name", name, MAX_NAME_CHARS)
}

fn positive_count(count: i64) -> Result<i64, ServiceError> {
    if count <= 0 {
        Err(ServiceError::invalid(
            "count",
            format!("{count}: must be at least 1"),
        ))
    } else {
        Ok(count)
    }
}

/// Longest idempotency key accepted (a UUID is 36 characters).
pub const MAX_IDEMPOTENCY_KEY: usize = 64;

/// An idempotency key field: `None` when empty; INVALID_ARGUMENT when longer than [`MAX_IDEMPOTENCY_KEY`].
fn idempotency_key<'a>(field: &str, key: &'a str) -> Result<Option<&'a str>, ServiceError> {
    if key.len() > MAX_IDEMPOTENCY_KEY {
        return Err(ServiceError::invalid(
            field,
            format!(
                "{} characters: at most {MAX_IDEMPOTENCY_KEY}",
                key.chars().count()
            ),
        ));
    }
    Ok((!key.is_empty()).then_some(key))
}

#[tonic::async_trait]
impl AccountsRpc for Accounts {
    async fn get_by_token(
        &self,
        request: Request<GetByTokenReq>,
    ) -> Result<Response<GetByTokenResp>, Status> {
        let token = request.into_inner().token;
        let unknown = || ServiceError::Unauthenticated("unknown account token".into());
        if token.is_empty() {
            return Err(unknown().into());
        }
        let account = self.account_of(&token).await?.ok_or_else(unknown)?;
        Ok(Response::new(GetByTokenResp {
            account: Some(account.into()),
        }))
    }

    async fn create_account(
        &self,
        request: Request<CreateAccountReq>,
    ) -> Result<Response<CreateAccountResp>, Status> {
        let dry_run = is_dry_run(&request);
        self.caller(&request).await?.operator("CreateAccount")?;
        let r = request.into_inner();
        if r.name.trim().is_empty() {
            return Err(ServiceError::invalid("name", "name should be provided").into());
        }
        check_name(&r.name)?;
        if r.max_cache_keys <= 0 {
            return Err(ServiceError::invalid("max_cache_keys", "must be at least 1").into());
        }
        let mut account = storage::Account {
            id: String::new(),
            name: r.name.trim().to_owned(),
            max_cache_keys: r.max_cache_keys,
            used_cache_keys: 0,
        };
        if dry_run {
            return Ok(Response::new(CreateAccountResp {
                account: Some(account.into()),
                token: String::new(),
            }));
        }
        account.id = uuid::Uuid::now_v7().to_string();
        let token = new_token();
        self.store
            .create(&account, &token_digest(&token))
            .await
            .map_err(ServiceError::from)?;
        Ok(Response::new(CreateAccountResp {
            account: Some(account.into()),
            token,
        }))
    }

    async fn update_account(
        &self,
        request: Request<UpdateAccountReq>,
    ) -> Result<Response<UpdateAccountResp>, Status> {
        let dry_run = is_dry_run(&request);
        self.caller(&request).await?.operator("UpdateAccount")?;
        let r = request.into_inner();
        if r.max_cache_keys < 0 {
            return Err(ServiceError::invalid(
                "max_cache_keys",
                "must be at least 1, or 0 to keep it",
            )
            .into());
        }
        let mut account = self.by_id(&r.id).await?;
        check_name(&r.name)?;
        if !r.name.trim().is_empty() {
            account.name = r.name.trim().to_owned();
        }
        if r.max_cache_keys > 0 {
            account.max_cache_keys = r.max_cache_keys;
        }
        if !dry_run {
            self.store
                .update(&account)
                .await
                .map_err(ServiceError::from)?;
        }
        Ok(Response::new(UpdateAccountResp {
            account: Some(account.into()),
        }))
    }

    async fn list_accounts(
        &self,
        request: Request<ListAccountsReq>,
    ) -> Result<Response<ListAccountsResp>, Status> {
        self.caller(&request).await?.operator("ListAccounts")?;
        let r = request.into_inner();
        let size = match r.page_size {
            0 => DEFAULT_PAGE,
            n if n < 0 => {
                return Err(ServiceError::invalid("page_size", "must not be negative").into());
            }
            n => (n as usize).min(MAX_PAGE),
        };
        let mut accounts = self
            .store
            .list(&r.page_token, size + 1)
            .await
            .map_err(ServiceError::from)?;
        let next_page_token = if accounts.len() > size {
            accounts.truncate(size);
            accounts.last().map(|a| a.id.clone()).unwrap_or_default()
        } else {
            String::new()
        };
        Ok(Response::new(ListAccountsResp {
            accounts: accounts.into_iter().map(Account::from).collect(),
            next_page_token,
        }))
    }

    async fn reserve_keys(
        &self,
        request: Request<ReserveKeysReq>,
    ) -> Result<Response<ReserveKeysResp>, Status> {
        let dry_run = is_dry_run(&request);
        let caller = self.caller(&request).await?;
        let r = request.into_inner();
        caller.operator_or_owner(&r.account_id, "ReserveKeys")?;
        let count = positive_count(r.count)?;
        // Keys to take out of `count` when `used` of `max` are in use; zero means refused.
        let grant = |used: i64, max: i64| match (used + count <= max, r.up_to) {
            (true, _) => count,
            (false, true) => (max - used).max(0),
            (false, false) => 0,
        };
        let over = |a: &storage::Account| ServiceError::QuotaExceeded {
            subject: format!("account:{}", a.id),
            description: format!(
                "max_cache_keys {} reached ({} in use, {count} more asked)",
                a.max_cache_keys, a.used_cache_keys
            ),
        };
        if dry_run {
            let a = self.by_id(&r.account_id).await?;
            let granted = grant(a.used_cache_keys, a.max_cache_keys);
            if granted == 0 {
                return Err(over(&a).into());
            }
            return Ok(Response::new(ReserveKeysResp {
                used_cache_keys: a.used_cache_keys + granted,
                max_cache_keys: a.max_cache_keys,
                granted,
            }));
        }
        let reservation_id = idempotency_key("reservation_id", &r.reservation_id)?;
        match self
            .store
            .reserve(&r.account_id, count, r.up_to, reservation_id)
            .await
            .map_err(ServiceError::from)?
        {
            Reserved::Taken(t) => Ok(Response::new(ReserveKeysResp {
                used_cache_keys: t.used_cache_keys,
                max_cache_keys: t.max_cache_keys,
                granted: t.granted,
            })),
            Reserved::Refused => Err(over(&self.by_id(&r.account_id).await?).into()),
            Reserved::Cancelled => Err(ServiceError::Aborted(format!(
                "reservation {:?} was cancelled before it arrived",
                r.reservation_id
            ))
            .into()),
            Reserved::IdInUse => Err(ServiceError::invalid(
                "reservation_id",
                format!("{:?} is another account's", r.reservation_id),
            )
            .into()),
        }
    }

    async fn release_keys(
        &self,
        request: Request<ReleaseKeysReq>,
    ) -> Result<Response<ReleaseKeysResp>, Status> {
        let dry_run = is_dry_run(&request);
        let caller = self.caller(&request).await?;
        let r = request.into_inner();
        caller.operator_or_owner(&r.account_id, "ReleaseKeys")?;
        let reservation_id = idempotency_key("reservation_id", &r.reservation_id)?;
        let release_id = idempotency_key("release_id", &r.release_id)?;
        let count = match reservation_id {
            Some(_) => 0,
            None => positive_count(r.count)?,
        };
        if dry_run {
            self.by_id(&r.account_id).await?;
            return Ok(Response::new(ReleaseKeysResp {}));
        }
        let found = match reservation_id {
            Some(reservation) => self
                .store
                .cancel_reservation(&r.account_id, reservation)
                .await
                .map_err(ServiceError::from)?,
            None => self
                .store
                .release(&r.account_id, count, release_id)
                .await
                .map_err(ServiceError::from)?,
        };
        if !found {
            return Err(ServiceError::NotFound(format!(
                "account {:?} does not exist",
                r.account_id
            ))
            .into());
        }
        Ok(Response::new(ReleaseKeysResp {}))
    }
}
