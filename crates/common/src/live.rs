//! Live settings from Consul KV: envconsul's idea without the restart.
//!
//! At start a service reads `keel/_defaults/…` and `keel/<service>/…` ([`KvSettings`]) between its file and its
//! environment; then [`watch`] keeps them current with Consul's blocking queries on `keel/` (`?index=`, reset to
//! 0 when the index goes backwards, as Consul's blocking-query contract asks), backing off from 1 s to 30 s
//! while Consul is away and keeping the last good settings meanwhile. On a change the whole configuration is
//! rebuilt and checked as at start (after an error the watch starts again from index 0, since the agent that
//! answers next may be a restarted one whose index is lower):
//! - a value that does not check is refused with a WARN line naming its KV key and the reason, and the value it
//!   replaced stays;
//! - a setting in [`LIVE`] (or one a service declares, [`crate::Service::LIVE`]) takes effect at once through
//!   [`LiveSettings`], which the code that reads it per call consults (log level, client deadline and retry
//!   attempts, the server's concurrency limit, feature flags, a service's own knobs), logged as `setting
//!   changed`;
//! - any other setting (listen address, database URL, …) is reported once, `restart required`, and with
//!   `consul.kv_restart_on_change` the process shuts down gracefully for its supervisor to restart it.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU32, AtomicU64, Ordering},
    },
    time::Duration,
};

use tokio::sync::watch;

use crate::{
    App, Settings,
    config::{ConfigErrors, Env, KvSettings},
    consul::ConsulAgent,
};

/// Platform settings that change without a restart. A key covers the keys below it (`features` covers
/// `features.search_v2`).
pub const LIVE: &[&str] = &[
    "log.level",
    "client.default_timeout",
    "client.max_attempts",
    "grpc.max_concurrent_requests",
    "features",
];

/// How long one blocking query waits for a change before Consul answers anyway.
const WAIT: Duration = Duration::from_secs(300);

/// The process's current settings: what the KV watcher last accepted. Cheap to clone and to read per call.
#[derive(Clone, Debug)]
pub struct LiveSettings(watch::Receiver<Arc<Settings>>);

impl LiveSettings {
    /// Settings that never change (tests, tools, a process without Consul).
    pub fn fixed(settings: Arc<Settings>) -> Self {
        Self(watch::channel(settings).1)
    }

    /// The current settings.
    pub fn current(&self) -> Arc<Settings> {
        self.0.borrow().clone()
    }

    /// A receiver that wakes on every accepted change.
    pub fn changes(&self) -> watch::Receiver<Arc<Settings>> {
        self.0.clone()
    }
}

/// A duration read per call and changed live.
#[derive(Clone, Debug)]
pub struct LiveDuration(Arc<AtomicU64>);

impl LiveDuration {
    /// Starting at `d`.
    pub fn new(d: Duration) -> Self {
        Self(Arc::new(AtomicU64::new(d.as_nanos() as u64)))
    }
    /// The current value.
    pub fn get(&self) -> Duration {
        Duration::from_nanos(self.0.load(Ordering::Relaxed))
    }
    /// Changes it for every holder.
    pub fn set(&self, d: Duration) {
        self.0.store(d.as_nanos() as u64, Ordering::Relaxed);
    }
}

/// A count read per call and changed live.
#[derive(Clone, Debug)]
pub struct LiveCount(Arc<AtomicU32>);

impl LiveCount {
    /// Starting at `n`.
    pub fn new(n: u32) -> Self {
        Self(Arc::new(AtomicU32::new(n)))
    }
    /// The current value.
    pub fn get(&self) -> u32 {
        self.0.load(Ordering::Relaxed)
    }
    /// Changes it for every holder.
    pub fn set(&self, n: u32) {
        self.0.store(n, Ordering::Relaxed);
    }
}

/// A Consul KV value that did not check, refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refused {
    /// Its KV key, `keel/echo/client/default_timeout`.
    pub kv_key: String,
    /// The setting it was for, `client.default_timeout`.
    pub setting: String,
    /// Why it was refused.
    pub reason: String,
}

/// The settings of `app` from `env` and the KV pairs under `keel/`, with every KV value that does not check
/// replaced by the one in `previous` (or dropped when there is none). Returns the settings and the refused
/// values.
///
/// # Errors
/// The file or the environment is invalid (not Consul KV's doing).
pub fn layered(
    app: &App,
    env: &Env,
    mut kv: KvSettings,
    previous: &KvSettings,
) -> Result<(Settings, Vec<Refused>), ConfigErrors> {
    let name = app.settings(env)?.service.name;
    let mut refused = Vec::new();
    // Each round refuses at least one KV value, so this ends.
    loop {
        match app.settings_layered(env, &kv) {
            Ok(settings) => return Ok((settings, refused)),
            Err(ConfigErrors(errors)) => {
                let before = refused.len();
                for e in errors {
                    if let Some(origin) = kv.origin(&name, &e.key) {
                        let setting = origin_setting(&origin);
                        kv = kv.restore(&setting, previous);
                        refused.push(Refused {
                            kv_key: origin,
                            setting: e.key,
                            reason: e.message,
                        });
                    }
                }
                if refused.len() == before {
                    return app.settings_layered(env, &kv).map(|s| (s, refused));
                }
            }
        }
    }
}

/// `keel/<folder>/log/level` → `log.level`.
fn origin_setting(origin: &str) -> String {
    origin
        .strip_prefix(KvSettings::ROOT)
        .and_then(|r| r.split_once('/'))
        .map(|(_, path)| path.replace('/', "."))
        .unwrap_or_default()
}

/// Whether a change of `key` applies without a restart.
pub fn is_live(key: &str, service_live: &[&str]) -> bool {
    LIVE.iter()
        .chain(service_live)
        .any(|l| key == *l || key.starts_with(&format!("{l}.")))
}

/// The keys whose reported value differs between two reports (added and removed keys included).
fn changed(old: &[(String, String)], new: &[(String, String)]) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = new
        .iter()
        .filter(|(k, v)| {
            old.iter()
                .find(|(ok, _)| ok == k)
                .is_none_or(|(_, ov)| ov != v)
        })
        .cloned()
        .collect();
    for (k, _) in old {
        if !new.iter().any(|(nk, _)| nk == k) {
            out.push((k.clone(), "(unset)".into()));
        }
    }
    out
}

/// What [`watch`] needs: how to rebuild and check the settings, the settings in force, and how to restart.
pub struct Watch {
    /// The app, to rebuild and check its settings.
    pub app: App,
    /// The environment the process started with.
    pub env: Env,
    /// The settings in force, with their KV layer ([`Settings::kv`]).
    pub initial: Arc<Settings>,
    /// The KV index the start-up read saw (0: none).
    pub index: u64,
    /// Called once when a restart-only setting changed and `consul.kv_restart_on_change` is on.
    pub restart: Box<dyn Fn() + Send + Sync>,
}

/// Starts watching `keel/` in Consul KV (see the module docs); returns the live settings it updates. Must be
/// called inside a Tokio runtime.
pub fn watch(w: Watch) -> LiveSettings {
    let (tx, rx) = watch::channel(w.initial.clone());
    let agent = ConsulAgent::new(
        w.initial
            .consul
            .http_addr
            .as_deref()
            .unwrap_or("127.0.0.1:8500"),
        w.initial.consul.token.clone(),
    );
    tokio::spawn(async move {
        let mut index = w.index;
        let mut backoff = Duration::from_secs(1);
        let mut away = false;
        let service_live = w.app.live_keys();
        loop {
            match agent.kv_tree(KvSettings::ROOT, index, WAIT).await {
                Ok((pairs, next)) => {
                    if away {
                        tracing::info!("consul kv reachable again; watching settings");
                        away = false;
                    }
                    backoff = Duration::from_secs(1);
                    // Consul's contract: an index that goes backwards starts over from 0; one of 0 is taken as 1,
                    // so the next query blocks instead of returning at once, again and again.
                    index = if next < index { 0 } else { next.max(1) };
                    let current = tx.borrow().clone();
                    let kv = KvSettings::from_pairs(&current.service.name, pairs);
                    if kv == *current.kv() {
                        continue;
                    }
                    if let Some(next) = apply(&w, &current, kv, &service_live) {
                        tx.send_replace(Arc::new(next));
                    }
                }
                Err(e) => {
                    // The agent that answers next may be a restarted one whose index is lower: waiting on the
                    // old index there would block for the whole wait.
                    index = 0;
                    if !away {
                        tracing::warn!(error = %e, "consul kv unreachable; keeping the last settings, retrying");
                        away = true;
                    }
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(30));
                }
            }
        }
    });
    LiveSettings(rx)
}

/// Rebuilds the settings with `kv`; logs refused values, changes, and restart-only changes (restarting when
/// asked to); `None` when they cannot be rebuilt (the file or the environment is at fault, not KV).
fn apply(w: &Watch, current: &Settings, kv: KvSettings, service_live: &[&str]) -> Option<Settings> {
    let (next, refused) = match layered(&w.app, &w.env, kv, current.kv()) {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(error = %e, "settings from consul kv not applied");
            return None;
        }
    };
    for r in &refused {
        tracing::warn!(
            key = r.kv_key.as_str(),
            setting = r.setting.as_str(),
            reason = r.reason.as_str(),
            "invalid value in consul kv refused; the previous value stays"
        );
    }
    let changes = changed(&w.app.effective(current), &w.app.effective(&next));
    if changes.is_empty() {
        // Only refused values, or keys nothing reads: keep the KV layer current all the same.
        return Some(next);
    }
    let mut restart = Vec::new();
    for (key, value) in &changes {
        let source = next.source(key);
        if is_live(key, service_live) {
            tracing::info!(
                key = key.as_str(),
                value = value.as_str(),
                source,
                "setting changed"
            );
        } else {
            tracing::warn!(
                key = key.as_str(),
                value = value.as_str(),
                source,
                "setting changed; restart required for it to take effect"
            );
            restart.push(key.clone());
        }
    }
    if !restart.is_empty() && current.consul.kv_restart_on_change {
        tracing::warn!(keys = ?restart, "consul.kv_restart_on_change: shutting down for the supervisor to restart");
        (w.restart)();
    }
    Some(next)
}

/// One read of `keel/` at start (no waiting): the KV layer and the index to watch from; `None` with the
/// reason when Consul does not answer (the process starts on file and environment, the watcher catches up).
pub async fn read_at_start(settings: &Settings) -> Result<(KvSettings, u64), String> {
    let Some(addr) = settings.consul.http_addr.as_deref() else {
        return Ok((KvSettings::default(), 0));
    };
    let agent = ConsulAgent::new(addr, settings.consul.token.clone());
    match agent.kv_tree(KvSettings::ROOT, 0, Duration::ZERO).await {
        Ok((pairs, index)) => Ok((KvSettings::from_pairs(&settings.service.name, pairs), index)),
        Err(e) => Err(e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn live_keys_cover_the_keys_below_them_and_what_a_service_declares() {
        assert!(is_live("log.level", &[]));
        assert!(is_live("features.search_v2", &[]));
        assert!(!is_live("grpc.listen_addr", &[]));
        assert!(!is_live("log.levels", &[]));
        assert!(is_live("cache.max_bytes", &["cache.max_bytes"]));
    }

    #[test]
    fn changes_list_new_changed_and_removed_keys() {
        let kv = |p: &[(&str, &str)]| -> Vec<(String, String)> {
            p.iter().map(|(k, v)| ((*k).into(), (*v).into())).collect()
        };
        let old = kv(&[("log.level", "info"), ("a", "1"), ("gone", "x")]);
        let new = kv(&[("log.level", "debug"), ("a", "1"), ("b", "2")]);
        assert_eq!(
            changed(&old, &new),
            kv(&[("log.level", "debug"), ("b", "2"), ("gone", "(unset)")])
        );
    }

    #[test]
    fn an_invalid_kv_value_is_refused_and_the_one_it_replaced_stays() {
        let app = App::named("kvtest");
        let env = Env::default();
        let previous = KvSettings::from_pairs(
            "kvtest",
            [(
                "keel/kvtest/client/default_timeout".to_owned(),
                "250ms".to_owned(),
            )],
        );
        let kv = KvSettings::from_pairs(
            "kvtest",
            [
                (
                    "keel/kvtest/client/default_timeout".to_owned(),
                    "soon".to_owned(),
                ),
                ("keel/_defaults/log/level".to_owned(), "debug".to_owned()),
            ],
        );
        let (settings, refused) = layered(&app, &env, kv, &previous).unwrap();
        assert_eq!(settings.client.default_timeout, Duration::from_millis(250));
        assert_eq!(
            settings.log.level, "debug",
            "the valid value next to it applies"
        );
        assert_eq!(refused.len(), 1);
        assert_eq!(refused[0].kv_key, "keel/kvtest/client/default_timeout");
        assert_eq!(refused[0].setting, "client.default_timeout");
        assert!(refused[0].reason.contains("soon"), "{refused:?}");
        assert_eq!(
            settings.source("client.default_timeout"),
            "consul-kv keel/kvtest/client/default_timeout"
        );
    }
}
