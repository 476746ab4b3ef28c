//! Bounds on password work: argon2 hashes run at most `user_management.max_concurrent_hashes` at once (memory
//! stays bounded under a flood of logins: each hash takes 19 MiB), and failed logins are limited per email and
//! per peer address within a window (RESOURCE_EXHAUSTED with `RetryInfo` past the limit, before any hashing).
//! Counters are per instance, in memory, bounded in entries.

use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use keel_common::ServiceError;
use serde::{Deserialize, Serialize};
use tokio::sync::Semaphore;

/// The `[user_management]` configuration section.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(default)]
pub struct GuardSettings {
    /// Password hashes computed at once (`user_management.max_concurrent_hashes`); 0: the number of CPUs.
    pub max_concurrent_hashes: usize,
    /// Failed logins of one email within `failed_login_window` before further attempts are refused
    /// (`user_management.failed_logins_per_email`, default 5).
    pub failed_logins_per_email: u32,
    /// Failed logins from one peer address within the window (`user_management.failed_logins_per_peer`,
    /// default 50).
    pub failed_logins_per_peer: u32,
    /// The window (`user_management.failed_login_window`, default 5m).
    #[serde(with = "humantime_serde")]
    pub failed_login_window: Duration,
}

impl Default for GuardSettings {
    fn default() -> Self {
        Self {
            max_concurrent_hashes: 0,
            failed_logins_per_email: 5,
            failed_logins_per_peer: 50,
            failed_login_window: Duration::from_secs(300),
        }
    }
}

impl keel_common::config::SectionSettings for GuardSettings {
    fn validate(&self, section: &str) -> Vec<keel_common::config::ConfigError> {
        let mut errors = Vec::new();
        for (key, zero) in [
            ("failed_logins_per_email", self.failed_logins_per_email == 0),
            ("failed_logins_per_peer", self.failed_logins_per_peer == 0),
            ("failed_login_window", self.failed_login_window.is_zero()),
        ] {
            if zero {
                errors.push(keel_common::config::ConfigError {
                    key: format!("{section}.{key}"),
                    message: "must be greater than zero".into(),
                });
            }
        }
        errors
    }
}

/// Failures of one email or peer in the current window.
#[derive(Clone, Copy, Debug)]
struct Failures {
    count: u32,
    since: Instant,
}

/// The bounds; cheap to clone.
#[derive(Clone, Debug)]
pub struct Guard {
    settings: GuardSettings,
    hashing: Arc<Semaphore>,
    in_flight: Arc<AtomicUsize>,
    peak: Arc<AtomicUsize>,
    failures: moka::future::Cache<String, Failures>,
}

impl Guard {
    /// Bounds as `settings` say.
    pub fn new(settings: GuardSettings) -> Self {
        let permits = match settings.max_concurrent_hashes {
            0 => std::thread::available_parallelism().map_or(2, |n| n.get()),
            n => n,
        };
        Self {
            failures: moka::future::Cache::builder()
                .max_capacity(100_000)
                .time_to_live(settings.failed_login_window)
                .build(),
            hashing: Arc::new(Semaphore::new(permits)),
            in_flight: Arc::default(),
            peak: Arc::default(),
            settings,
        }
    }

    /// Runs the password work `f` off the async runtime, at most `max_concurrent_hashes` at once (callers
    /// beyond wait their turn, within their deadline).
    ///
    /// # Errors
    /// The blocking task panicked (INTERNAL).
    pub async fn hash<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, ServiceError> {
        let _permit = self
            .hashing
            .acquire()
            .await
            .map_err(|e| ServiceError::Internal(e.into()))?;
        let now = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        self.peak.fetch_max(now, Ordering::SeqCst);
        let done = tokio::task::spawn_blocking(f).await;
        self.in_flight.fetch_sub(1, Ordering::SeqCst);
        done.map_err(|e| ServiceError::Internal(e.into()))
    }

    /// The most hashes that ran at once so far.
    pub fn peak_concurrent_hashes(&self) -> usize {
        self.peak.load(Ordering::SeqCst)
    }

    fn keys(email: &str, peer: Option<&str>) -> Vec<(String, bool)> {
        let mut keys = vec![(format!("email:{}", email.to_lowercase()), true)];
        keys.extend(peer.map(|p| (format!("peer:{p}"), false)));
        keys
    }

    /// RESOURCE_EXHAUSTED with `RetryInfo` when `email` or `peer` already failed their limit in this window.
    ///
    /// # Errors
    /// As above.
    pub async fn check(&self, email: &str, peer: Option<&str>) -> Result<(), ServiceError> {
        let window = self.settings.failed_login_window;
        for (key, is_email) in Self::keys(email, peer) {
            let limit = if is_email {
                self.settings.failed_logins_per_email
            } else {
                self.settings.failed_logins_per_peer
            };
            if let Some(f) = self.failures.get(&key).await {
                let left = window.saturating_sub(f.since.elapsed());
                if f.count >= limit && !left.is_zero() {
                    let whose = if is_email {
                        "this email"
                    } else {
                        "this address"
                    };
                    return Err(ServiceError::ResourceExhausted {
                        message: format!(
                            "too many failed logins for {whose}; try again in {}s",
                            left.as_secs().max(1)
                        ),
                        retry_after: left,
                    });
                }
            }
        }
        Ok(())
    }

    /// Counts one failed login of `email` from `peer`.
    pub async fn failed(&self, email: &str, peer: Option<&str>) {
        let window = self.settings.failed_login_window;
        for (key, _) in Self::keys(email, peer) {
            self.failures
                .entry(key)
                .and_upsert_with(|old| async move {
                    match old.map(|e| e.into_value()) {
                        Some(f) if f.since.elapsed() < window => Failures {
                            count: f.count.saturating_add(1),
                            since: f.since,
                        },
                        _ => Failures {
                            count: 1,
                            since: Instant::now(),
                        },
                    }
                })
                .await;
        }
    }

    /// Forgets the failures of `email` (a successful login).
    pub async fn succeeded(&self, email: &str) {
        self.failures
            .invalidate(&format!("email:{}", email.to_lowercase()))
            .await;
    }
}
