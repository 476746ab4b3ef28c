//! Users and credentials in the service's own database (PostgreSQL or SQLite).

use keel_common::db::Pool;
use keel_common::{outbox, outbox::Outbox};
use keel_protos::killrvideo::user_management::events::UserCreated;
use killrvideo::{
    ids,
    sql::{Sql, uuid_at},
    time, topics,
};
use prost::Message;
use sqlx::Row;
use uuid::Uuid;

/// What a create did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CreateOutcome {
    /// The user and its credentials were written, and UserCreated queued.
    Created,
    /// Another user has this email: nothing was written.
    EmailTaken,
    /// Another user has this id: nothing was written.
    UserIdTaken,
}

/// One stored profile.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredUser {
    /// The user.
    pub user_id: Uuid,
    /// First name.
    pub first_name: String,
    /// Last name.
    pub last_name: String,
    /// Email.
    pub email: String,
}

/// The user-management tables.
#[derive(Clone, Debug)]
pub struct Store {
    pool: Pool,
    outbox: Outbox,
}

impl Store {
    /// The store over a migrated `pool`.
    pub fn new(pool: Pool, outbox: Outbox) -> Self {
        Self { pool, outbox }
    }

    /// Writes credentials, profile and the UserCreated event in one transaction; the email's primary key makes
    /// a concurrent duplicate lose cleanly.
    ///
    /// # Errors
    /// Database failures.
    pub async fn create(
        &self,
        user_id: Uuid,
        first_name: &str,
        last_name: &str,
        email: &str,
        password_hash: &str,
    ) -> Result<CreateOutcome, sqlx::Error> {
        let id = user_id.hyphenated().to_string();
        let now = time::now_ms();
        let mut tx = self.pool.begin().await?;
        let creds = sqlx::query(
            "INSERT INTO user_credentials (email, password, userid) VALUES ($1, $2, $3) \
             ON CONFLICT (email) DO NOTHING",
        )
        .bind(email)
        .bind(password_hash)
        .bind(&id)
        .execute(&mut *tx)
        .await?;
        if creds.rows_affected() == 0 {
            tx.rollback().await?;
            return Ok(CreateOutcome::EmailTaken);
        }
        let user = sqlx::query(
            "INSERT INTO users (userid, firstname, lastname, email, created_ms) VALUES ($1, $2, $3, $4, $5) \
             ON CONFLICT (userid) DO NOTHING",
        )
        .bind(&id)
        .bind(first_name)
        .bind(last_name)
        .bind(email)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        if user.rows_affected() == 0 {
            tx.rollback().await?;
            return Ok(CreateOutcome::UserIdTaken);
        }
        let event = UserCreated {
            user_id: Some(ids::uuid(user_id)),
            first_name: first_name.to_owned(),
            last_name: last_name.to_owned(),
            email: email.to_owned(),
            timestamp: Some(time::to_timestamp(now)),
        };
        outbox::enqueue(
            &mut tx,
            topics::USER_CREATED,
            &user_id.to_string(),
            &event.encode_to_vec(),
        )
        .await?;
        tx.commit().await?;
        self.outbox.wake();
        Ok(CreateOutcome::Created)
    }

    /// The password hash and user id stored for `email` (exact match).
    ///
    /// # Errors
    /// Database failures.
    pub async fn credentials(&self, email: &str) -> Result<Option<(String, Uuid)>, sqlx::Error> {
        let row = sqlx::query("SELECT password, userid FROM user_credentials WHERE email = $1")
            .bind(email)
            .fetch_optional(&self.pool)
            .await?;
        row.map(|r| Ok((r.try_get(0)?, uuid_at(&r, 1)?)))
            .transpose()
    }

    /// The profiles of those of `ids` that exist, in request order.
    ///
    /// # Errors
    /// Database failures.
    pub async fn profiles(&self, ids: &[Uuid]) -> Result<Vec<StoredUser>, sqlx::Error> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let mut sql =
            Sql::new("SELECT userid, firstname, lastname, email FROM users WHERE userid IN (");
        let list = sql.bind_list(ids.iter().copied());
        sql.push(&list).push(")");
        let rows = sql.query().fetch_all(&self.pool).await?;
        let mut users = rows
            .into_iter()
            .map(|r| {
                Ok(StoredUser {
                    user_id: uuid_at(&r, 0)?,
                    first_name: r.try_get(1)?,
                    last_name: r.try_get(2)?,
                    email: r.try_get(3)?,
                })
            })
            .collect::<Result<Vec<_>, sqlx::Error>>()?;
        users.sort_by_key(|u| ids.iter().position(|o| *o == u.user_id));
        Ok(users)
    }
}
