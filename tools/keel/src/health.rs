//! `keel health`: the fleet's state on one screen, usable from cron: every service instance's worst Consul
//! check, and whether the servers the stack runs on answer. Exit code 0 when everything passes, 1 when an
//! instance is critical or a server does not answer.

use std::{net::ToSocketAddrs, time::Duration};

use keel_common::{config::Secret, consul::ConsulAgent};
use serde_json::{Value, json};

/// Where the servers are; each from the environment of `scripts/infra.sh env` unless given.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Only these services (repeatable); default: every service in the Consul catalog.
    #[arg(long = "service")]
    pub services: Vec<String>,
    /// Consul agent's HTTP address.
    #[arg(long, env = "CONSUL_HTTP_ADDR", default_value = "127.0.0.1:8500")]
    pub consul: String,
    /// Kafka bootstrap servers (checked: the first answers TCP).
    #[arg(long, env = "KEEL_KAFKA_BROKERS")]
    pub kafka: Option<String>,
    /// PostgreSQL URL (checked: its host answers TCP).
    #[arg(long, env = "KEEL_DATABASE_URL")]
    pub database: Option<String>,
    /// graphite-web's base URL (checked: `/version/` answers).
    #[arg(long, env = "KEEL_GRAPHITE_URL")]
    pub graphite: Option<String>,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// One row: a service instance or a server, its state, and a detail.
struct Row {
    kind: &'static str,
    name: String,
    state: String,
    detail: String,
}

/// Runs the checks, prints them; returns whether everything is healthy.
///
/// # Errors
/// Consul does not answer (the error names the address and the flag or variable to change).
pub async fn run(args: &Args) -> anyhow::Result<bool> {
    let consul = ConsulAgent::new(&args.consul, Secret::new(""));
    let services = if args.services.is_empty() {
        consul.catalog_services().await.map_err(|e| {
            anyhow::anyhow!(
                "Consul at {} (--consul / CONSUL_HTTP_ADDR): {e}",
                args.consul
            )
        })?
    } else {
        args.services.clone()
    };
    let mut rows = Vec::new();
    for svc in services.iter().filter(|s| s.as_str() != "consul") {
        let entries = consul.health_service(svc, false).await.map_err(|e| {
            anyhow::anyhow!(
                "Consul at {} (--consul / CONSUL_HTTP_ADDR): {e}",
                args.consul
            )
        })?;
        if entries.is_empty() {
            rows.push(Row {
                kind: "service",
                name: svc.clone(),
                state: "critical".into(),
                detail: "no instance registered".into(),
            });
        }
        for e in entries {
            let worst = e
                .checks
                .iter()
                .map(|c| c.status.as_str())
                .max_by_key(|s| match *s {
                    "passing" => 0,
                    "warning" => 1,
                    _ => 2,
                })
                .unwrap_or("passing");
            rows.push(Row {
                kind: "service",
                name: svc.clone(),
                state: worst.to_owned(),
                detail: format!(
                    "{} at {}:{}",
                    e.service.id, e.service.address, e.service.port
                ),
            });
        }
    }
    rows.push(server("consul", Some(args.consul.clone()), tcp));
    rows.push(server(
        "kafka",
        args.kafka
            .as_ref()
            .and_then(|b| b.split(',').next())
            .map(str::to_owned),
        tcp,
    ));
    rows.push(server(
        "postgresql",
        args.database.as_deref().and_then(db_addr),
        tcp,
    ));
    let graphite = match &args.graphite {
        Some(url) => {
            let ok = reqwest::Client::new()
                .get(format!("{}/version/", url.trim_end_matches('/')))
                .timeout(Duration::from_secs(3))
                .send()
                .await
                .is_ok_and(|r| r.status().is_success());
            Row {
                kind: "server",
                name: "graphite-web".into(),
                state: if ok { "passing" } else { "critical" }.into(),
                detail: url.clone(),
            }
        }
        None => unset("graphite-web"),
    };
    rows.push(graphite);

    let healthy = rows.iter().all(|r| r.state != "critical");
    if args.json {
        let list: Vec<Value> = rows
            .iter()
            .map(|r| json!({"kind": r.kind, "name": r.name, "state": r.state, "detail": r.detail}))
            .collect();
        println!("{}", json!({"healthy": healthy, "checks": list}));
    } else {
        let mut table = comfy_table::Table::new();
        table.load_preset(comfy_table::presets::UTF8_BORDERS_ONLY);
        table.set_header(["", "name", "state", "detail"]);
        for r in &rows {
            table.add_row([r.kind, r.name.as_str(), r.state.as_str(), r.detail.as_str()]);
        }
        println!("{table}");
        println!("{}", if healthy { "healthy" } else { "NOT healthy" });
    }
    Ok(healthy)
}

/// A server row: `check(addr)` when an address is configured, else "not configured" (not an error).
fn server(name: &str, addr: Option<String>, check: fn(&str) -> bool) -> Row {
    match addr {
        Some(a) => Row {
            kind: "server",
            name: name.into(),
            state: if check(&a) { "passing" } else { "critical" }.into(),
            detail: a,
        },
        None => unset(name),
    }
}

fn unset(name: &str) -> Row {
    Row {
        kind: "server",
        name: name.into(),
        state: "unknown".into(),
        detail: "not configured".into(),
    }
}

/// Whether `host:port` (an `http://` prefix allowed) accepts a TCP connection within 2 s.
fn tcp(addr: &str) -> bool {
    let hostport = addr
        .trim_start_matches("http://")
        .trim_start_matches("https://");
    hostport
        .to_socket_addrs()
        .ok()
        .and_then(|mut a| a.next())
        .is_some_and(|a| std::net::TcpStream::connect_timeout(&a, Duration::from_secs(2)).is_ok())
}

/// `host:port` of a `postgres://user@host:port/db` URL.
fn db_addr(url: &str) -> Option<String> {
    let u = url::Url::parse(url).ok()?;
    Some(format!("{}:{}", u.host_str()?, u.port().unwrap_or(5432)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_database_address_comes_from_its_url() {
        assert_eq!(
            db_addr("postgres://postgres@127.0.0.1:15432/postgres").as_deref(),
            Some("127.0.0.1:15432")
        );
        assert_eq!(db_addr("postgres://db/x").as_deref(), Some("db:5432"));
    }
}
