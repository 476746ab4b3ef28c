//! Key reservations at the accounts service, coalesced per account (group commit).
//!
//! A Store of a new key takes one key of the account's quota with `ReserveKeys`. When Stores of one account
//! arrive while a reservation for it is in flight, they queue; the next call reserves for the whole queue at
//! once (`count = n`), so a burst of n Stores costs about two accounts calls instead of n, and the first Store
//! waits for nothing extra. The limit stays exact: every Store that succeeds holds a key reserved at accounts.
//! A batch asks `up_to` its size: when fewer keys are left, the first Stores in arrival order get them and the
//! rest fail with FAILED_PRECONDITION and a QuotaFailure, as a single Store over the limit does.
//!
//! Each batch is sent from a task of its own, in the request context of the member with the latest deadline
//! (trace id and deadline propagate as for any call), so a caller that goes away (cancelled, deadline
//! passed) never strands the others; a key reserved for a caller that is gone is released again.
//!
//! The count stays exact when an answer is lost (an accounts instance cut off after it applied a reservation,
//! a deadline passing in flight): every reservation carries an idempotency key (`reservation_id`, a UUID), and
//! when its outcome is unknown (any failure other than a definite refusal) it is undone by a `ReleaseKeys` with
//! that id, which gives back what it took or, if it has not arrived yet, makes it take nothing. Releases carry
//! their own `release_id` and, like the undoings, are retried off the request path with jittered backoff
//! (100 ms doubling to 5 s, for up to [`RELEASE_PATIENCE`]) until accounts answers; at most
//! [`MAX_PENDING_RELEASES`] wait at once (beyond that a release is logged and dropped: the count then stays too
//! high, never too low).

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    time::Duration,
};

use backon::{ExponentialBuilder, Retryable};

use keel_common::{Channel, ServiceError, config::Secret, context};
use keel_protos::rpc::{ReleaseKeysReq, ReserveKeysReq, accounts_client::AccountsClient};
use tokio::sync::oneshot;
use tonic::{Code, Request, Status};

/// How long a release (or the undoing of a reservation) sleeps between attempts in all: with the attempts
/// ([`RELEASE_ATTEMPT_TIMEOUT`] each, at most one per 100 ms to 5 s of sleep) well under the 10 minutes accounts
/// remembers its idempotency key (`accounts::storage::RETENTION`), so a late retry is still recognised.
pub const RELEASE_PATIENCE: Duration = Duration::from_secs(300);

/// How long one attempt of a release may take.
pub const RELEASE_ATTEMPT_TIMEOUT: Duration = Duration::from_secs(2);

/// Releases waiting to be retried at once, at most.
pub const MAX_PENDING_RELEASES: usize = 100_000;

type Waiter = (
    oneshot::Sender<Result<(), Status>>,
    Option<context::RequestContext>,
);

/// Reserves and releases quota keys of accounts.
#[derive(Clone, Debug)]
pub struct Quota {
    accounts: AccountsClient<Channel>,
    /// Presented to accounts on every call (`cache.accounts_token`).
    credential: Secret,
    /// Accounts with a batch in flight, and the Stores queued behind it.
    queues: Arc<Mutex<HashMap<String, Vec<Waiter>>>>,
    /// ReserveKeys calls made.
    calls: Arc<AtomicU64>,
    /// Releases sent or being retried now (at most [`MAX_PENDING_RELEASES`]).
    pending: Arc<AtomicUsize>,
}

impl Quota {
    /// Reservations at `accounts`, presenting `credential` (`authorization: Bearer`; empty: none).
    pub fn new(accounts: AccountsClient<Channel>, credential: Secret) -> Self {
        Self {
            accounts,
            credential,
            queues: Arc::default(),
            calls: Arc::default(),
            pending: Arc::default(),
        }
    }

    /// `message` as a request carrying this cache's credential.
    fn credentialed<T>(&self, message: T) -> Request<T> {
        let mut req = Request::new(message);
        context::set_bearer_token(&mut req, &self.credential);
        req
    }

    /// ReserveKeys calls made so far (not counting dry runs): how well reservations are being shared.
    pub fn reservation_calls(&self) -> u64 {
        self.calls.load(Ordering::Relaxed)
    }

    /// Takes one key of `account_id`'s quota.
    ///
    /// # Errors
    /// The accounts service's status: FAILED_PRECONDITION with a QuotaFailure when the account has no key left,
    /// NOT_FOUND, UNAVAILABLE, DEADLINE_EXCEEDED…
    pub async fn reserve(&self, account_id: &str) -> Result<(), Status> {
        let (tx, rx) = oneshot::channel();
        let waiter = (tx, context::current());
        let lead = {
            let mut queues = self.queues.lock().unwrap_or_else(|p| p.into_inner());
            match queues.get_mut(account_id) {
                Some(queue) => {
                    queue.push(waiter);
                    None
                }
                None => {
                    queues.insert(account_id.to_owned(), Vec::new());
                    Some(waiter)
                }
            }
        };
        if let Some(first) = lead {
            tokio::spawn(self.clone().drain(account_id.to_owned(), vec![first]));
        }
        rx.await.unwrap_or_else(|_| {
            Err(ServiceError::Internal(anyhow::anyhow!("quota reservation abandoned")).into())
        })
    }

    /// Checks that one key could be taken now, taking none (the call carries `dry-run: true`).
    ///
    /// # Errors
    /// As [`Quota::reserve`].
    pub async fn check(&self, account_id: &str) -> Result<(), Status> {
        let mut req = self.credentialed(ReserveKeysReq {
            account_id: account_id.to_owned(),
            count: 1,
            up_to: false,
            reservation_id: String::new(),
        });
        req.metadata_mut()
            .insert(context::DRY_RUN, "true".parse().expect("ascii"));
        self.accounts.clone().reserve_keys(req).await.map(drop)
    }

    /// Gives `count` keys of `account_id` back, off the request path (see the module docs for the retries).
    pub fn release(&self, account_id: String, count: i64) {
        if count > 0 {
            self.settle(ReleaseKeysReq {
                account_id,
                count,
                release_id: uuid::Uuid::now_v7().to_string(),
                reservation_id: String::new(),
            });
        }
    }

    /// Undoes reservation `reservation_id` of `account_id`, whose answer never came, off the request path.
    fn undo(&self, account_id: String, reservation_id: String) {
        self.settle(ReleaseKeysReq {
            account_id,
            count: 0,
            release_id: String::new(),
            reservation_id,
        });
    }

    /// Sends `release` until accounts answers it (it is idempotent), for up to [`RELEASE_PATIENCE`].
    fn settle(&self, release: ReleaseKeysReq) {
        if self.pending.fetch_add(1, Ordering::Relaxed) >= MAX_PENDING_RELEASES {
            self.pending.fetch_sub(1, Ordering::Relaxed);
            tracing::warn!(
                account_id = release.account_id,
                count = release.count,
                reservation_id = release.reservation_id,
                "quota release dropped: {MAX_PENDING_RELEASES} already waiting"
            );
            return;
        }
        let this = self.clone();
        tokio::spawn(async move {
            let send = || {
                let mut client = this.accounts.clone();
                let mut req = this.credentialed(release.clone());
                // Attempts and sleeps together stay well inside the 10 minutes accounts remembers the key.
                req.set_timeout(RELEASE_ATTEMPT_TIMEOUT);
                async move { client.release_keys(req).await }
            };
            let backoff = ExponentialBuilder::new()
                .with_min_delay(Duration::from_millis(100))
                .with_max_delay(Duration::from_secs(5))
                .with_jitter()
                .without_max_times()
                .with_total_delay(Some(RELEASE_PATIENCE));
            let outcome = send
                .retry(backoff)
                .when(|status: &Status| !answered(status.code()))
                .await;
            if let Err(e) = outcome {
                tracing::warn!(
                    account_id = release.account_id,
                    count = release.count,
                    reservation_id = release.reservation_id,
                    error = %e,
                    "quota release failed"
                );
            }
            this.pending.fetch_sub(1, Ordering::Relaxed);
        });
    }

    /// Serves batches of `account_id` until its queue is empty.
    async fn drain(self, account_id: String, mut batch: Vec<Waiter>) {
        loop {
            batch.retain(|(tx, _)| !tx.is_closed());
            if !batch.is_empty() {
                let ctx = batch
                    .iter()
                    .filter_map(|(_, c)| c.clone())
                    // The latest deadline; no deadline at all is later still.
                    .max_by_key(|c| (c.deadline.is_none(), c.deadline));
                let work = self.serve(&account_id, std::mem::take(&mut batch));
                match ctx {
                    Some(ctx) => context::scope(ctx, work).await,
                    None => work.await,
                }
            }
            let mut queues = self.queues.lock().unwrap_or_else(|p| p.into_inner());
            match queues.get_mut(&account_id) {
                Some(queue) if !queue.is_empty() => batch = std::mem::take(queue),
                _ => {
                    queues.remove(&account_id);
                    return;
                }
            }
        }
    }

    /// One `up_to` reservation for the whole batch; the keys granted go to its first members.
    async fn serve(&self, account_id: &str, batch: Vec<Waiter>) {
        self.calls.fetch_add(1, Ordering::Relaxed);
        let reservation_id = uuid::Uuid::now_v7().to_string();
        let reply = self
            .accounts
            .clone()
            .reserve_keys(self.credentialed(ReserveKeysReq {
                account_id: account_id.to_owned(),
                count: batch.len() as i64,
                up_to: true,
                reservation_id: reservation_id.clone(),
            }))
            .await
            .map(tonic::Response::into_inner);
        if let Err(status) = &reply
            && !answered(status.code())
        {
            // It may have been applied with its answer lost: undo it, whatever happened.
            self.undo(account_id.to_owned(), reservation_id);
        }
        let (granted, refusal) = match reply {
            Ok(r) => {
                let refusal = Status::from(ServiceError::QuotaExceeded {
                    subject: format!("account:{account_id}"),
                    description: format!(
                        "max_cache_keys {} reached ({} in use)",
                        r.max_cache_keys, r.used_cache_keys
                    ),
                });
                (r.granted.max(0) as usize, refusal)
            }
            Err(status) => (0, status),
        };
        // Keys granted to callers that are gone go back.
        let mut unused = 0;
        for (i, (tx, _)) in batch.into_iter().enumerate() {
            let result = if i < granted {
                Ok(())
            } else {
                Err(refusal.clone())
            };
            if tx.send(result).is_err() && i < granted {
                unused += 1;
            }
        }
        self.release(account_id.to_owned(), unused);
    }
}

/// Whether a call that failed with `code` was answered by the accounts service itself, so that it certainly
/// did nothing (a refusal); any other failure (UNAVAILABLE, DEADLINE_EXCEEDED, CANCELLED, INTERNAL…) may come
/// after it was applied.
fn answered(code: Code) -> bool {
    matches!(
        code,
        Code::InvalidArgument
            | Code::NotFound
            | Code::FailedPrecondition
            | Code::PermissionDenied
            | Code::Unauthenticated
            | Code::Aborted
    )
}
