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

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use keel_common::{Platform, Server, ServiceError, context::is_dry_run, db};
use keel_protos::rpc::{
    Account, CreateAccountReq, CreateAccountResp, GetByTokenReq, GetByTokenResp, ListAccountsReq,
    ListAccountsResp, ReleaseKeysReq, ReleaseKeysResp, ReserveKeysReq, ReserveKeysResp,
    UpdateAccountReq, UpdateAccountResp,
    accounts_server::{Accounts as AccountsRpc, AccountsServer},
};
use sha2::{Digest, Sha256};
use sqlx::{AnyPool, Row, any::AnyRow};
use subtle::ConstantTimeEq;
use tonic::{Request, Response, Status};

/// Consul service name and database name.
pub const SERVICE: &str = "accounts";

/// The migrations of this service's database.
pub static MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// Accounts listed per page when the request asks for none; and the most a page holds.
pub const DEFAULT_PAGE: usize = 100;
/// See [`DEFAULT_PAGE`].
pub const MAX_PAGE: usize = 1000;

const COLUMNS: &str = "id, name, max_cache_keys, used_cache_keys, token_hash";

/// SHA-256 hex digest of a token.
pub fn token_digest(token: &str) -> String {
    Sha256::digest(token.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn new_token() -> String {
    let bytes: [u8; 32] = rand::random();
    format!("kc_{}", URL_SAFE_NO_PAD.encode(bytes))
}

fn account(r: &AnyRow) -> Result<Account, sqlx::Error> {
    Ok(Account {
        id: r.try_get(0)?,
        name: r.try_get(1)?,
        max_cache_keys: r.try_get(2)?,
        used_cache_keys: r.try_get(3)?,
    })
}

/// The gRPC handler and its storage.
#[derive(Clone, Debug)]
pub struct Accounts {
    pool: AnyPool,
}

impl Accounts {
    /// The service over `pool` (already migrated).
    pub fn new(pool: AnyPool) -> Self {
        Self { pool }
    }

    /// Opens this service's database (migrated).
    ///
    /// # Errors
    /// The database cannot be opened or migrated.
    pub async fn open(platform: &Platform) -> anyhow::Result<Self> {
        Ok(Self::new(
            db::connect(&platform.settings, SERVICE, &MIGRATIONS).await?,
        ))
    }

    /// Adds this service to `server`, with its database as a readiness check.
    pub fn add_to(self, server: Server) -> Server {
        let ping = db::ping(&self.pool);
        server
            .add_service(AccountsServer::new(self))
            .readiness("accounts database", ping)
    }

    async fn by_id(&self, id: &str) -> Result<Account, ServiceError> {
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {COLUMNS} FROM accounts WHERE id = $1"
        )))
        .bind(id)
        .fetch_optional(&self.pool)
        .await?
        .map(|r| account(&r))
        .transpose()?
        .ok_or_else(|| ServiceError::NotFound(format!("account {id:?} does not exist")))
    }
}

/// The accounts server of `platform` (its own process).
///
/// # Errors
/// As [`Accounts::open`].
pub async fn build(platform: &Platform) -> anyhow::Result<Server> {
    Ok(Accounts::open(platform)
        .await?
        .add_to(Server::builder(platform)))
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
        let digest = token_digest(&token);
        let row = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {COLUMNS} FROM accounts WHERE token_hash = $1"
        )))
        .bind(&digest)
        .fetch_optional(&self.pool)
        .await
        .map_err(ServiceError::from)?
        .ok_or_else(unknown)?;
        let stored: String = row.try_get(4).map_err(ServiceError::from)?;
        if !bool::from(stored.as_bytes().ct_eq(digest.as_bytes())) {
            return Err(unknown().into());
        }
        Ok(Response::new(GetByTokenResp {
            account: Some(account(&row).map_err(ServiceError::from)?),
        }))
    }

    async fn create_account(
        &self,
        request: Request<CreateAccountReq>,
    ) -> Result<Response<CreateAccountResp>, Status> {
        let dry_run = is_dry_run(&request);
        let r = request.into_inner();
        if r.name.trim().is_empty() {
            return Err(ServiceError::invalid("name", "name should be provided").into());
        }
        if r.max_cache_keys <= 0 {
            return Err(ServiceError::invalid("max_cache_keys", "must be at least 1").into());
        }
        let mut account = Account {
            id: String::new(),
            name: r.name.trim().to_owned(),
            max_cache_keys: r.max_cache_keys,
            used_cache_keys: 0,
        };
        if dry_run {
            return Ok(Response::new(CreateAccountResp {
                account: Some(account),
                token: String::new(),
            }));
        }
        account.id = uuid::Uuid::now_v7().to_string();
        let token = new_token();
        sqlx::query(
            "INSERT INTO accounts (id, name, token_hash, max_cache_keys, used_cache_keys, created_ms) \
             VALUES ($1, $2, $3, $4, 0, $5)",
        )
        .bind(&account.id)
        .bind(&account.name)
        .bind(token_digest(&token))
        .bind(account.max_cache_keys)
        .bind(db::now_ms())
        .execute(&self.pool)
        .await
        .map_err(ServiceError::from)?;
        Ok(Response::new(CreateAccountResp {
            account: Some(account),
            token,
        }))
    }

    async fn update_account(
        &self,
        request: Request<UpdateAccountReq>,
    ) -> Result<Response<UpdateAccountResp>, Status> {
        let dry_run = is_dry_run(&request);
        let r = request.into_inner();
        if r.max_cache_keys < 0 {
            return Err(ServiceError::invalid(
                "max_cache_keys",
                "must be at least 1, or 0 to keep it",
            )
            .into());
        }
        let mut account = self.by_id(&r.id).await?;
        if !r.name.trim().is_empty() {
            account.name = r.name.trim().to_owned();
        }
        if r.max_cache_keys > 0 {
            account.max_cache_keys = r.max_cache_keys;
        }
        if !dry_run {
            sqlx::query("UPDATE accounts SET name = $1, max_cache_keys = $2 WHERE id = $3")
                .bind(&account.name)
                .bind(account.max_cache_keys)
                .bind(&account.id)
                .execute(&self.pool)
                .await
                .map_err(ServiceError::from)?;
        }
        Ok(Response::new(UpdateAccountResp {
            account: Some(account),
        }))
    }

    async fn list_accounts(
        &self,
        request: Request<ListAccountsReq>,
    ) -> Result<Response<ListAccountsResp>, Status> {
        let r = request.into_inner();
        let size = match r.page_size {
            0 => DEFAULT_PAGE,
            n if n < 0 => {
                return Err(ServiceError::invalid("page_size", "must not be negative").into());
            }
            n => (n as usize).min(MAX_PAGE),
        };
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {COLUMNS} FROM accounts WHERE id > $1 ORDER BY id LIMIT $2"
        )))
        .bind(&r.page_token)
        .bind(size as i64 + 1)
        .fetch_all(&self.pool)
        .await
        .map_err(ServiceError::from)?;
        let mut accounts = rows
            .iter()
            .map(account)
            .collect::<Result<Vec<_>, _>>()
            .map_err(ServiceError::from)?;
        let next_page_token = if accounts.len() > size {
            accounts.truncate(size);
            accounts.last().map(|a| a.id.clone()).unwrap_or_default()
        } else {
            String::new()
        };
        Ok(Response::new(ListAccountsResp {
            accounts,
            next_page_token,
        }))
    }

    async fn reserve_keys(
        &self,
        request: Request<ReserveKeysReq>,
    ) -> Result<Response<ReserveKeysResp>, Status> {
        let dry_run = is_dry_run(&request);
        let r = request.into_inner();
        let count = positive_count(r.count)?;
        // Keys to take out of `count` when `used` of `max` are in use; zero means refused.
        let grant = |used: i64, max: i64| match (used + count <= max, r.up_to) {
            (true, _) => count,
            (false, true) => (max - used).max(0),
            (false, false) => 0,
        };
        let over = |a: &Account| ServiceError::QuotaExceeded {
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
        // One conditional UPDATE: concurrent reservations from every cache instance serialise on the row. SET
        // expressions see the row before the update, so `last_granted` is what this call took.
        let row = if r.up_to {
            sqlx::query(
                "UPDATE accounts SET \
                   used_cache_keys = CASE WHEN used_cache_keys + $1 <= max_cache_keys \
                     THEN used_cache_keys + $2 ELSE max_cache_keys END, \
                   last_granted = CASE WHEN used_cache_keys + $3 <= max_cache_keys \
                     THEN $4 ELSE max_cache_keys - used_cache_keys END \
                 WHERE id = $5 AND used_cache_keys < max_cache_keys \
                 RETURNING used_cache_keys, max_cache_keys, last_granted",
            )
            .bind(count)
            .bind(count)
            .bind(count)
            .bind(count)
            .bind(&r.account_id)
        } else {
            sqlx::query(
                "UPDATE accounts SET used_cache_keys = used_cache_keys + $1, last_granted = $2 \
                 WHERE id = $3 AND used_cache_keys + $4 <= max_cache_keys \
                 RETURNING used_cache_keys, max_cache_keys, last_granted",
            )
            .bind(count)
            .bind(count)
            .bind(&r.account_id)
            .bind(count)
        }
        .fetch_optional(&self.pool)
        .await
        .map_err(ServiceError::from)?;
        match row {
            Some(row) => Ok(Response::new(ReserveKeysResp {
                used_cache_keys: row.try_get(0).map_err(ServiceError::from)?,
                max_cache_keys: row.try_get(1).map_err(ServiceError::from)?,
                granted: row.try_get(2).map_err(ServiceError::from)?,
            })),
            None => Err(over(&self.by_id(&r.account_id).await?).into()),
        }
    }

    async fn release_keys(
        &self,
        request: Request<ReleaseKeysReq>,
    ) -> Result<Response<ReleaseKeysResp>, Status> {
        let dry_run = is_dry_run(&request);
        let r = request.into_inner();
        let count = positive_count(r.count)?;
        if dry_run {
            self.by_id(&r.account_id).await?;
            return Ok(Response::new(ReleaseKeysResp {}));
        }
        let done = sqlx::query(
            "UPDATE accounts SET used_cache_keys = CASE WHEN used_cache_keys >= $1 \
             THEN used_cache_keys - $2 ELSE 0 END WHERE id = $3",
        )
        .bind(count)
        .bind(count)
        .bind(&r.account_id)
        .execute(&self.pool)
        .await
        .map_err(ServiceError::from)?;
        if done.rows_affected() == 0 {
            return Err(ServiceError::NotFound(format!(
                "account {:?} does not exist",
                r.account_id
            ))
            .into());
        }
        Ok(Response::new(ReleaseKeysResp {}))
    }
}
