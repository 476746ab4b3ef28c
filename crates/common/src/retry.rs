//! Retries of idempotent calls at the typed call site, with jittered exponential backoff inside the caller's
//! deadline and a retry budget, so a retry storm cannot amplify an outage.
//!
//! tower's `Retry` cannot clone tonic request bodies, so retries wrap the typed call instead:
//! `policy.call(Idempotent::Yes, || client.clone().get(req.clone())).await`.
//!
//! What is retried: UNAVAILABLE only (the request was not processed, or the server said it cannot take it now),
//! and only for idempotent calls. A server's `grpc-retry-pushback-ms` (gRPC proposal A6) is honoured: the next
//! attempt waits exactly that long instead of the backoff, and a negative or malformed one stops retrying. The budget follows Linkerd's: retries may add at most 20% to the requests of
//! the last 10 seconds, plus 10 retries per second of slack.

use std::{
    future::Future,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use rand::RngExt;
use tonic::{Code, Status};

use crate::live::LiveCount;

/// Whether repeating a call is safe.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Idempotent {
    /// Safe to repeat (reads, puts of the same value).
    Yes,
    /// Not safe: never retried.
    No,
}

#[derive(Debug)]
struct Window {
    started: Instant,
    requests: u64,
    retries: u64,
}

/// A shared allowance of retries: `ratio` × requests in the window + `min_per_sec` × window seconds.
#[derive(Debug)]
pub struct RetryBudget {
    ratio: f64,
    min_per_sec: f64,
    window: Duration,
    state: Mutex<Window>,
}

impl Default for RetryBudget {
    fn default() -> Self {
        Self::new(0.2, 10.0, Duration::from_secs(10))
    }
}

impl RetryBudget {
    /// A budget of `ratio` of requests plus `min_per_sec` retries per second, over a sliding `window`.
    pub fn new(ratio: f64, min_per_sec: f64, window: Duration) -> Self {
        Self {
            ratio,
            min_per_sec,
            window,
            state: Mutex::new(Window {
                started: Instant::now(),
                requests: 0,
                retries: 0,
            }),
        }
    }

    fn roll(&self, w: &mut Window) {
        if w.started.elapsed() >= self.window {
            *w = Window {
                started: Instant::now(),
                requests: 0,
                retries: 0,
            };
        }
    }

    /// Records an original (first-attempt) request.
    pub fn deposit(&self) {
        let mut w = self.state.lock().expect("budget");
        self.roll(&mut w);
        w.requests += 1;
    }

    /// Takes one retry from the budget, if any is left.
    pub fn withdraw(&self) -> bool {
        let mut w = self.state.lock().expect("budget");
        self.roll(&mut w);
        let allowed = self.ratio * w.requests as f64 + self.min_per_sec * self.window.as_secs_f64();
        if (w.retries as f64) < allowed {
            w.retries += 1;
            true
        } else {
            false
        }
    }
}

/// Attempts, backoff and the shared budget.
#[derive(Clone, Debug)]
pub struct RetryPolicy {
    max_attempts: LiveCount,
    base: Duration,
    cap: Duration,
    budget: Arc<RetryBudget>,
}

impl RetryPolicy {
    /// `max_attempts` counts the first try; backoff starts at 25 ms and doubles up to 1 s, full jitter.
    pub fn new(max_attempts: u32, budget: Arc<RetryBudget>) -> Self {
        Self::live(LiveCount::new(max_attempts), budget)
    }

    /// [`Self::new`] with the attempts read at each call (`client.max_attempts`, changed live).
    pub fn live(max_attempts: LiveCount, budget: Arc<RetryBudget>) -> Self {
        Self {
            max_attempts,
            base: Duration::from_millis(25),
            cap: Duration::from_secs(1),
            budget,
        }
    }

    fn backoff(&self, retry: u32) -> Duration {
        let exp = self
            .base
            .saturating_mul(2u32.saturating_pow(retry.min(16)))
            .min(self.cap);
        rand::rng().random_range(Duration::ZERO..=exp)
    }

    /// Runs `attempt` until it succeeds, fails with a status that is not retried, runs out of attempts or
    /// budget, or the next backoff would pass the deadline of the incoming request (when there is one).
    pub async fn call<T, F, Fut>(&self, idempotent: Idempotent, mut attempt: F) -> Result<T, Status>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, Status>>,
    {
        self.budget.deposit();
        let deadline = crate::context::current().and_then(|c| c.deadline);
        let mut tries = 0;
        loop {
            tries += 1;
            let err = match attempt().await {
                Ok(v) => return Ok(v),
                Err(e) => e,
            };
            if idempotent == Idempotent::No
                || err.code() != Code::Unavailable
                || tries >= self.max_attempts.get().max(1)
            {
                return Err(err);
            }
            let wait = match pushback(&err) {
                Some(Some(wait)) => wait,
                Some(None) => return Err(err),
                None => self.backoff(tries - 1),
            };
            if deadline.is_some_and(|d| Instant::now() + wait >= d) {
                return Err(err);
            }
            if !self.budget.withdraw() {
                tracing::debug!("retry budget exhausted");
                return Err(err);
            }
            tracing::debug!(attempt = tries, wait = ?wait, error = %err.message(), "retrying");
            tokio::time::sleep(wait).await;
        }
    }
}

/// What a `grpc-retry-pushback-ms` value says (gRPC proposal A6): the wait before the next attempt, or `None`
/// for "do not retry" (negative or malformed).
pub(crate) fn pushback_wait(value: &[u8]) -> Option<Duration> {
    std::str::from_utf8(value)
        .ok()
        .and_then(|s| s.parse::<i64>().ok())
        .filter(|ms| *ms >= 0)
        .map(|ms| Duration::from_millis(ms as u64))
}

/// What the server's `grpc-retry-pushback-ms` says: `None` without one, `Some(None)` for "do not retry".
fn pushback(status: &Status) -> Option<Option<Duration>> {
    let v = status.metadata().get("grpc-retry-pushback-ms")?;
    Some(pushback_wait(v.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    fn policy(attempts: u32, budget: RetryBudget) -> RetryPolicy {
        RetryPolicy::new(attempts, Arc::new(budget))
    }

    /// UNAVAILABLE with `grpc-retry-pushback-ms: ms`.
    fn pushed_back(ms: &str) -> Status {
        let mut m = tonic::metadata::MetadataMap::new();
        m.insert("grpc-retry-pushback-ms", ms.parse().unwrap());
        Status::with_metadata(Code::Unavailable, "not ready", m)
    }

    #[tokio::test(start_paused = true)]
    async fn a_servers_pushback_sets_the_wait_or_stops_retrying() {
        let p = policy(3, RetryBudget::default());
        let n = AtomicU32::new(0);
        let start = tokio::time::Instant::now();
        let _ = p
            .call(Idempotent::Yes, || async {
                n.fetch_add(1, Ordering::SeqCst);
                Err::<(), _>(pushed_back("40"))
            })
            .await;
        assert_eq!(n.load(Ordering::SeqCst), 3);
        // Two waits of exactly the pushback (the clock is paused: only the sleeps move it).
        assert_eq!(start.elapsed(), Duration::from_millis(80));

        n.store(0, Ordering::SeqCst);
        let _ = p
            .call(Idempotent::Yes, || async {
                n.fetch_add(1, Ordering::SeqCst);
                Err::<(), _>(pushed_back("-1"))
            })
            .await;
        assert_eq!(n.load(Ordering::SeqCst), 1, "a negative pushback: no retry");
    }

    #[tokio::test(start_paused = true)]
    async fn a_call_discovery_found_no_instance_for_fails_at_once_without_retries() {
        use keel_protos::keel::example::v1::{EchoRequest, echo_client::EchoClient};
        let settings =
            crate::Settings::from_env("retry-test", &crate::config::Env::default()).unwrap();
        let factory = crate::ClientFactory::new(&settings, crate::Metrics::disabled());
        // Discovery answered: no healthy instance.
        let (_tx, none) = tokio::sync::watch::channel(Some(Vec::new()));
        let client = EchoClient::new(factory.balanced("echo", none));
        let p = policy(3, RetryBudget::default());
        let n = AtomicU32::new(0);
        let start = tokio::time::Instant::now();
        let err = p
            .call(Idempotent::Yes, || {
                n.fetch_add(1, Ordering::SeqCst);
                let mut c = client.clone();
                async move { c.echo(EchoRequest::default()).await }
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::Unavailable);
        assert!(err.message().contains("no healthy instance"), "{err:?}");
        assert_eq!(n.load(Ordering::SeqCst), 1, "not retried");
        assert_eq!(start.elapsed(), Duration::ZERO, "no backoff waited");
    }

    #[tokio::test]
    async fn retries_unavailable_for_idempotent_calls_only() {
        let p = policy(3, RetryBudget::default());
        let n = AtomicU32::new(0);
        let r: Result<(), Status> = p
            .call(Idempotent::Yes, || async {
                n.fetch_add(1, Ordering::SeqCst);
                Err(Status::unavailable("down"))
            })
            .await;
        assert_eq!(r.unwrap_err().code(), Code::Unavailable);
        assert_eq!(n.load(Ordering::SeqCst), 3);

        n.store(0, Ordering::SeqCst);
        let _ = p
            .call(Idempotent::No, || async {
                n.fetch_add(1, Ordering::SeqCst);
                Err::<(), _>(Status::unavailable("x"))
            })
            .await;
        assert_eq!(
            n.load(Ordering::SeqCst),
            1,
            "non-idempotent calls are never retried"
        );

        n.store(0, Ordering::SeqCst);
        let _ = p
            .call(Idempotent::Yes, || async {
                n.fetch_add(1, Ordering::SeqCst);
                Err::<(), _>(Status::invalid_argument("x"))
            })
            .await;
        assert_eq!(
            n.load(Ordering::SeqCst),
            1,
            "permanent errors are not retried"
        );

        n.store(0, Ordering::SeqCst);
        let ok = p
            .call(Idempotent::Yes, || async {
                if n.fetch_add(1, Ordering::SeqCst) == 0 {
                    Err(Status::unavailable("blip"))
                } else {
                    Ok(7)
                }
            })
            .await;
        assert_eq!(ok.unwrap(), 7);
    }

    #[test]
    fn budget_limits_retries_to_a_share_of_requests() {
        let b = RetryBudget::new(0.2, 0.0, Duration::from_secs(60));
        for _ in 0..100 {
            b.deposit();
        }
        let granted = (0..100).filter(|_| b.withdraw()).count();
        assert_eq!(granted, 20);
    }

    #[tokio::test]
    async fn no_retry_past_the_incoming_deadline() {
        let p = policy(10, RetryBudget::default());
        let n = AtomicU32::new(0);
        let ctx = crate::context::RequestContext {
            trace_id: "t".into(),
            deadline: Some(Instant::now() + Duration::from_millis(1)),
        };
        let _ = crate::context::scope(ctx, async {
            tokio::time::sleep(Duration::from_millis(2)).await;
            p.call(Idempotent::Yes, || async {
                n.fetch_add(1, Ordering::SeqCst);
                Err::<(), _>(Status::unavailable("x"))
            })
            .await
        })
        .await;
        assert_eq!(n.load(Ordering::SeqCst), 1);
    }
}
