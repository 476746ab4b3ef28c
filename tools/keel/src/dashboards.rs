//! Dashboards generated from the protos, never drawn by hand: one per gRPC service with the golden signals of
//! its RPCs, a fleet overview, and the platform's own health. Targets follow the metric names of
//! `keel_common::metrics` as the Etsy StatsD daemon stores them in Graphite:
//! `stats_counts.<prefix>.<process>.grpc.server.<Service>.<Method>.{requests,status.<CODE>}` (counters per
//! 1 s flush), `stats.timers.<…>.latency.upper_<pct>` (timers), `stats.gauges.<prefix>.<process>.…` (gauges).
//! The process node is a wildcard: a service's dashboard shows it wherever it runs (its own process, or the
//! embedded KillrVideo server).

use std::path::Path;

use anyhow::Context;
use prost_reflect::DescriptorPool;
use serde_json::{Value, json};

/// One graph: a title, a vertical-axis label and Graphite targets.
#[derive(Clone, Debug)]
pub struct Graph {
    /// Shown above the graph.
    pub title: String,
    /// Unit of the vertical axis.
    pub unit: &'static str,
    /// Graphite target expressions.
    pub targets: Vec<String>,
}

/// One dashboard.
#[derive(Clone, Debug)]
pub struct Dashboard {
    /// Its name in graphite-web (`<prefix>.<Service>`, `<prefix>.fleet`, `<prefix>.platform`; the prefix is
    /// `keel` by default) and its file name.
    pub name: String,
    /// Its graphs, in order.
    pub graphs: Vec<Graph>,
}

/// The gRPC services of the stack's protos (`keel_protos::FILE_DESCRIPTOR_SET`), by their names without the
/// package, as the metrics name them (`Echo`, `VideoCatalogService`, `Search`…), sorted.
///
/// # Errors
/// The embedded descriptor set does not decode.
pub fn services() -> anyhow::Result<Vec<String>> {
    let pool = DescriptorPool::decode(keel_protos::FILE_DESCRIPTOR_SET)
        .context("decode the protos' descriptor set")?;
    let mut names: Vec<String> = pool.services().map(|s| s.name().to_owned()).collect();
    names.sort();
    names.dedup();
    Ok(names)
}

/// Every dashboard for metric prefix `prefix` (`statsd.prefix`).
///
/// # Errors
/// As [`services`].
pub fn generate(prefix: &str) -> anyhow::Result<Vec<Dashboard>> {
    let mut boards: Vec<Dashboard> = services()?.iter().map(|s| service(prefix, s)).collect();
    boards.push(fleet(prefix));
    boards.push(platform(prefix));
    Ok(boards)
}

/// The golden signals of one service: requests/s and errors by status per RPC, latency percentiles, load.
pub fn service(prefix: &str, svc: &str) -> Dashboard {
    let counts = format!("stats_counts.{prefix}.*.grpc.server.{svc}.*");
    let timers = format!("stats.timers.{prefix}.*.grpc.server.{svc}.*.latency");
    Dashboard {
        name: format!("{prefix}.{svc}"),
        graphs: vec![
            Graph {
                title: format!("{svc}: requests/s by RPC"),
                unit: "calls/s",
                // Node 6 is the method.
                targets: vec![format!("groupByNode({counts}.requests, 6, 'sumSeries')")],
            },
            Graph {
                title: format!("{svc}: errors by status code, % of calls"),
                unit: "%",
                // Node 8 is the status code name; OK is not an error.
                targets: vec![format!(
                    "aliasSub(asPercent(groupByNode(exclude({counts}.status.*, '\\.OK$'), 8, 'sumSeries'), sumSeries({counts}.requests)), '^asPercent\\(([^,]+),.*', '\\1')"
                )],
            },
            Graph {
                title: format!("{svc}: latency p50 / p90 / p99, slowest RPC"),
                unit: "ms",
                targets: ["50", "90", "99"]
                    .iter()
                    .map(|p| format!("alias(maxSeries({timers}.upper_{p}), 'p{p}')"))
                    .collect(),
            },
            Graph {
                title: format!("{svc}: calls/s by process"),
                unit: "calls/s",
                // Node 2 is the process (service instance name).
                targets: vec![format!("groupByNode({counts}.requests, 2, 'sumSeries')")],
            },
            Graph {
                title: "calls in flight, by process".into(),
                unit: "calls",
                targets: vec![format!(
                    "aliasByNode(stats.gauges.{prefix}.*.grpc.server.inflight, 3)"
                )],
            },
        ],
    }
}

/// Every service's request rate and error ratio on one page.
pub fn fleet(prefix: &str) -> Dashboard {
    let counts = format!("stats_counts.{prefix}.*.grpc.server.*.*");
    Dashboard {
        name: format!("{prefix}.fleet"),
        graphs: vec![
            Graph {
                title: "requests/s by service".into(),
                unit: "calls/s",
                targets: vec![format!("groupByNode({counts}.requests, 5, 'sumSeries')")],
            },
            Graph {
                title: "errors by service, % of calls".into(),
                unit: "%",
                targets: vec![format!(
                    "aliasSub(asPercent(groupByNode(exclude({counts}.status.*, '\\.OK$'), 5, 'sumSeries'), groupByNode({counts}.requests, 5, 'sumSeries'), 0), '^asPercent\\(([^,]+),.*', '\\1')"
                )],
            },
            Graph {
                title: "latency p99 by service".into(),
                unit: "ms",
                targets: vec![format!(
                    "groupByNode(stats.timers.{prefix}.*.grpc.server.*.*.latency.upper_99, 6, 'maxSeries')"
                )],
            },
        ],
    }
}

/// The platform's own health: telemetry dropped, outbox backlog, dead letters, consumer lag.
pub fn platform(prefix: &str) -> Dashboard {
    let gauges = format!("stats.gauges.{prefix}.*");
    Dashboard {
        name: format!("{prefix}.platform"),
        graphs: vec![
            Graph {
                title: "metrics and log lines dropped, by process".into(),
                unit: "lines",
                targets: vec![format!("aliasByNode({gauges}.telemetry.*, 3, 5)")],
            },
            Graph {
                title: "outbox backlog, by service".into(),
                unit: "events",
                targets: vec![format!("aliasByNode({gauges}.outbox.*.backlog, 5)")],
            },
            Graph {
                title: "dead letters: outbox tables and consumers".into(),
                unit: "events",
                targets: vec![
                    format!("aliasByNode({gauges}.outbox.*.dead_letters, 5)"),
                    format!("aliasByNode({gauges}.events.dead_letters, 3)"),
                ],
            },
            Graph {
                title: "consumer lag: events not yet consumed, by process".into(),
                unit: "events",
                targets: vec![format!("aliasByNode({gauges}.events.consumer_lag, 3)")],
            },
        ],
    }
}

/// How far back a dashboard shows by default: a quantity and a Graphite unit (`30`, `minutes`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Range {
    /// How many units.
    pub quantity: u32,
    /// `minutes`, `hours` or `days`.
    pub units: String,
}

impl Default for Range {
    fn default() -> Self {
        Self {
            quantity: 30,
            units: "minutes".into(),
        }
    }
}

impl std::str::FromStr for Range {
    type Err = String;

    /// `30minutes`, `2hours`, `1days` (Graphite's units).
    fn from_str(s: &str) -> Result<Self, String> {
        let rest = s.trim_start_matches('-');
        let digits = rest.chars().take_while(char::is_ascii_digit).count();
        let (n, units) = rest.split_at(digits);
        let quantity = n
            .parse()
            .map_err(|_| format!("{s:?}: expected e.g. 30minutes"))?;
        match units {
            "minutes" | "hours" | "days" => Ok(Self {
                quantity,
                units: units.to_owned(),
            }),
            _ => Err(format!("{s:?}: the unit is minutes, hours or days")),
        }
    }
}

/// graphite-web's dashboard state (what its dashboard UI saves): graphs as `[id, params, url]`, showing the
/// last `range` by default.
pub fn graphite_json(d: &Dashboard, range: &Range) -> Value {
    let graphs: Vec<Value> = d
        .graphs
        .iter()
        .map(|g| {
            // No time range or size of its own: the dashboard's apply to every graph.
            let params = json!({
                "target": g.targets,
                "title": g.title,
                "vtitle": g.unit,
                "lineWidth": 2,
                "hideLegend": false,
            });
            json!([g.title, params, "", "png"])
        })
        .collect();
    json!({
        "name": d.name,
        "timeConfig": {
            "type": "relative",
            "relativeStartQuantity": range.quantity.to_string(),
            "relativeStartUnits": range.units,
            "relativeUntilQuantity": "",
            "relativeUntilUnits": "now",
        },
        "refreshConfig": {"enabled": true, "interval": 60000},
        "graphSize": {"width": 600, "height": 300},
        "defaultGraphParams": {
            "from": format!("-{}{}", range.quantity, range.units),
            "until": "now",
            "width": 600,
            "height": 300,
        },
        "graphs": graphs,
    })
}

/// A Grafana dashboard (schema 39) on a Graphite data source chosen at import (`${DS_GRAPHITE}`).
pub fn grafana_json(d: &Dashboard) -> Value {
    let panels: Vec<Value> = d
        .graphs
        .iter()
        .enumerate()
        .map(|(i, g)| {
            let targets: Vec<Value> = g
                .targets
                .iter()
                .enumerate()
                .map(|(j, t)| json!({"refId": char::from(b'A' + j as u8).to_string(), "target": t}))
                .collect();
            json!({
                "id": i + 1,
                "type": "timeseries",
                "title": g.title,
                "datasource": {"type": "graphite", "uid": "${DS_GRAPHITE}"},
                "gridPos": {"h": 8, "w": 12, "x": (i % 2) * 12, "y": (i / 2) * 8},
                "fieldConfig": {"defaults": {"unit": grafana_unit(g.unit)}, "overrides": []},
                "targets": targets,
            })
        })
        .collect();
    json!({
        "__inputs": [{
            "name": "DS_GRAPHITE", "label": "Graphite", "type": "datasource",
            "pluginId": "graphite", "pluginName": "Graphite",
        }],
        "title": d.name,
        "uid": d.name.replace('.', "-"),
        "schemaVersion": 39,
        "time": {"from": "now-30m", "to": "now"},
        "refresh": "10s",
        "tags": ["keel"],
        "panels": panels,
    })
}

fn grafana_unit(unit: &str) -> &'static str {
    match unit {
        "calls/s" => "reqps",
        "%" => "percent",
        "ms" => "ms",
        _ => "short",
    }
}

/// Writes `graphite/<name>.json` and `grafana/<name>.json` under `dir`.
///
/// # Errors
/// A file cannot be written.
pub fn write(boards: &[Dashboard], dir: &Path) -> anyhow::Result<()> {
    let graphite = |d: &Dashboard| graphite_json(d, &Range::default());
    for (kind, render) in [
        ("graphite", &graphite as &dyn Fn(&Dashboard) -> Value),
        ("grafana", &grafana_json),
    ] {
        let sub = dir.join(kind);
        std::fs::create_dir_all(&sub)?;
        for b in boards {
            let text = serde_json::to_string_pretty(&render(b))? + "\n";
            std::fs::write(sub.join(format!("{}.json", b.name)), text)?;
        }
    }
    Ok(())
}

/// Saves every dashboard into graphite-web at `url` (`POST /dashboard/save/<name>`, form field `state`),
/// showing the last `range` by default.
///
/// # Errors
/// graphite-web is unreachable or refuses one (the error names it and the setting to change).
pub async fn load(boards: &[Dashboard], url: &str, range: &Range) -> anyhow::Result<()> {
    let http = reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(10))
        .build()?;
    for b in boards {
        let state = graphite_json(b, range).to_string();
        let answer: Value = http
            .post(format!(
                "{}/dashboard/save/{}",
                url.trim_end_matches('/'),
                b.name
            ))
            .form(&[("state", state)])
            .send()
            .await
            .with_context(|| {
                format!("graphite-web at {url} (--load / KEEL_GRAPHITE_URL) does not answer")
            })?
            .error_for_status()?
            .json()
            .await
            .context("graphite-web answered something else than JSON")?;
        anyhow::ensure!(
            answer["success"] == true,
            "graphite-web refused dashboard {}: {answer}",
            b.name
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_service_of_the_protos_gets_a_dashboard_plus_fleet_and_platform() {
        let names: Vec<String> = generate("keel")
            .unwrap()
            .into_iter()
            .map(|d| d.name)
            .collect();
        for want in [
            "keel.Echo",
            "keel.Cache",
            "keel.Accounts",
            "keel.VideoCatalogService",
            "keel.Search",
            "keel.fleet",
            "keel.platform",
        ] {
            assert!(
                names.contains(&want.to_owned()),
                "{want} missing from {names:?}"
            );
        }
    }

    #[test]
    fn the_files_in_deploy_are_what_the_generator_writes() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/dashboards");
        for d in generate("keel").unwrap() {
            let graphite = graphite_json(&d, &Range::default());
            for (kind, json) in [("graphite", graphite), ("grafana", grafana_json(&d))] {
                let path = dir.join(kind).join(format!("{}.json", d.name));
                let file = std::fs::read_to_string(&path).unwrap_or_default();
                assert_eq!(
                    file,
                    serde_json::to_string_pretty(&json).unwrap() + "\n",
                    "{} is stale: run `make dashboards`",
                    path.display()
                );
            }
        }
    }

    #[test]
    fn service_targets_name_the_service_and_the_prefix() {
        let d = service("pfx", "Echo");
        assert!(
            d.graphs
                .iter()
                .flat_map(|g| &g.targets)
                .all(|t| t.contains("pfx."))
        );
        assert!(d.graphs[0].targets[0].contains("grpc.server.Echo.*.requests"));
    }
}
