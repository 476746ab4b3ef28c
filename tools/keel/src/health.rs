//! `keel health`: the fleet's state on one screen, usable from cron: every service instance's worst Consul
//! check, whether the servers the stack runs on answer, and (from Graphite's gauges) each process's outbox
//! backlog, dead letters, consumer lag and dropped telemetry. Exit code 0 when nothing is critical, 1 when an instance is
//! critical or a server does not answer; backlogs, lags, dead letters and drops are warnings.

use std::{net::ToSocketAddrs, time::Duration};

use serde_json::{Value, json};

use crate::{
    consul::Consul,
    graphite::{Graphite, Series, segment},
    output,
};

/// Where the servers are; each from the environment of `scripts/infra.sh env` unless given.
#[derive(clap::Args, Debug)]
#[command(
    after_help = "Example: eval \"$(scripts/infra.sh env)\"; keel health --service echo || alert"
)]
pub struct Args {
    /// Only these services (repeatable); default: every service in the Consul catalog.
    #[arg(long = "service")]
    pub services: Vec<String>,
    #[command(flatten)]
    pub consul: crate::consul::ConsulArgs,
    /// Kafka bootstrap servers (checked: the first answers TCP).
    #[arg(long, env = "KEEL_KAFKA_BROKERS")]
    pub kafka: Option<String>,
    /// PostgreSQL URL (checked: its host answers TCP).
    #[arg(long, env = "KEEL_DATABASE_URL", hide_env_values = true)]
    pub database: Option<String>,
    /// graphite-web's base URL (checked: `/version/` answers; outbox and telemetry gauges read from it).
    #[arg(long, env = "KEEL_GRAPHITE_URL")]
    pub graphite: Option<String>,
    /// `statsd.prefix` of the services.
    #[arg(long, default_value = "keel")]
    pub prefix: String,
    /// An outbox backlog or a consumer lag above this many events is a warning.
    #[arg(long, default_value_t = 1000)]
    pub backlog_warning: u64,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// One row: a service instance, a server or a process's gauges, its state, and a detail.
struct Row {
    kind: &'static str,
    name: String,
    state: String,
    detail: String,
}

/// How far back the gauges are read: a process that sent nothing for this long is not shown.
const GAUGE_WINDOW: Duration = Duration::from_secs(300);

/// Runs the checks, prints them; returns whether nothing is critical.
///
/// # Errors
/// Consul does not answer (the error names the address and the flag or variable to change).
pub async fn run(args: &Args) -> anyhow::Result<bool> {
    let consul = Consul::new(&args.consul);
    let services = if args.services.is_empty() {
        consul.services().await?
    } else {
        args.services.clone()
    };
    let mut rows = Vec::new();
    for svc in &services {
        let entries = consul.instances(svc).await?;
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
    rows.push(server("consul", Some(args.consul.consul.clone()), tcp));
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
    match &args.graphite {
        Some(url) => {
            let ok = reqwest::Client::new()
                .get(format!("{}/version/", url.trim_end_matches('/')))
                .timeout(Duration::from_secs(3))
                .send()
                .await
                .is_ok_and(|r| r.status().is_success());
            rows.push(Row {
                kind: "server",
                name: "graphite-web".into(),
                state: if ok { "passing" } else { "critical" }.into(),
                detail: url.clone(),
            });
            if ok {
                let only: Vec<String> = args.services.iter().map(|s| segment(s)).collect();
                rows.extend(gauge_rows(url, &args.prefix, &only, args.backlog_warning).await?);
            }
        }
        None => rows.push(unset("graphite-web")),
    }

    let healthy = rows.iter().all(|r| r.state != "critical");
    if args.json {
        let list: Vec<Value> = rows
            .iter()
            .map(|r| json!({"kind": r.kind, "name": r.name, "state": r.state, "detail": r.detail}))
            .collect();
        output::json(&json!({"healthy": healthy, "checks": list}));
    } else {
        let mut table = output::table(["", "NAME", "STATE", "DETAIL"]);
        for r in &rows {
            table.add_row(vec![
                comfy_table::Cell::new(r.kind),
                comfy_table::Cell::new(&r.name),
                output::state_cell(&r.state),
                comfy_table::Cell::new(&r.detail),
            ]);
        }
        println!("{table}");
        println!("{}", if healthy { "healthy" } else { "NOT healthy" });
    }
    Ok(healthy)
}

/// Rows from the platform's gauges over the last [`GAUGE_WINDOW`], per process (only those in `only` when not
/// empty): outbox backlog (warning above `backlog_warning`), dead letters (warning above 0), and telemetry
/// dropped (warning when the drop total grew in the window).
async fn gauge_rows(
    url: &str,
    prefix: &str,
    only: &[String],
    backlog_warning: u64,
) -> anyhow::Result<Vec<Row>> {
    let g = format!("stats.gauges.{prefix}.*");
    let series = Graphite::new(url)?
        .render(
            &[
                format!("{g}.outbox.*.{{backlog,dead_letters}}"),
                format!("{g}.events.{{dead_letters,consumer_lag}}"),
                format!("{g}.telemetry.{{metrics_dropped,logs_dropped}}"),
            ],
            GAUGE_WINDOW,
        )
        .await?;
    Ok(gauge_findings(&series, only, backlog_warning))
}

/// See [`gauge_rows`]: the rows for the series of its query.
fn gauge_findings(series: &[Series], only: &[String], backlog_warning: u64) -> Vec<Row> {
    let mut rows = Vec::new();
    for s in series {
        let process = s.node(3);
        if !only.is_empty() && !only.iter().any(|o| o == process) {
            continue;
        }
        let mut recorded = s.values.iter().flatten();
        let Some(first) = recorded.next().copied() else {
            continue;
        };
        let last = recorded.last().copied().unwrap_or(first);
        // stats.gauges.<prefix>.<process>.{outbox.<service>.<gauge> | events.<gauge> | telemetry.<gauge>}
        let (kind, what, warn) = match (s.node(4), s.node(6), s.node(5)) {
            ("outbox", "backlog", _) => (
                "outbox",
                format!("{last} events waiting"),
                last > backlog_warning as f64,
            ),
            ("events", _, "consumer_lag") => (
                "consumer lag",
                format!("{last} events not yet consumed"),
                last > backlog_warning as f64,
            ),
            ("outbox", "dead_letters", _) | ("events", _, "dead_letters") => (
                "dead letters",
                format!("{last} events dead-lettered"),
                last > 0.0,
            ),
            ("telemetry", _, gauge) => {
                let grew = last - first;
                (
                    "telemetry",
                    format!("{gauge}: {grew} in the last 5 min ({last} since start)"),
                    grew > 0.0,
                )
            }
            _ => continue,
        };
        rows.push(Row {
            kind,
            name: process.to_owned(),
            state: if warn { "warning" } else { "passing" }.into(),
            detail: what,
        });
    }
    rows
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
    fn gauges_become_warnings_for_backlogs_dead_letters_and_new_drops() {
        let s = |t: &str, v: &[Option<f64>]| Series {
            target: t.into(),
            values: v.to_vec(),
        };
        let series = [
            s(
                "stats.gauges.keel.comments.outbox.comments.backlog",
                &[Some(5000.0), Some(1500.0)],
            ),
            s(
                "stats.gauges.keel.ratings.outbox.ratings.backlog",
                &[Some(3.0), None],
            ),
            s(
                "stats.gauges.keel.ratings.events.dead_letters",
                &[Some(2.0)],
            ),
            s(
                "stats.gauges.keel.statistics.events.consumer_lag",
                &[Some(1200.0), Some(10.0)],
            ),
            s(
                "stats.gauges.keel.echo.telemetry.logs_dropped",
                &[Some(7.0), Some(9.0)],
            ),
            s(
                "stats.gauges.keel.echo.telemetry.metrics_dropped",
                &[Some(4.0), Some(4.0)],
            ),
            s(
                "stats.gauges.keel.gone.telemetry.logs_dropped",
                &[None, None],
            ),
        ];
        let rows = gauge_findings(&series, &[], 1000);
        let found: Vec<(&str, &str, &str)> = rows
            .iter()
            .map(|r| (r.kind, r.name.as_str(), r.state.as_str()))
            .collect();
        assert_eq!(
            found,
            [
                ("outbox", "comments", "warning"),
                ("outbox", "ratings", "passing"),
                ("dead letters", "ratings", "warning"),
                ("consumer lag", "statistics", "passing"),
                ("telemetry", "echo", "warning"),
                ("telemetry", "echo", "passing"),
            ]
        );
        assert_eq!(
            rows[4].detail,
            "logs_dropped: 2 in the last 5 min (9 since start)"
        );
        assert_eq!(gauge_findings(&series, &["echo".into()], 1000).len(), 2);
    }

    #[test]
    fn the_database_address_comes_from_its_url() {
        assert_eq!(
            db_addr("postgres://postgres@127.0.0.1:15432/postgres").as_deref(),
            Some("127.0.0.1:15432")
        );
        assert_eq!(db_addr("postgres://db/x").as_deref(), Some("db:5432"));
    }
}
