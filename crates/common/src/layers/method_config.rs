//! Client side, outermost: applies the target's service config ([`crate::service_config`]) to each call before
//! the deadline is computed: its `timeout` (never lengthening a deadline the call carries: the shorter wins),
//! its `waitForReady`, and hands its `retryPolicy` to [`TransparentRetryLayer`](super::TransparentRetryLayer)
//! and its load-balancing policy ([`LbPolicy`]) to the channel's picker through the request's extensions.

use std::{
    sync::Arc,
    task::{Context, Poll},
};

use http::Request;
use tower::{Layer, Service};

use crate::{
    context::{GRPC_TIMEOUT_NAME, grpc_timeout, grpc_timeout_value},
    layers::WaitForReady,
    service_config::{LbPolicy, RetryPolicy, ServiceConfigs},
};

/// The retry policy of a call, from its service config.
#[derive(Clone, Debug)]
pub struct AttemptPolicy(pub RetryPolicy);

/// Client side: see the module docs.
#[derive(Clone, Debug)]
pub struct MethodConfigLayer {
    configs: ServiceConfigs,
    target: Arc<str>,
}

impl MethodConfigLayer {
    /// Calls to `target` follow its config in `configs` (as it is at each call).
    pub fn new(configs: ServiceConfigs, target: &str) -> Self {
        Self {
            configs,
            target: Arc::from(target),
        }
    }
}

impl<S> Layer<S> for MethodConfigLayer {
    type Service = MethodConfig<S>;
    fn layer(&self, inner: S) -> Self::Service {
        MethodConfig {
            inner,
            layer: self.clone(),
        }
    }
}

/// Service made by [`MethodConfigLayer`].
#[derive(Clone, Debug)]
pub struct MethodConfig<S> {
    inner: S,
    layer: MethodConfigLayer,
}

impl<S, B> Service<Request<B>> for MethodConfig<S>
where
    S: Service<Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        let Some(config) = self.layer.configs.get(&self.layer.target) else {
            return self.inner.call(req);
        };
        if let Some(lb) = config.load_balancing {
            req.extensions_mut().insert::<LbPolicy>(lb);
        }
        if let Some(policy) = config.policy(req.uri().path()) {
            if let Some(limit) = policy.timeout {
                let own = grpc_timeout(req.headers());
                if own.is_none_or(|own| limit < own) {
                    req.headers_mut()
                        .insert(GRPC_TIMEOUT_NAME, grpc_timeout_value(limit));
                }
            }
            if policy.wait_for_ready == Some(true) {
                req.extensions_mut().insert(WaitForReady);
            }
            if let Some(retry) = &policy.retry {
                req.extensions_mut().insert(AttemptPolicy(retry.clone()));
            }
        }
        self.inner.call(req)
    }
}
