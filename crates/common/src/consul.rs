//! Consul agent registration and deregistration, through the **agent** HTTP API.
//!
//! The catalog API (`/v1/catalog/register`) is wrong for this: the local agent's anti-entropy removes such
//! entries within a minute. Instead (<https://developer.hashicorp.com/consul/api-docs/agent/service>):
//! - `PUT /v1/agent/service/register` with a `GRPC` check against this server's `grpc.health.v1` service
//!   (overall status, service name `""`), timeout `check_interval` (1 s to 5 s), `FailuresBeforeCritical`,
//!   `DeregisterCriticalServiceAfter`, tags and meta (`version`, `protocol=grpc`);
//! - or, when the agent cannot call the server (mutual TLS: the agent has no client certificate), a `TTL` check
//!   the instance keeps passing itself with `PUT /v1/agent/check/update/:check_id` every `check_interval`
//!   ([`Registrar::heartbeat`]), reporting its health status; a killed instance turns critical after
//!   [`ConsulSettings::ttl`];
//! - `PUT /v1/agent/service/deregister/:id` at shutdown.
//!
//! [`Registrar::run`] registers in the background, retrying with backoff while the agent is unreachable (the
//! service serves anyway), and re-registers if the agent forgets the service (agent restart). Every request
//! carries `X-Consul-Token` when `CONSUL_HTTP_TOKEN` is set and times out after 2 s, so a down agent is a fast,
//! typed [`ConsulError`].

use std::{collections::HashMap, time::Duration};

use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use std::net::SocketAddr;

use crate::{
    config::{Reader, Secret},
    tls::TlsSettings,
};

/// Consul: agent registration and DNS discovery.
#[derive(Clone, Debug)]
pub struct ConsulSettings {
    /// Agent HTTP address (`CONSUL_HTTP_ADDR` or `consul.http_addr`), `host:port` or a URL. Unset: no
    /// registration.
    pub http_addr: Option<String>,
    /// ACL token (`CONSUL_HTTP_TOKEN` or `consul.token`), sent as `X-Consul-Token`.
    pub token: Secret,
    /// Consul DNS server (`consul.dns_addr`, `host:port`, resolved at start), default `127.0.0.1:8600`.
    pub dns_addr: SocketAddr,
    /// Use Consul DNS to find peers (`consul.dns_enabled`); default: on when `http_addr` is set.
    pub dns_enabled: bool,
    /// How Consul learns this instance's health (`consul.check`: `grpc`, `ttl`, or `auto`, the default: `ttl`
    /// when `tls.require_client_cert` is set, since Consul's agent cannot present a client certificate, else
    /// `grpc`).
    pub check: CheckKind,
    /// Interval of the `GRPC` health check, or of the instance's TTL heartbeats (`consul.check_interval`).
    pub check_interval: Duration,
    /// Consecutive failed `GRPC` checks before Consul marks the instance critical
    /// (`consul.failures_before_critical`, default 3): a busy instance answering one check late stays in DNS;
    /// a dead one leaves after about this many intervals.
    pub failures_before_critical: u32,
    /// Consul removes an instance whose check stays critical this long (`consul.deregister_critical_after`).
    pub deregister_critical_after: Duration,
    /// How often clients re-resolve peers; also how long shutdown waits after deregistering
    /// (`consul.discovery_interval`).
    pub discovery_interval: Duration,
    /// Read settings from Consul KV at start and watch them (`consul.kv_watch`, default on when `http_addr` is
    /// set; [`crate::live`]).
    pub kv_watch: bool,
    /// When a setting that cannot change live changes in KV, shut down gracefully so the supervisor restarts
    /// the process with it (`consul.kv_restart_on_change`, default off: the change is only reported;
    /// envconsul's restart mode when on).
    pub kv_restart_on_change: bool,
}

/// The kind of Consul health check an instance registers with
/// (<https://developer.hashicorp.com/consul/docs/services/usage/checks>).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CheckKind {
    /// Consul's agent calls the instance's `grpc.health.v1` every `check_interval`.
    Grpc,
    /// The instance reports its own health status to the agent every `check_interval`
    /// (`PUT /v1/agent/check/update/:check_id`); Consul marks it critical when no report came for
    /// [`ConsulSettings::ttl`] (a killed instance drops out after at most that).
    Ttl,
}

impl ConsulSettings {
    /// The TTL of a [`CheckKind::Ttl`] check: three heartbeat intervals, so one lost heartbeat is no outage.
    pub fn ttl(&self) -> Duration {
        self.check_interval * 3
    }
}

impl ConsulSettings {
    /// Reads the `consul` section (`CONSUL_HTTP_ADDR` / `CONSUL_HTTP_TOKEN` are layered in as
    /// `consul.http_addr` / `consul.token`); the check kind depends on `tls`.
    pub fn read(r: &mut Reader, tls: &TlsSettings) -> Self {
        let http_addr = r.opt_string("consul.http_addr");
        let check = match r
            .string("consul.check", "auto")
            .to_ascii_lowercase()
            .as_str()
        {
            "auto" if tls.require_client_cert => CheckKind::Ttl,
            "auto" | "grpc" => CheckKind::Grpc,
            "ttl" => CheckKind::Ttl,
            other => {
                r.fail(
                    "consul.check",
                    format!("{other:?}: expected grpc, ttl or auto"),
                );
                CheckKind::Grpc
            }
        };
        if check == CheckKind::Grpc && tls.require_client_cert {
            r.fail(
                "consul.check",
                "grpc: Consul's agent cannot present a client certificate to a server with \
                 tls.require_client_cert; use ttl (or auto)",
            );
        }
        r.report("consul.check", format!("{check:?}").to_ascii_lowercase());
        let has_agent = http_addr.is_some();
        Self {
            dns_enabled: r.bool("consul.dns_enabled", http_addr.is_some()),
            http_addr,
            token: r.secret("consul.token"),
            dns_addr: r.socket_addr("consul.dns_addr", SocketAddr::from(([127, 0, 0, 1], 8600))),
            check,
            check_interval: r.duration("consul.check_interval", Duration::from_secs(2)),
            failures_before_critical: r.positive("consul.failures_before_critical", 3u32),
            deregister_critical_after: r
                .duration("consul.deregister_critical_after", Duration::from_secs(60)),
            discovery_interval: r.duration("consul.discovery_interval", Duration::from_secs(2)),
            kv_watch: r.bool("consul.kv_watch", has_agent),
            kv_restart_on_change: r.bool("consul.kv_restart_on_change", false),
        }
    }
}

/// A failed Consul call.
#[derive(Debug, thiserror::Error)]
pub enum ConsulError {
    /// The agent could not be reached or did not answer in time.
    #[error("consul agent unreachable at {addr}: {source}")]
    Unreachable {
        /// Agent address.
        addr: String,
        /// Cause.
        source: reqwest::Error,
    },
    /// The agent answered with an error status.
    #[error("consul agent refused {what}: HTTP {status}: {body}")]
    Refused {
        /// The operation.
        what: String,
        /// HTTP status.
        status: u16,
        /// Response body, Consul's explanation.
        body: String,
    },
}

/// An agent API client.
#[derive(Clone, Debug)]
pub struct ConsulAgent {
    http: reqwest::Client,
    base: String,
    token: Secret,
}

/// The agent's registration payload (`PUT /v1/agent/service/register`), in Consul's field names.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct Registration {
    /// Service ID, unique per instance.
    #[serde(rename = "ID")]
    pub id: String,
    /// Service name (the DNS name: `<name>.service.consul`).
    pub name: String,
    /// Tags.
    pub tags: Vec<String>,
    /// Address clients should dial.
    pub address: String,
    /// gRPC port.
    pub port: u16,
    /// Meta: `version`, `protocol`.
    pub meta: HashMap<String, String>,
    /// Health checks.
    pub checks: Vec<Check>,
}

/// One agent check definition.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct Check {
    /// Check ID.
    #[serde(rename = "CheckID")]
    pub check_id: String,
    /// Human name.
    pub name: String,
    /// `host:port` of a `grpc.health.v1` server (optionally `/service`); a `GRPC` check.
    #[serde(rename = "GRPC", skip_serializing_if = "Option::is_none")]
    pub grpc: Option<String>,
    /// Whether to dial with TLS.
    #[serde(rename = "GRPCUseTLS", skip_serializing_if = "std::ops::Not::not")]
    pub grpc_use_tls: bool,
    /// Whether to skip verifying the server's certificate (the agent does not hold the services' CA).
    #[serde(rename = "TLSSkipVerify", skip_serializing_if = "std::ops::Not::not")]
    pub tls_skip_verify: bool,
    /// Interval of a `GRPC` check, Go duration string (`2s`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub interval: Option<String>,
    /// Per-check timeout of a `GRPC` check.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timeout: Option<String>,
    /// Consecutive failures of a `GRPC` check before it turns critical: one slow answer from a busy instance
    /// does not take it out of DNS.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failures_before_critical: Option<u32>,
    /// A `TTL` check: critical unless updated at least this often.
    #[serde(rename = "TTL", skip_serializing_if = "Option::is_none")]
    pub ttl: Option<String>,
    /// Consul deregisters the service after the check is critical this long.
    pub deregister_critical_service_after: String,
}

/// One entry of `GET /v1/health/service/:name`.
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct HealthEntry {
    /// The service instance.
    pub service: HealthService,
    /// Its checks (node and service).
    pub checks: Vec<HealthCheck>,
}

/// The service part of a [`HealthEntry`].
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct HealthService {
    /// Service ID.
    #[serde(rename = "ID")]
    pub id: String,
    /// Service name.
    pub service: String,
    /// Address.
    pub address: String,
    /// Port.
    pub port: u16,
    /// Tags.
    #[serde(default)]
    pub tags: Option<Vec<String>>,
    /// Meta.
    #[serde(default)]
    pub meta: Option<HashMap<String, String>>,
}

/// A check of a [`HealthEntry`].
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct HealthCheck {
    /// Check ID.
    #[serde(rename = "CheckID")]
    pub check_id: String,
    /// `passing`, `warning` or `critical`.
    pub status: String,
}

/// A health status reported on a `TTL` check.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CheckStatus {
    /// Healthy: listed by DNS and `?passing` queries.
    Passing,
    /// Not serving: left out of DNS answers.
    Critical,
}

fn go_duration(d: Duration) -> String {
    format!("{}ms", d.as_millis().max(1))
}

impl ConsulAgent {
    /// A client for the agent at `addr` (`host:port` or a `http(s)://` URL, as `CONSUL_HTTP_ADDR`).
    pub fn new(addr: &str, token: Secret) -> Self {
        let base = if addr.starts_with("http://") || addr.starts_with("https://") {
            addr.trim_end_matches('/').to_owned()
        } else {
            format!("http://{addr}")
        };
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(2))
            .connect_timeout(Duration::from_secs(1))
            .build()
            .expect("static reqwest config");
        Self { http, base, token }
    }

    fn req(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let r = self.http.request(method, format!("{}{path}", self.base));
        if self.token.expose().is_empty() {
            r
        } else {
            r.header("X-Consul-Token", self.token.expose())
        }
    }

    async fn send(
        &self,
        what: &str,
        rb: reqwest::RequestBuilder,
    ) -> Result<reqwest::Response, ConsulError> {
        let resp = rb.send().await.map_err(|source| ConsulError::Unreachable {
            addr: self.base.clone(),
            source,
        })?;
        if resp.status().is_success() {
            Ok(resp)
        } else {
            let status = resp.status().as_u16();
            let body = resp.text().await.unwrap_or_default();
            Err(ConsulError::Refused {
                what: what.to_owned(),
                status,
                body,
            })
        }
    }

    /// Registers (or updates) a service instance with the local agent.
    ///
    /// # Errors
    /// [`ConsulError`] when the agent is unreachable or refuses the definition.
    pub async fn register(&self, reg: &Registration) -> Result<(), ConsulError> {
        self.send(
            "register",
            self.req(reqwest::Method::PUT, "/v1/agent/service/register")
                .json(reg),
        )
        .await
        .map(drop)
    }

    /// Removes a service instance from the local agent.
    ///
    /// # Errors
    /// [`ConsulError`] when the agent is unreachable or refuses.
    pub async fn deregister(&self, id: &str) -> Result<(), ConsulError> {
        self.send(
            "deregister",
            self.req(
                reqwest::Method::PUT,
                &format!("/v1/agent/service/deregister/{id}"),
            ),
        )
        .await
        .map(drop)
    }

    /// Sets the status of `TTL` check `check_id` (`PUT /v1/agent/check/update/:check_id`), with `output` shown
    /// in Consul's UI; restarts its TTL.
    ///
    /// # Errors
    /// [`ConsulError`] when the agent is unreachable or does not know the check (404/500).
    pub async fn update_check(
        &self,
        check_id: &str,
        status: CheckStatus,
        output: &str,
    ) -> Result<(), ConsulError> {
        self.send(
            "check update",
            self.req(
                reqwest::Method::PUT,
                &format!("/v1/agent/check/update/{check_id}"),
            )
            .json(&serde_json::json!({ "Status": status, "Output": output })),
        )
        .await
        .map(drop)
    }

    /// The address the agent advertises to its cluster (`Member.Addr` of `GET /v1/agent/self`): the
    /// machine's address on the cluster's network, which a service bound to every interface of a machine whose
    /// agent listens on loopback announces.
    ///
    /// # Errors
    /// [`ConsulError`] when the agent is unreachable, refuses, or names no address.
    pub async fn advertise_address(&self) -> Result<String, ConsulError> {
        let resp = self
            .send(
                "agent self",
                self.req(reqwest::Method::GET, "/v1/agent/self"),
            )
            .await?;
        let body: serde_json::Value = resp.json().await.unwrap_or_default();
        body["Member"]["Addr"]
            .as_str()
            .filter(|a| !a.is_empty())
            .map(str::to_owned)
            .ok_or_else(|| ConsulError::Refused {
                what: "agent self".into(),
                status: 200,
                body: "no Member.Addr in the answer".into(),
            })
    }

    /// Whether the local agent knows service instance `id`.
    ///
    /// # Errors
    /// [`ConsulError`] when the agent is unreachable.
    pub async fn is_registered(&self, id: &str) -> Result<bool, ConsulError> {
        match self
            .send(
                "service lookup",
                self.req(reqwest::Method::GET, &format!("/v1/agent/service/{id}")),
            )
            .await
        {
            Ok(_) => Ok(true),
            Err(ConsulError::Refused { status: 404, .. }) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Every service name in the catalog (`GET /v1/catalog/services`), sorted; Consul's own `consul` included.
    ///
    /// # Errors
    /// [`ConsulError`] when the agent is unreachable or refuses.
    pub async fn catalog_services(&self) -> Result<Vec<String>, ConsulError> {
        let resp = self
            .send(
                "catalog query",
                self.req(reqwest::Method::GET, "/v1/catalog/services"),
            )
            .await?;
        let map: HashMap<String, serde_json::Value> =
            resp.json()
                .await
                .map_err(|source| ConsulError::Unreachable {
                    addr: self.base.clone(),
                    source,
                })?;
        let mut names: Vec<String> = map.into_keys().collect();
        names.sort();
        Ok(names)
    }

    /// Every KV pair under `prefix` (`GET /v1/kv/<prefix>?recurse`), values decoded, and the KV index to wait on
    /// next. With `index` > 0 this is a blocking query: Consul answers when something under the prefix changed
    /// or after `wait` (Consul's blocking-query contract, <https://developer.hashicorp.com/consul/api-docs/features/blocking>).
    /// No key under the prefix is an empty list, not an error.
    ///
    /// # Errors
    /// [`ConsulError`] when the agent is unreachable, refuses, or does not answer within `wait` + 5 s.
    pub async fn kv_tree(
        &self,
        prefix: &str,
        index: u64,
        wait: Duration,
    ) -> Result<(Vec<(String, String)>, u64), ConsulError> {
        #[derive(Deserialize)]
        #[serde(rename_all = "PascalCase")]
        struct Pair {
            key: String,
            value: Option<String>,
        }
        let mut rb = self
            .req(reqwest::Method::GET, &format!("/v1/kv/{prefix}"))
            .query(&[("recurse", "true")])
            .timeout(wait + Duration::from_secs(5));
        if index > 0 {
            rb = rb.query(&[
                ("index", index.to_string()),
                ("wait", format!("{}s", wait.as_secs().max(1))),
            ]);
        }
        let resp = rb.send().await.map_err(|source| ConsulError::Unreachable {
            addr: self.base.clone(),
            source,
        })?;
        let next = resp
            .headers()
            .get("X-Consul-Index")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        if resp.status() == reqwest::StatusCode::NOT_FOUND {
            return Ok((Vec::new(), next));
        }
        if !resp.status().is_success() {
            let status = resp.status().as_u16();
            let body = resp.text().await.unwrap_or_default();
            return Err(ConsulError::Refused {
                what: format!("KV read of {prefix}"),
                status,
                body,
            });
        }
        let pairs: Vec<Pair> = resp
            .json()
            .await
            .map_err(|source| ConsulError::Unreachable {
                addr: self.base.clone(),
                source,
            })?;
        use base64::Engine as _;
        let decoded = pairs
            .into_iter()
            .map(|p| {
                let value = p
                    .value
                    .and_then(|v| base64::engine::general_purpose::STANDARD.decode(v).ok())
                    .map(|b| String::from_utf8_lossy(&b).into_owned())
                    .unwrap_or_default();
                (p.key, value)
            })
            .collect();
        Ok((decoded, next))
    }

    /// Sets KV key `key` to `value` (`PUT /v1/kv/<key>`).
    ///
    /// # Errors
    /// [`ConsulError`] when the agent is unreachable or refuses.
    pub async fn kv_put(&self, key: &str, value: &str) -> Result<(), ConsulError> {
        self.send(
            "KV write",
            self.req(reqwest::Method::PUT, &format!("/v1/kv/{key}"))
                .body(value.to_owned()),
        )
        .await
        .map(drop)
    }

    /// Deletes KV key `key`, or everything under it with `recurse` (`DELETE /v1/kv/<key>`).
    ///
    /// # Errors
    /// [`ConsulError`] when the agent is unreachable or refuses.
    pub async fn kv_delete(&self, key: &str, recurse: bool) -> Result<(), ConsulError> {
        let mut rb = self.req(reqwest::Method::DELETE, &format!("/v1/kv/{key}"));
        if recurse {
            rb = rb.query(&[("recurse", "true")]);
        }
        self.send("KV delete", rb).await.map(drop)
    }

    /// The cluster-wide instances of `name` (`GET /v1/health/service/:name`), only those passing every check
    /// when `passing_only`.
    ///
    /// # Errors
    /// [`ConsulError`] when the agent is unreachable or refuses.
    pub async fn health_service(
        &self,
        name: &str,
        passing_only: bool,
    ) -> Result<Vec<HealthEntry>, ConsulError> {
        let path = format!(
            "/v1/health/service/{name}{}",
            if passing_only { "?passing=true" } else { "" }
        );
        let resp = self
            .send("health query", self.req(reqwest::Method::GET, &path))
            .await?;
        resp.json()
            .await
            .map_err(|source| ConsulError::Unreachable {
                addr: self.base.clone(),
                source,
            })
    }
}

/// One service instance as Consul should know it.
#[derive(Clone, Debug)]
pub struct Instance {
    /// Service name.
    pub name: String,
    /// Service ID, unique per instance.
    pub id: String,
    /// Address clients dial.
    pub address: String,
    /// gRPC port.
    pub port: u16,
    /// Version, in service meta.
    pub version: String,
    /// Tags.
    pub tags: Vec<String>,
    /// Whether the server speaks TLS (the GRPC check then dials with TLS, without verifying: see [`crate::tls`]).
    pub tls: bool,
}

/// Keeps one instance registered for the life of the process.
#[derive(Clone, Debug)]
pub struct Registrar {
    agent: ConsulAgent,
    registration: Registration,
    /// Heartbeat interval of a `TTL` check; `None` for a `GRPC` check.
    heartbeat: Option<Duration>,
}

impl Registrar {
    /// The registration of `instance`, checked as `settings.check` says.
    pub fn new(settings: &ConsulSettings, agent: ConsulAgent, instance: &Instance) -> Self {
        let Instance {
            name,
            id,
            address,
            port,
            version,
            tags,
            tls,
        } = instance;
        let registration = Registration {
            id: id.clone(),
            name: name.clone(),
            tags: tags.clone(),
            address: address.clone(),
            port: *port,
            meta: HashMap::from([
                ("version".into(), version.clone()),
                ("protocol".into(), "grpc".into()),
            ]),
            checks: vec![match settings.check {
                CheckKind::Grpc => Check {
                    check_id: format!("{id}:grpc"),
                    name: format!("gRPC health of {name}"),
                    grpc: Some(format!("{address}:{port}")),
                    grpc_use_tls: *tls,
                    tls_skip_verify: *tls,
                    interval: Some(go_duration(settings.check_interval)),
                    timeout: Some(go_duration(
                        settings
                            .check_interval
                            .clamp(Duration::from_secs(1), Duration::from_secs(5)),
                    )),
                    failures_before_critical: Some(settings.failures_before_critical),
                    ttl: None,
                    deregister_critical_service_after: go_duration(
                        settings.deregister_critical_after,
                    ),
                },
                CheckKind::Ttl => Check {
                    check_id: format!("{id}:ttl"),
                    name: format!("gRPC health of {name}, reported by the instance"),
                    grpc: None,
                    grpc_use_tls: false,
                    tls_skip_verify: false,
                    interval: None,
                    timeout: None,
                    failures_before_critical: None,
                    ttl: Some(go_duration(settings.ttl())),
                    deregister_critical_service_after: go_duration(
                        settings.deregister_critical_after,
                    ),
                },
            }],
        };
        Self {
            agent,
            registration,
            heartbeat: (settings.check == CheckKind::Ttl).then_some(settings.check_interval),
        }
    }

    /// Whether the instance must report its own health ([`Registrar::heartbeat`]): a `TTL` check.
    pub fn needs_heartbeat(&self) -> bool {
        self.heartbeat.is_some()
    }

    /// For a `TTL` check: reports the instance's health to the agent — passing while `serving` holds `true`,
    /// critical otherwise — every `check_interval` and at once when it changes. Ends on `cancel`; returns at
    /// once for a `GRPC` check. A failed report is logged (the agent may be down or may have lost the
    /// registration, which [`Registrar::run`] restores) and retried at the next beat.
    pub async fn heartbeat(
        self,
        mut serving: tokio::sync::watch::Receiver<bool>,
        cancel: CancellationToken,
    ) {
        let Some(every) = self.heartbeat else {
            return;
        };
        let check_id = &self.registration.checks[0].check_id;
        let mut failing = false;
        loop {
            let (status, output) = if *serving.borrow_and_update() {
                (CheckStatus::Passing, "grpc.health.v1: SERVING")
            } else {
                (CheckStatus::Critical, "grpc.health.v1: NOT_SERVING")
            };
            match self.agent.update_check(check_id, status, output).await {
                Ok(()) if failing => {
                    tracing::info!(check_id, "consul check updates work again");
                    failing = false;
                }
                Ok(()) => {}
                // Logged once per outage, not every beat.
                Err(e) if !failing => {
                    tracing::warn!(check_id, error = %e, "consul check update failed");
                    failing = true;
                }
                Err(_) => {}
            }
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = serving.changed() => {}
                _ = tokio::time::sleep(every) => {}
            }
        }
    }

    /// The service ID.
    pub fn id(&self) -> &str {
        &self.registration.id
    }

    /// Registers, retrying with backoff (250 ms doubling to 10 s) while the agent is unreachable; then checks
    /// every `resync` that the agent still has the instance and registers it again if not. A check that finds
    /// the agent unreachable (restarting, say) is retried with the same backoff, not a whole `resync` later, so
    /// the instance is back within ~10 s of its agent (which may come back without it). Ends on `cancel`.
    pub async fn run(self, resync: Duration, cancel: CancellationToken) {
        let mut backoff = Duration::from_millis(250);
        let mut registered = false;
        loop {
            let wait = if registered {
                match self.agent.is_registered(self.id()).await {
                    Ok(true) => {
                        backoff = Duration::from_millis(250);
                        resync
                    }
                    Ok(false) => {
                        tracing::warn!(service_id = %self.id(), "consul agent lost the registration; registering again");
                        registered = false;
                        Duration::ZERO
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, retry_in = ?backoff, "consul agent unreachable");
                        next_backoff(&mut backoff)
                    }
                }
            } else {
                match self.agent.register(&self.registration).await {
                    Ok(()) => {
                        tracing::info!(service_id = %self.id(), "registered with consul");
                        registered = true;
                        backoff = Duration::from_millis(250);
                        resync
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, retry_in = ?backoff, "consul registration failed; serving anyway");
                        next_backoff(&mut backoff)
                    }
                }
            };
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// Deregisters the instance (bounded by the client's 2 s timeout).
    pub async fn deregister(&self) {
        match self.agent.deregister(self.id()).await {
            Ok(()) => tracing::info!(service_id = %self.id(), "deregistered from consul"),
            Err(e) => tracing::warn!(error = %e, "consul deregistration failed"),
        }
    }
}

/// The wait before the next attempt at the agent: `backoff` as it is, which doubles for the one after (to 10 s).
fn next_backoff(backoff: &mut Duration) -> Duration {
    let wait = *backoff;
    *backoff = (*backoff * 2).min(Duration::from_secs(10));
    wait
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Env, Settings};

    #[test]
    fn consul_checks_by_ttl_when_clients_need_certificates() {
        // Only their existence is checked here.
        let file = concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml");
        let mtls = Env::default()
            .with("KEEL_TLS__CERT_FILE", file)
            .with("KEEL_TLS__KEY_FILE", file)
            .with("KEEL_TLS__CA_FILE", file)
            .with("KEEL_TLS__REQUIRE_CLIENT_CERT", "true");
        let s = Settings::from_env("x", &mtls).unwrap();
        assert_eq!(s.consul.check, CheckKind::Ttl);
        assert_eq!(s.consul.ttl(), s.consul.check_interval * 3);
        let err =
            Settings::from_env("x", &mtls.clone().with("KEEL_CONSUL__CHECK", "grpc")).unwrap_err();
        assert_eq!(err.0[0].key, "consul.check", "{err}");
        let plain = Settings::from_env("x", &Env::default()).unwrap();
        assert_eq!(plain.consul.check, CheckKind::Grpc);
        let ttl =
            Settings::from_env("x", &Env::default().with("KEEL_CONSUL__CHECK", "TTL")).unwrap();
        assert_eq!(ttl.consul.check, CheckKind::Ttl);
        let bad = Settings::from_env("x", &Env::default().with("KEEL_CONSUL__CHECK", "http"))
            .unwrap_err();
        assert_eq!(bad.0[0].key, "consul.check");
    }

    /// The registrar of instance `echo-1` at 127.0.0.1:5000 under the settings of `env`.
    fn registrar(env: &crate::config::Env, tls: bool) -> Registrar {
        let s = crate::config::Settings::from_env("echo", env).unwrap();
        let instance = Instance {
            name: "echo".into(),
            id: "echo-1".into(),
            address: "127.0.0.1".into(),
            port: 5000,
            version: "1.0.0".into(),
            tags: vec!["a".into()],
            tls,
        };
        Registrar::new(
            &s.consul,
            ConsulAgent::new("127.0.0.1:8500", Secret::default()),
            &instance,
        )
    }

    #[test]
    fn registration_uses_consul_field_names() {
        let r = registrar(&Default::default(), false);
        let json = serde_json::to_value(&r.registration).unwrap();
        assert_eq!(json["ID"], "echo-1");
        assert_eq!(json["Port"], 5000);
        assert_eq!(json["Meta"]["protocol"], "grpc");
        let check = &json["Checks"][0];
        assert_eq!(check["GRPC"], "127.0.0.1:5000");
        assert_eq!(check["Interval"], "2000ms");
        assert_eq!(check["FailuresBeforeCritical"], 3);
        assert_eq!(check["DeregisterCriticalServiceAfter"], "60000ms");
        assert!(check.get("GRPCUseTLS").is_none() && check.get("TTL").is_none());
    }

    #[test]
    fn a_ttl_check_has_no_grpc_target() {
        let env = crate::config::Env::default().with("KEEL_CONSUL__CHECK", "ttl");
        let r = registrar(&env, true);
        assert!(r.needs_heartbeat());
        let check = &serde_json::to_value(&r.registration).unwrap()["Checks"][0];
        assert_eq!(check["CheckID"], "echo-1:ttl");
        assert_eq!(check["TTL"], "6000ms");
        assert!(
            check.get("GRPC").is_none() && check.get("Interval").is_none(),
            "{check}"
        );
    }
}
