//! Per-target client policy as the gRPC ecosystem writes it: the service config JSON of gRPC proposal A2
//! (<https://github.com/grpc/proposal/blob/master/A2-service-configs-in-dns.md>, fields as in
//! `grpc/service_config.proto`), with `methodConfig` entries giving a `timeout`, `waitForReady` and a
//! `retryPolicy` (A6, <https://github.com/grpc/proposal/blob/master/A6-client-retries.md>).
//!
//! A target's config comes from Consul KV (`keel/<target>/service-config`, published by whoever runs the
//! target, as a name resolver would publish it), else from the caller's own settings
//! (`client.service_config.<target>` in the file: gRPC's default service config); it is watched live
//! ([`crate::live`]). A config that does not parse or check is refused with a log line and the previous one
//! stays.
//!
//! Method lookup follows A2: a `name` with `service` and `method` matches that method; with `service` only,
//! every method of the service; an empty `name` entry (or one with neither), every method.
//!
//! `loadBalancingConfig` picks how each call's instance is chosen ([`LbPolicy`]; the first policy listed, as
//! in gRPC): `round_robin`, `pick_first`, and ours, `p2c` and `key_affinity`; without one, a channel keeps its
//! own (p2c, or key affinity for [`crate::ClientFactory::keyed_channel`]). Switching policy keeps the
//! connections.

use std::{collections::HashMap, sync::Arc, time::Duration};

use serde::Deserialize;
use tonic::Code;

/// The parsed service config of one target.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ServiceConfig {
    methods: Vec<(Vec<MethodName>, MethodPolicy)>,
    /// The first load-balancing policy named in `loadBalancingConfig`, if any.
    pub load_balancing: Option<LbPolicy>,
}

/// How a channel picks the instance of each call (`loadBalancingConfig`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LbPolicy {
    /// gRPC's `round_robin`: the instances in turn, skipping those ejected after a transport failure.
    RoundRobin,
    /// gRPC's `pick_first`: every call to one instance (the first by address) while it is there and not
    /// ejected; then the next.
    PickFirst,
    /// `p2c`: the less loaded of two random instances, by a peak-sensitive moving average of round-trip time
    /// times outstanding calls (tower's `PeakEwma`; Finagle's and Linkerd's balancer).
    P2c,
    /// `key_affinity`: the instance owning the call's routing key ([`crate::routing`]), for sharded state.
    KeyAffinity,
}

impl LbPolicy {
    /// The policy of a `loadBalancingConfig` name.
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "round_robin" => Some(Self::RoundRobin),
            "pick_first" => Some(Self::PickFirst),
            "p2c" => Some(Self::P2c),
            "key_affinity" => Some(Self::KeyAffinity),
            _ => None,
        }
    }
}

/// What the config says about one method.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct MethodPolicy {
    /// The longest a call may take, all attempts included (the call's own deadline still applies when shorter).
    pub timeout: Option<Duration>,
    /// Whether a call waits, within its deadline, for a ready instance (gRPC wait-for-ready).
    pub wait_for_ready: Option<bool>,
    /// Transparent retries.
    pub retry: Option<RetryPolicy>,
}

/// A6's `retryPolicy`.
#[derive(Clone, Debug, PartialEq)]
pub struct RetryPolicy {
    /// Attempts in all, the first included: 2–5 (more is capped at 5, as gRPC does).
    pub max_attempts: u32,
    /// Backoff before the first retry (its upper bound: the wait is random below it).
    pub initial_backoff: Duration,
    /// Cap of the backoff.
    pub max_backoff: Duration,
    /// Growth of the backoff per retry.
    pub backoff_multiplier: f64,
    /// Status codes a call is retried on.
    pub retryable_status_codes: Vec<Code>,
}

impl RetryPolicy {
    /// The upper bound of the wait before retry `n` (1 for the first): `min(initial · multiplier^(n-1), max)`.
    pub fn backoff_bound(&self, n: u32) -> Duration {
        let exp = self.backoff_multiplier.powi(n.saturating_sub(1) as i32);
        self.initial_backoff
            .mul_f64(exp.min(1e6))
            .min(self.max_backoff)
    }
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
struct MethodName {
    #[serde(default)]
    service: String,
    #[serde(default)]
    method: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Raw {
    #[serde(default)]
    load_balancing_config: Vec<HashMap<String, serde_json::Value>>,
    #[serde(default)]
    method_config: Vec<RawMethod>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawMethod {
    #[serde(default)]
    name: Vec<MethodName>,
    timeout: Option<String>,
    wait_for_ready: Option<bool>,
    retry_policy: Option<RawRetry>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawRetry {
    max_attempts: u32,
    initial_backoff: String,
    max_backoff: String,
    backoff_multiplier: f64,
    retryable_status_codes: Vec<serde_json::Value>,
}

/// Load-balancing policies a config may name.
const POLICIES: &[&str] = &["round_robin", "pick_first", "p2c", "key_affinity"];

/// A protobuf JSON duration, `"1.5s"`.
fn duration(field: &str, s: &str) -> Result<Duration, String> {
    s.strip_suffix('s')
        .and_then(|n| n.parse::<f64>().ok())
        .filter(|n| n.is_finite() && *n >= 0.0 && *n < 1e9)
        .map(Duration::from_secs_f64)
        .ok_or_else(|| format!("{field}: {s:?} is not a duration like \"1.5s\""))
}

/// A status code by name (`"UNAVAILABLE"`) or number.
fn code(v: &serde_json::Value) -> Result<Code, String> {
    match v {
        serde_json::Value::String(s) => (1..=16)
            .map(Code::from)
            .find(|c| crate::metrics::code_name(*c).eq_ignore_ascii_case(s)),
        serde_json::Value::Number(n) => n
            .as_i64()
            .filter(|n| (1..=16).contains(n))
            .map(|n| Code::from(n as i32)),
        _ => None,
    }
    .ok_or_else(|| format!("retryableStatusCodes: {v} is not a status code other than OK"))
}

impl ServiceConfig {
    /// Parses and checks a service config (A2 JSON); the error says which field is wrong.
    ///
    /// # Errors
    /// The JSON does not parse, or a field breaks a rule of A2/A6 (e.g. `maxAttempts` below 2).
    pub fn parse(json: &str) -> Result<Self, String> {
        let raw: Raw = serde_json::from_str(json).map_err(|e| e.to_string())?;
        let mut load_balancing = None;
        for entry in &raw.load_balancing_config {
            for name in entry.keys() {
                let Some(policy) = LbPolicy::from_name(name) else {
                    return Err(format!(
                        "loadBalancingConfig: {name:?} is not one of {}",
                        POLICIES.join(", ")
                    ));
                };
                load_balancing.get_or_insert(policy);
            }
        }
        let mut methods = Vec::new();
        for m in raw.method_config {
            let timeout = m
                .timeout
                .as_deref()
                .map(|t| duration("timeout", t))
                .transpose()?;
            let retry = match m.retry_policy {
                None => None,
                Some(r) => {
                    if r.max_attempts < 2 {
                        return Err("retryPolicy.maxAttempts: must be 2 or more".into());
                    }
                    let initial_backoff =
                        duration("retryPolicy.initialBackoff", &r.initial_backoff)?;
                    let max_backoff = duration("retryPolicy.maxBackoff", &r.max_backoff)?;
                    if initial_backoff.is_zero() || max_backoff.is_zero() {
                        return Err(
                            "retryPolicy: initialBackoff and maxBackoff must be more than 0s"
                                .into(),
                        );
                    }
                    if !(r.backoff_multiplier > 0.0 && r.backoff_multiplier.is_finite()) {
                        return Err("retryPolicy.backoffMultiplier: must be more than 0".into());
                    }
                    if r.retryable_status_codes.is_empty() {
                        return Err(
                            "retryPolicy.retryableStatusCodes: must name at least one code".into(),
                        );
                    }
                    Some(RetryPolicy {
                        max_attempts: r.max_attempts.min(5),
                        initial_backoff,
                        max_backoff,
                        backoff_multiplier: r.backoff_multiplier,
                        retryable_status_codes: r
                            .retryable_status_codes
                            .iter()
                            .map(code)
                            .collect::<Result<_, _>>()?,
                    })
                }
            };
            methods.push((
                m.name,
                MethodPolicy {
                    timeout,
                    wait_for_ready: m.wait_for_ready,
                    retry,
                },
            ));
        }
        Ok(Self {
            methods,
            load_balancing,
        })
    }

    /// The policy of `/package.Service/Method` (A2's lookup: the method, then its service, then the default).
    pub fn policy(&self, path: &str) -> Option<&MethodPolicy> {
        let (service, method) = path.strip_prefix('/')?.split_once('/')?;
        let find = |f: &dyn Fn(&MethodName) -> bool| {
            self.methods
                .iter()
                .find(|(names, _)| names.iter().any(f))
                .map(|(_, p)| p)
        };
        find(&|n| n.service == service && n.method == method)
            .or_else(|| find(&|n| n.service == service && n.method.is_empty()))
            .or_else(|| {
                self.methods
                    .iter()
                    .find(|(names, _)| {
                        names.is_empty()
                            || names
                                .iter()
                                .any(|n| n.service.is_empty() && n.method.is_empty())
                    })
                    .map(|(_, p)| p)
            })
    }
}

/// The service configs in force, by target; shared by the layers of every channel of a factory and replaced
/// as the live settings change.
#[derive(Clone, Debug, Default)]
pub struct ServiceConfigs(Arc<std::sync::RwLock<HashMap<String, Arc<ServiceConfig>>>>);

impl ServiceConfigs {
    /// The config of `target`, if one is set.
    pub fn get(&self, target: &str) -> Option<Arc<ServiceConfig>> {
        self.0.read().expect("service configs").get(target).cloned()
    }

    /// Replaces every config with those of `sources` (`target` → JSON; a later source wins for a target). A
    /// JSON that does not parse is refused with a WARN line naming its origin, and the config it would have
    /// replaced stays.
    pub fn update<'a>(&self, sources: impl IntoIterator<Item = (&'a str, &'a str, String)>) {
        let current = self.0.read().expect("service configs").clone();
        // The winning source of each target, then its outcome.
        let mut chosen: HashMap<&str, (&str, String)> = HashMap::new();
        for (target, json, origin) in sources {
            chosen.insert(target, (json, origin));
        }
        let mut next: HashMap<String, Arc<ServiceConfig>> = HashMap::new();
        for (target, (json, origin)) in chosen {
            match ServiceConfig::parse(json) {
                Ok(c) => {
                    if current.get(target).is_none_or(|old| **old != c) {
                        tracing::info!(target, origin, "service config applied");
                    }
                    next.insert(target.to_owned(), Arc::new(c));
                }
                Err(reason) => {
                    tracing::warn!(
                        target,
                        origin,
                        reason,
                        "invalid service config refused; the previous one stays"
                    );
                    if let Some(old) = current.get(target) {
                        next.insert(target.to_owned(), old.clone());
                    }
                }
            }
        }
        *self.0.write().expect("service configs") = next;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONFIG: &str = r#"{
        "loadBalancingConfig": [{"round_robin": {}}],
        "methodConfig": [
            {"name": [{"service": "keel.example.v1.Echo", "method": "Echo"}],
             "timeout": "0.25s", "waitForReady": true,
             "retryPolicy": {"maxAttempts": 9, "initialBackoff": "0.01s", "maxBackoff": "0.1s",
                             "backoffMultiplier": 2, "retryableStatusCodes": ["UNAVAILABLE", 10]}},
            {"name": [{"service": "keel.example.v1.Echo"}], "timeout": "2s"},
            {"name": [{}], "timeout": "30s"}
        ]
    }"#;

    #[test]
    fn methods_find_their_own_entry_then_their_service_then_the_default() {
        let c = ServiceConfig::parse(CONFIG).unwrap();
        assert_eq!(c.load_balancing, Some(LbPolicy::RoundRobin));
        let echo = c.policy("/keel.example.v1.Echo/Echo").unwrap();
        assert_eq!(echo.timeout, Some(Duration::from_millis(250)));
        assert_eq!(echo.wait_for_ready, Some(true));
        let retry = echo.retry.as_ref().unwrap();
        assert_eq!(retry.max_attempts, 5, "capped at 5 as gRPC does");
        assert_eq!(
            retry.retryable_status_codes,
            [Code::Unavailable, Code::Aborted]
        );
        assert_eq!(retry.backoff_bound(1), Duration::from_millis(10));
        assert_eq!(retry.backoff_bound(3), Duration::from_millis(40));
        assert_eq!(
            retry.backoff_bound(9),
            Duration::from_millis(100),
            "capped at maxBackoff"
        );
        let other = c.policy("/keel.example.v1.Echo/Other").unwrap();
        assert_eq!(
            (other.timeout, other.retry.is_none()),
            (Some(Duration::from_secs(2)), true)
        );
        assert_eq!(
            c.policy("/else.Where/Any").unwrap().timeout,
            Some(Duration::from_secs(30))
        );
        assert!(c.policy("not a path").is_none());
    }

    #[test]
    fn configs_breaking_a6_or_a2_are_refused_naming_the_field() {
        let bad = |json: &str| ServiceConfig::parse(json).unwrap_err();
        let retry = |fields: &str| {
            format!(r#"{{"methodConfig": [{{"name": [{{}}], "retryPolicy": {{{fields}}}}}]}}"#)
        };
        let ok = r#""maxAttempts": 3, "initialBackoff": "0.1s", "maxBackoff": "1s", "backoffMultiplier": 2, "retryableStatusCodes": ["UNAVAILABLE"]"#;
        assert!(ServiceConfig::parse(&retry(ok)).is_ok());
        assert!(
            bad(&retry(
                &ok.replace("\"maxAttempts\": 3", "\"maxAttempts\": 1")
            ))
            .contains("maxAttempts")
        );
        assert!(bad(&retry(&ok.replace("\"0.1s\"", "\"soon\""))).contains("initialBackoff"));
        assert!(
            bad(&retry(&ok.replace("[\"UNAVAILABLE\"]", "[]"))).contains("retryableStatusCodes")
        );
        assert!(
            bad(&retry(&ok.replace("\"UNAVAILABLE\"", "\"OK\""))).contains("retryableStatusCodes")
        );
        assert!(
            bad(r#"{"loadBalancingConfig": [{"weighted_dice": {}}]}"#).contains("weighted_dice")
        );
        assert!(bad(r#"{"methodConfig": [{"timeout": "1m"}]}"#).contains("timeout"));
        assert!(bad("not json").contains("expected"));
    }
}
