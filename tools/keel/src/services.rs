//! `keel services`: every service in the Consul catalog with its instances passing/total, the versions they
//! run (service meta `version`), the instances whose checks are critical, and, from Graphite, the calls per second and error ratio it served over the
//! last minute, health checks left out (`micro services` and `consul catalog services`, with `linkerd viz stat`'s two numbers).

use std::{collections::BTreeSet, time::Duration};

use keel_common::consul::HealthEntry;
use serde_json::{Value, json};

use crate::{
    consul::Consul,
    graphite::{Graphite, segment},
    output,
};

/// `keel services` options.
#[derive(clap::Args, Debug)]
#[command(after_help = "Example: eval \"$(scripts/infra.sh env)\"; keel services --window 5m")]
pub struct Args {
    #[command(flatten)]
    pub consul: crate::consul::ConsulArgs,
    /// How far back the request rate and error ratio look (`1m`, `5m`).
    #[arg(long, default_value = "1m", value_parser = humantime::parse_duration)]
    pub window: Duration,
    /// `statsd.prefix` of the services.
    #[arg(long, default_value = "keel")]
    pub prefix: String,
    /// graphite-web's base URL (without it the rate columns stay empty).
    #[arg(long, env = "KEEL_GRAPHITE_URL")]
    pub graphite: Option<String>,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// One service's line.
struct Line {
    name: String,
    passing: usize,
    total: usize,
    versions: Vec<String>,
    /// Ids of the instances with a critical check.
    critical: Vec<String>,
    requests: Option<f64>,
    ok: Option<f64>,
}

impl Line {
    fn state(&self) -> &'static str {
        if self.total > 0 && self.passing == self.total {
            "passing"
        } else if self.passing > 0 {
            "warning"
        } else {
            "critical"
        }
    }

    fn error_ratio(&self) -> Option<f64> {
        match (self.requests, self.ok) {
            (Some(r), ok) if r > 0.0 => Some(1.0 - ok.unwrap_or(0.0) / r),
            _ => None,
        }
    }
}

/// Whether every check of an instance passes.
pub fn instance_passing(e: &HealthEntry) -> bool {
    e.checks.iter().all(|c| c.status == "passing")
}

/// Lists the services.
///
/// # Errors
/// Consul does not answer (named, with the setting to change). graphite-web not answering is a warning on
/// stderr and empty rate columns, not an error.
pub async fn run(args: &Args) -> anyhow::Result<()> {
    let consul = Consul::new(&args.consul);
    let mut lines = Vec::new();
    for name in consul.services().await? {
        let entries = consul.instances(&name).await?;
        let versions: BTreeSet<String> = entries
            .iter()
            .filter_map(|e| e.service.meta.as_ref()?.get("version").cloned())
            .collect();
        let critical = entries
            .iter()
            .filter(|e| e.checks.iter().any(|c| c.status == "critical"))
            .map(|e| e.service.id.clone())
            .collect();
        lines.push(Line {
            critical,
            passing: entries.iter().filter(|e| instance_passing(e)).count(),
            total: entries.len(),
            versions: versions.into_iter().collect(),
            name,
            requests: None,
            ok: None,
        });
    }
    if let Some(url) = &args.graphite {
        // Application calls only: Consul's health checks (every check interval, per instance) are left out.
        let counts = |leaf: &str| {
            format!(
                "groupByNode(exclude(stats_counts.{}.*.grpc.server.*.*.{leaf}, '\\.grpc\\.server\\.Health\\.'), 2, 'sumSeries')",
                args.prefix
            )
        };
        let targets = [
            format!("aliasSub({}, '^', 'requests.')", counts("requests")),
            format!("aliasSub({}, '^', 'ok.')", counts("status.OK")),
        ];
        match Graphite::new(url)?.render(&targets, args.window).await {
            Ok(series) => {
                for l in &mut lines {
                    let seg = segment(&l.name);
                    let sum = |kind: &str| {
                        series
                            .iter()
                            .find(|s| s.node(0) == kind && s.node(1) == seg)
                            .map(|s| s.sum())
                    };
                    l.requests = Some(sum("requests").unwrap_or(0.0));
                    l.ok = sum("ok");
                }
            }
            Err(e) => eprintln!("warning: {e:#}; rates left empty"),
        }
    }
    let secs = args.window.as_secs_f64().max(1.0);
    if args.json {
        let list: Vec<Value> = lines
            .iter()
            .map(|l| {
                json!({
                    "service": l.name,
                    "state": l.state(),
                    "passing": l.passing,
                    "instances": l.total,
                    "versions": l.versions,
                    "critical_instances": l.critical,
                    "requests_per_second": l.requests.map(|r| r / secs),
                    "error_ratio": l.error_ratio(),
                })
            })
            .collect();
        output::json(&json!({"window_seconds": secs, "services": list}));
        return Ok(());
    }
    let mut table = output::table([
        "SERVICE", "STATE", "PASSING", "VERSION", "RPS", "ERRORS", "CRITICAL",
    ]);
    for l in &lines {
        table.add_row(vec![
            comfy_table::Cell::new(&l.name),
            output::state_cell(l.state()),
            comfy_table::Cell::new(format!("{}/{}", l.passing, l.total)),
            comfy_table::Cell::new(l.versions.join(", ")),
            comfy_table::Cell::new(
                l.requests
                    .map_or("-".into(), |r| format!("{:.2}", r / secs)),
            ),
            comfy_table::Cell::new(
                l.error_ratio()
                    .map_or("-".into(), |e| format!("{:.2}%", e * 100.0)),
            ),
            comfy_table::Cell::new(l.critical.join("\n")).fg(comfy_table::Color::Red),
        ]);
    }
    println!("{table}");
    Ok(())
}
