//! KillrVideo `UserManagementService` (spec `killrvideo-semantics.md` §3): CreateUser, VerifyCredentials,
//! GetUserProfile.
//!
//! - Passwords are hashed with argon2id (off the async runtime); VerifyCredentials answers the same
//!   UNAUTHENTICATED "Email address or password are not correct." for an unknown email and a wrong password,
//!   and verifies a dummy hash for an unknown email so timing does not tell them apart either.
//! - Email uniqueness is the credentials table's primary key, so it holds under concurrent creates; a
//!   duplicate is ALREADY_EXISTS "Exception creating user because it already exists with email <email>".
//! - `dry-run: true` metadata on the mutating call validates it and answers as it would, writing nothing.
//! - Password work is bounded ([`Guard`]): argon2 hashes run at most `user_management.max_concurrent_hashes`
//!   at once, and failed logins are limited per email (5) and per peer address (50) within 5 minutes
//!   (RESOURCE_EXHAUSTED with RetryInfo past the limit, before any hashing).
//! - `UserCreated` goes to `topic-kv-userCreation` through the transactional outbox, in the same transaction
//!   as the user.

mod guard;
mod storage;

use std::sync::Arc;

use keel_common::db::Pool;
use keel_common::{Resources, Server, Service, ServiceError, Storage, outbox::Outbox};
use keel_protos::killrvideo::user_management::{
    CreateUserRequest, CreateUserResponse, GetUserProfileRequest, GetUserProfileResponse,
    UserProfile, VerifyCredentialsRequest, VerifyCredentialsResponse,
    user_management_service_server::{UserManagementService, UserManagementServiceServer},
};
use killrvideo::{MAX_IDS_PER_REQUEST, ids, limits, required_text};
use tonic::{Request, Response, Status};

pub use guard::{Guard, GuardSettings};
pub use storage::{CreateOutcome, Store};

/// Consul service name and database name.
pub const SERVICE: &str = "user-management";

/// The migrations of this service's database.
pub static MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// The message VerifyCredentials gives for an unknown email and for a wrong password alike (spec §3.2).
pub const BAD_CREDENTIALS: &str = "Email address or password are not correct.";

/// The gRPC handler: a thin adapter over [`Store`], its password work bounded by a [`Guard`].
#[derive(Clone, Debug)]
pub struct UserManagement {
    store: Store,
    guard: Guard,
    /// Verified for unknown emails so the answer takes as long as for a wrong password.
    dummy_hash: Arc<String>,
}

impl UserManagement {
    /// The service over `pool` (already migrated), publishing through `outbox`, with the default bounds.
    pub fn new(pool: Pool, outbox: Outbox) -> Self {
        Self::with_guard(pool, outbox, Guard::new(GuardSettings::default()))
    }

    /// The service with the bounds of `guard`.
    pub fn with_guard(pool: Pool, outbox: Outbox, guard: Guard) -> Self {
        Self {
            store: Store::new(pool, outbox),
            guard,
            dummy_hash: Arc::new(hash_password("not a password").unwrap_or_default()),
        }
    }

    /// The bounds on password work.
    pub fn guard(&self) -> &Guard {
        &self.guard
    }
}

impl Service for UserManagement {
    const NAME: &'static str = SERVICE;
    /// `KEEL_USER_MANAGEMENT__…`: a shell cannot set a variable with `-` in its name.
    const SECTION: &'static str = "user_management";
    type Settings = GuardSettings;

    fn storage() -> Storage {
        Storage::with_outbox(&MIGRATIONS)
    }

    async fn open(r: Resources<GuardSettings>) -> anyhow::Result<Self> {
        let db = r.database()?;
        Ok(Self::with_guard(db.pool, db.outbox, Guard::new(r.settings)))
    }

    fn add_to(self, server: Server) -> Server {
        server.add_service(UserManagementServiceServer::new(self))
    }
}

fn hash_password(password: &str) -> anyhow::Result<String> {
    use argon2::{Argon2, PasswordHasher};
    // A fresh random salt per hash (argon2's `getrandom` feature), PHC string format.
    Ok(Argon2::default()
        .hash_password(password.as_bytes())
        .map_err(|e| anyhow::anyhow!("argon2: {e}"))?
        .to_string())
}

fn verify_password(password: &str, hash: &str) -> bool {
    use argon2::{Argon2, PasswordHash, PasswordVerifier};
    PasswordHash::new(hash)
        .map(|h| {
            Argon2::default()
                .verify_password(password.as_bytes(), &h)
                .is_ok()
        })
        .unwrap_or(false)
}

#[tonic::async_trait]
impl UserManagementService for UserManagement {
    async fn create_user(
        &self,
        request: Request<CreateUserRequest>,
    ) -> Result<Response<CreateUserResponse>, Status> {
        let dry_run = keel_common::context::is_dry_run(&request);
        let r = request.into_inner();
        let user_id = ids::required("user_id", r.user_id.as_ref())?;
        let email = required_text("email", &r.email, "create user")?
            .trim()
            .to_owned();
        let password = required_text("password", &r.password, "create user")?.to_owned();
        limits::chars("email", &email, limits::EMAIL_CHARS)?;
        limits::bytes("password", &password, limits::PASSWORD_BYTES)?;
        limits::chars("first_name", &r.first_name, limits::PERSON_NAME_CHARS)?;
        limits::chars("last_name", &r.last_name, limits::PERSON_NAME_CHARS)?;
        if dry_run {
            // Reports what would happen: a taken email is the answer a real create would give.
            return match self
                .store
                .credentials(&email)
                .await
                .map_err(ServiceError::from)?
            {
                Some(_) => Err(ServiceError::AlreadyExists(format!(
                    "Exception creating user because it already exists with email {email}"
                ))
                .into()),
                None => Ok(Response::new(CreateUserResponse {})),
            };
        }
        let hash = self
            .guard
            .hash(move || hash_password(&password))
            .await?
            .map_err(ServiceError::Internal)?;
        let outcome = self
            .store
            .create(user_id, &r.first_name, &r.last_name, &email, &hash)
            .await
            .map_err(ServiceError::from)?;
        match outcome {
            CreateOutcome::Created => Ok(Response::new(CreateUserResponse {})),
            CreateOutcome::EmailTaken => Err(ServiceError::AlreadyExists(format!(
                "Exception creating user because it already exists with email {email}"
            ))
            .into()),
            CreateOutcome::UserIdTaken => Err(ServiceError::AlreadyExists(format!(
                "Exception creating user because it already exists with user id {user_id}"
            ))
            .into()),
        }
    }

    async fn verify_credentials(
        &self,
        request: Request<VerifyCredentialsRequest>,
    ) -> Result<Response<VerifyCredentialsResponse>, Status> {
        let peer = request.remote_addr().map(|a| a.ip().to_string());
        let r = request.into_inner();
        let email = required_text("email", &r.email, "verify credentials")?
            .trim()
            .to_owned();
        let password = required_text("password", &r.password, "verify credentials")?.to_owned();
        limits::chars("email", &email, limits::EMAIL_CHARS)?;
        limits::bytes("password", &password, limits::PASSWORD_BYTES)?;
        self.guard.check(&email, peer.as_deref()).await?;
        let found = self
            .store
            .credentials(&email)
            .await
            .map_err(ServiceError::from)?;
        let (hash, user_id) = match &found {
            Some((hash, user_id)) => (hash.clone(), Some(*user_id)),
            None => (self.dummy_hash.as_ref().clone(), None),
        };
        let ok = self
            .guard
            .hash(move || verify_password(&password, &hash))
            .await?;
        match user_id {
            Some(id) if ok => {
                self.guard.succeeded(&email).await;
                Ok(Response::new(VerifyCredentialsResponse {
                    user_id: Some(ids::uuid(id)),
                }))
            }
            _ => {
                self.guard.failed(&email, peer.as_deref()).await;
                Err(ServiceError::Unauthenticated(BAD_CREDENTIALS.into()).into())
            }
        }
    }

    async fn get_user_profile(
        &self,
        request: Request<GetUserProfileRequest>,
    ) -> Result<Response<GetUserProfileResponse>, Status> {
        let r = request.into_inner();
        let ids = ids::required_list(
            "user_ids",
            &r.user_ids,
            &format!("Cannot get more than {MAX_IDS_PER_REQUEST} user profiles at once"),
        )?;
        let profiles = self
            .store
            .profiles(&ids)
            .await
            .map_err(ServiceError::from)?
            .into_iter()
            .map(|u| UserProfile {
                user_id: Some(ids::uuid(u.user_id)),
                first_name: u.first_name,
                last_name: u.last_name,
                email: u.email,
            })
            .collect();
        Ok(Response::new(GetUserProfileResponse { profiles }))
    }
}
