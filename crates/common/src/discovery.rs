//! Finding peers: SRV records from Consul DNS (`<name>.service.consul`), polled every few seconds, or a static
//! list when Consul is not configured.
//!
//! Consul answers an SRV query with one record per healthy instance (target `<node>.node.dc1.consul.`, the
//! instance's port) and puts the target's A record in the **additional** section; addresses are matched to
//! targets by name, and a target with no additional record is resolved with an A lookup. Consul's TTL is 0, so
//! the resolver cache is off and [`watch`] polls. A failed lookup (DNS down) keeps the last known endpoints; an
//! empty answer (no healthy instance) empties the set, and polling speeds up to [`EMPTY_POLL`], doubling back to
//! the interval, until an instance appears (a dependency starting at the same time is found within a second or
//! two, not an interval later).

use std::{
    collections::{BTreeSet, HashMap},
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use hickory_resolver::{
    Resolver, TokioResolver,
    config::{NameServerConfig, ResolverConfig, ResolverOpts},
    net::runtime::TokioRuntimeProvider,
    proto::rr::{RData, Record, RecordType},
};
use tokio::sync::watch;

/// A DNS lookup that failed (not an empty answer).
#[derive(Debug, thiserror::Error)]
#[error("SRV lookup of {name} failed: {message}")]
pub struct DiscoveryError {
    /// The name looked up.
    pub name: String,
    /// The resolver's error.
    pub message: String,
}

/// Resolves Consul service names through Consul DNS.
#[derive(Clone)]
pub struct SrvResolver {
    resolver: TokioResolver,
}

impl std::fmt::Debug for SrvResolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SrvResolver")
    }
}

impl SrvResolver {
    /// A resolver asking only the DNS server at `dns_addr` (Consul's, default `127.0.0.1:8600`), UDP then TCP,
    /// with no cache.
    pub fn new(dns_addr: SocketAddr) -> Self {
        let mut ns = NameServerConfig::udp_and_tcp(dns_addr.ip());
        for c in &mut ns.connections {
            c.port = dns_addr.port();
        }
        let config = ResolverConfig::from_name_servers(vec![ns]);
        let mut opts = ResolverOpts::default();
        opts.cache_size = 0;
        opts.timeout = Duration::from_secs(1);
        opts.attempts = 2;
        opts.ndots = 0;
        let resolver = Resolver::builder_with_config(config, TokioRuntimeProvider::default())
            .with_options(opts)
            .build()
            .expect("static resolver config");
        Self { resolver }
    }

    /// Every healthy instance of Consul service `name`, as socket addresses, sorted.
    ///
    /// # Errors
    /// [`DiscoveryError`] when the DNS server cannot be asked; an unknown or unhealthy service is `Ok(vec![])`.
    pub async fn resolve(&self, name: &str) -> Result<Vec<SocketAddr>, DiscoveryError> {
        let fqdn = format!("{name}.service.consul.");
        let lookup = match self.resolver.lookup(fqdn.as_str(), RecordType::SRV).await {
            Ok(l) => l,
            Err(e) if e.is_no_records_found() || e.is_nx_domain() => return Ok(Vec::new()),
            Err(e) => {
                return Err(DiscoveryError {
                    name: fqdn,
                    message: e.to_string(),
                });
            }
        };
        let (mut found, unresolved) =
            pair_srv_with_additionals(lookup.answers(), lookup.additionals());
        for (target, port) in unresolved {
            match self.resolver.lookup_ip(target.as_str()).await {
                Ok(ips) => found.extend(ips.iter().map(|ip| SocketAddr::new(ip, port))),
                Err(e) => {
                    tracing::warn!(target = %target, error = %e, "SRV target did not resolve")
                }
            }
        }
        let set: BTreeSet<SocketAddr> = found.into_iter().collect();
        Ok(set.into_iter().collect())
    }
}

/// Pairs each SRV answer with the A/AAAA records of its target in the additional section, by name (never by
/// position). Returns the addresses found and the `(target, port)` pairs that had no additional record.
pub fn pair_srv_with_additionals(
    answers: &[Record],
    additionals: &[Record],
) -> (Vec<SocketAddr>, Vec<(String, u16)>) {
    let mut ips: HashMap<String, Vec<IpAddr>> = HashMap::new();
    for r in additionals {
        let ip = match &r.data {
            RData::A(a) => IpAddr::V4(a.0),
            RData::AAAA(a) => IpAddr::V6(a.0),
            _ => continue,
        };
        ips.entry(r.name.to_ascii().to_ascii_lowercase())
            .or_default()
            .push(ip);
    }
    let mut found = Vec::new();
    let mut unresolved = Vec::new();
    for r in answers {
        if let RData::SRV(srv) = &r.data {
            let target = srv.target.to_ascii().to_ascii_lowercase();
            match ips.get(&target) {
                Some(list) => found.extend(list.iter().map(|ip| SocketAddr::new(*ip, srv.port))),
                None => unresolved.push((target, srv.port)),
            }
        }
    }
    (found, unresolved)
}

/// Where a client finds the instances of one service.
#[derive(Clone, Debug)]
pub enum Source {
    /// Consul DNS SRV.
    Consul(Box<SrvResolver>),
    /// A fixed list.
    Static(Vec<SocketAddr>),
}

/// The first re-poll of [`watch`] after an empty answer (no healthy instance); it doubles up to the interval.
pub const EMPTY_POLL: Duration = Duration::from_millis(100);

/// Publishes the current endpoints of `name`, re-resolving every `interval` (sooner while there is none:
/// [`EMPTY_POLL`], doubling) until every receiver is gone. The first value is `None` until the first lookup finishes.
pub fn watch(
    name: String,
    source: Source,
    interval: Duration,
) -> watch::Receiver<Option<Vec<SocketAddr>>> {
    let (tx, rx) = watch::channel(None);
    match source {
        Source::Static(list) => {
            let _ = tx.send(Some(list));
            // Keep the sender alive as long as a receiver is.
            tokio::spawn(async move { tx.closed().await });
        }
        Source::Consul(resolver) => {
            tokio::spawn(async move {
                let mut wait = Duration::ZERO;
                // Re-poll delay while answers are empty, from EMPTY_POLL doubling up to the interval.
                let mut empty_backoff: Option<Duration> = None;
                loop {
                    tokio::select! {
                        _ = tx.closed() => return,
                        _ = tokio::time::sleep(wait) => {}
                    }
                    let answer = resolver.resolve(&name).await;
                    // Soon after an empty answer, backing off to the interval: a service that never appears
                    // (a typo) soon costs no more polling than one that is up.
                    empty_backoff = match &answer {
                        Ok(list) if list.is_empty() => {
                            Some(empty_backoff.map_or(EMPTY_POLL, |w| w * 2).min(interval))
                        }
                        _ => None,
                    };
                    wait = empty_backoff.unwrap_or(interval);
                    match answer {
                        Ok(list) => {
                            tx.send_if_modified(|cur| {
                                if cur.as_ref() == Some(&list) {
                                    false
                                } else {
                                    tracing::debug!(service = %name, endpoints = ?list, "endpoints changed");
                                    *cur = Some(list);
                                    true
                                }
                            });
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "discovery failed; keeping last known endpoints");
                            // Unblock callers waiting for a first answer: an unreachable DNS means no endpoints yet.
                            tx.send_if_modified(|cur| {
                                if cur.is_none() {
                                    *cur = Some(Vec::new());
                                    true
                                } else {
                                    false
                                }
                            });
                        }
                    }
                }
            });
        }
    }
    rx
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_resolver::proto::rr::{
        Name,
        rdata::{A, SRV},
    };
    use std::str::FromStr;

    fn srv(target: &str, port: u16) -> Record {
        Record::from_rdata(
            Name::from_str("echo.service.consul.").unwrap(),
            0,
            RData::SRV(SRV::new(1, 1, port, Name::from_str(target).unwrap())),
        )
    }
    fn a(name: &str, ip: [u8; 4]) -> Record {
        Record::from_rdata(
            Name::from_str(name).unwrap(),
            0,
            RData::A(A::new(ip[0], ip[1], ip[2], ip[3])),
        )
    }

    #[test]
    fn srv_targets_are_paired_by_name_not_position() {
        let answers = [
            srv("n1.node.dc1.consul.", 5001),
            srv("n2.node.dc1.consul.", 5002),
            srv("n3.node.dc1.consul.", 5003),
        ];
        // Additional section in the other order, and n3 missing.
        let additionals = [
            a("n2.node.dc1.consul.", [10, 0, 0, 2]),
            a("N1.node.dc1.consul.", [10, 0, 0, 1]),
        ];
        let (found, unresolved) = pair_srv_with_additionals(&answers, &additionals);
        assert_eq!(
            found,
            vec![
                "10.0.0.1:5001".parse().unwrap(),
                "10.0.0.2:5002".parse().unwrap()
            ]
        );
        assert_eq!(unresolved, vec![("n3.node.dc1.consul.".to_owned(), 5003)]);
    }
}
