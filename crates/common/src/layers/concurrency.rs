//! The server's concurrency limit, with load shedding: at most `grpc.max_concurrent_requests` calls at once,
//! counted for their whole life — a streaming response holds its slot until its last message (or its deadline,
//! or the client going away), not only until its headers. A call over the limit is answered RESOURCE_EXHAUSTED
//! at once, before any handler runs, so callers back off instead of queueing; any other error of the stack
//! becomes an opaque INTERNAL, logged in full.

use std::{
    convert::Infallible,
    future::Future,
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use http::{Request, Response};
use http_body::{Body as HttpBody, Frame, SizeHint};
use pin_project_lite::pin_project;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tonic::body::Body;
use tower::{BoxError, Layer, Service};

use crate::{context::CallDeadline, error::layer_status};

/// Makes [`ConcurrencyLimit`]: one semaphore shared by every connection of the server.
#[derive(Clone, Debug)]
pub struct ConcurrencyLimitLayer {
    limit: Arc<Limit>,
    default_timeout: Duration,
}

/// The slots, and how many of those in use are to vanish when given back (the limit was lowered below what
/// was in use).
#[derive(Debug)]
struct Limit {
    slots: Arc<Semaphore>,
    max: Mutex<usize>,
    debt: Mutex<usize>,
}

impl Limit {
    /// Gives a slot back, or lets it vanish while a lowered limit still has slots to take away.
    fn release(&self, permit: OwnedSemaphorePermit) {
        let mut debt = self.debt.lock().expect("limit");
        if *debt > 0 {
            *debt -= 1;
            permit.forget();
        }
    }
}

/// A call's slot; given back (or forgotten, see [`Limit::release`]) when dropped.
#[derive(Debug)]
struct Slot {
    permit: Option<OwnedSemaphorePermit>,
    limit: Arc<Limit>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Some(p) = self.permit.take() {
            self.limit.release(p);
        }
    }
}

impl ConcurrencyLimitLayer {
    /// At most `max` calls at once; a call's slot is given back at its deadline at the latest
    /// (`default_timeout`, `grpc.request_timeout`, for calls that carry none).
    pub fn new(max: usize, default_timeout: Duration) -> Self {
        Self {
            limit: Arc::new(Limit {
                slots: Arc::new(Semaphore::new(max)),
                max: Mutex::new(max),
                debt: Mutex::new(0),
            }),
            default_timeout,
        }
    }

    /// Changes the limit for every connection (`grpc.max_concurrent_requests` changed live). Raised: the new
    /// slots are free at once. Lowered: free slots go at once, slots in use go as their calls end; calls over
    /// the new limit are shed meanwhile.
    pub fn set_max(&self, max: usize) {
        let l = &self.limit;
        let mut current = l.max.lock().expect("limit");
        let mut debt = l.debt.lock().expect("limit");
        if max > *current {
            let more = max - *current;
            let repaid = more.min(*debt);
            *debt -= repaid;
            l.slots.add_permits(more - repaid);
        } else {
            let fewer = *current - max;
            let gone = l.slots.forget_permits(fewer);
            *debt += fewer - gone;
        }
        *current = max;
    }

    /// Slots free now.
    pub fn available(&self) -> usize {
        self.limit.slots.available_permits()
    }
}

impl<S> Layer<S> for ConcurrencyLimitLayer {
    type Service = ConcurrencyLimit<S>;
    fn layer(&self, inner: S) -> Self::Service {
        ConcurrencyLimit {
            inner,
            limit: self.limit.clone(),
            default_timeout: self.default_timeout,
        }
    }
}

/// Service made by [`ConcurrencyLimitLayer`].
#[derive(Clone, Debug)]
pub struct ConcurrencyLimit<S> {
    inner: S,
    limit: Arc<Limit>,
    default_timeout: Duration,
}

impl<S, B> Service<Request<B>> for ConcurrencyLimit<S>
where
    S: Service<Request<B>, Response = Response<Body>>,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
{
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = LimitFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        // Readiness errors of the routes surface on the call.
        match self.inner.poll_ready(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(_) => Poll::Ready(Ok(())),
        }
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let Ok(permit) = self.limit.slots.clone().try_acquire_owned() else {
            let shed = layer_status::overloaded(
                "server overloaded: concurrency limit reached; retry later",
            );
            return LimitFuture::Shed {
                answer: Some(shed.into_http()),
            };
        };
        // Set by the server context outside this layer; the default bound only without it.
        let deadline = req.extensions().get::<CallDeadline>().map_or_else(
            || tokio::time::Instant::now() + self.default_timeout,
            |d| d.0,
        );
        let slot = Slot {
            permit: Some(permit),
            limit: self.limit.clone(),
        };
        LimitFuture::Called {
            inner: self.inner.call(req),
            slot: Some(slot),
            deadline,
        }
    }
}

pin_project! {
    /// The future of [`ConcurrencyLimit`]: a shed call's answer, ready at once, or the handler's future holding
    /// the call's slot (given back if the call is dropped before it answers), which the answer's body then
    /// holds. Nothing is allocated for it.
    #[project = LimitProjection]
    pub enum LimitFuture<F> {
        /// Over the limit: RESOURCE_EXHAUSTED.
        Shed { answer: Option<Response<Body>> },
        /// Within it.
        Called {
            #[pin]
            inner: F,
            slot: Option<Slot>,
            deadline: tokio::time::Instant,
        },
    }
}

impl<F, E> Future for LimitFuture<F>
where
    F: Future<Output = Result<Response<Body>, E>>,
    E: Into<BoxError>,
{
    type Output = Result<Response<Body>, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project() {
            LimitProjection::Shed { answer } => Poll::Ready(Ok(answer
                .take()
                .expect("LimitFuture polled after it answered"))),
            LimitProjection::Called {
                inner,
                slot,
                deadline,
            } => {
                let answered = std::task::ready!(inner.poll(cx));
                Poll::Ready(Ok(match answered {
                    Ok(resp) => resp.map(|body| {
                        Body::new(PermitBody {
                            inner: body,
                            slot: Held::Own(slot.take()),
                            deadline: *deadline,
                            reaper: false,
                            frames: 0,
                        })
                    }),
                    Err(e) => {
                        let e: BoxError = e.into();
                        layer_status::internal(anyhow::anyhow!("server stack error: {e}"))
                            .into_http()
                    }
                }))
            }
        }
    }
}

/// Where a response body keeps its call's slot: in itself, until a deadline timer needs a share of it.
enum Held {
    Own(Option<Slot>),
    Shared(Arc<Mutex<Option<Slot>>>),
}

impl Held {
    /// Gives the slot back (once; later calls do nothing).
    fn release(&mut self) {
        match self {
            Held::Own(slot) => drop(slot.take()),
            Held::Shared(slot) => drop(slot.lock().expect("slot").take()),
        }
    }

    /// A share of the slot for a timer, made on the first request.
    fn share(&mut self) -> Arc<Mutex<Option<Slot>>> {
        match self {
            Held::Shared(slot) => slot.clone(),
            Held::Own(slot) => {
                let shared = Arc::new(Mutex::new(slot.take()));
                *self = Held::Shared(shared.clone());
                shared
            }
        }
    }
}

pin_project! {
    /// A response body that gives its call's slot back when it ends, is dropped, or reaches its deadline —
    /// whichever comes first. The deadline needs a timer of its own: a stream whose reader stalled is not
    /// polled at all (HTTP/2 flow control), so it cannot notice the time itself. The timer starts only when
    /// the body first waits or sends its second message; a unary answer, ready at once, starts none (and its
    /// slot is not shared: nothing allocated).
    struct PermitBody {
        #[pin]
        inner: Body,
        slot: Held,
        deadline: tokio::time::Instant,
        reaper: bool,
        frames: u32,
    }

    impl PinnedDrop for PermitBody {
        fn drop(this: Pin<&mut Self>) {
            this.project().slot.release();
        }
    }
}

impl HttpBody for PermitBody {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.project();
        let polled = this.inner.poll_frame(cx);
        match &polled {
            Poll::Ready(None | Some(Err(_))) => this.slot.release(),
            // A body that waits, or sends a second message (a stream, which HTTP/2 flow control may stop
            // polling), gets its deadline timer.
            Poll::Ready(Some(Ok(f))) if f.is_data() => *this.frames += 1,
            _ => {}
        }
        if !*this.reaper && (polled.is_pending() || *this.frames >= 2) {
            *this.reaper = true;
            let (slot, deadline) = (this.slot.share(), *this.deadline);
            tokio::spawn(async move {
                tokio::time::sleep_until(deadline).await;
                slot.lock().expect("slot").take();
            });
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lowered_limit_takes_free_slots_at_once_and_busy_ones_as_their_calls_end() {
        let layer = ConcurrencyLimitLayer::new(4, Duration::from_secs(1));
        let take = || Slot {
            permit: Some(layer.limit.slots.clone().try_acquire_owned().unwrap()),
            limit: layer.limit.clone(),
        };
        let (a, b, c) = (take(), take(), take());
        layer.set_max(1);
        assert_eq!(layer.available(), 0, "the free slot went at once");
        drop(a);
        drop(b);
        assert_eq!(
            layer.available(),
            0,
            "two busy slots went as their calls ended"
        );
        drop(c);
        assert_eq!(layer.available(), 1);

        layer.set_max(3);
        assert_eq!(layer.available(), 3, "raised: free at once");
        let (x, y, z) = (take(), take(), take());
        layer.set_max(1);
        layer.set_max(2);
        drop(x);
        assert_eq!(layer.available(), 0, "one slot still to go");
        drop(y);
        drop(z);
        assert_eq!(layer.available(), 2);
    }
}
