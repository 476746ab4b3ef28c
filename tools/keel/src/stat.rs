//! `keel stat SERVICE`: per RPC, what the service served over a window (`linkerd viz stat`'s columns): requests
//! per second, success rate (share of calls answered OK, as the dashboards count errors), the status codes of
//! the others, and latency p50/p90/p99 from Graphite.
//!
//! Latency over the window is the count-weighted mean of StatsD's per-second percentiles (`upper_<pct>`): StatsD
//! keeps no histogram, so a true percentile over the window cannot be had from Graphite. Timers are whole
//! milliseconds (a sub-millisecond call shows 0).

use std::{collections::BTreeMap, time::Duration};

use serde_json::{Value, json};

use crate::{
    graphite::{Graphite, Series, segment},
    output,
};

/// `keel stat` options.
#[derive(clap::Args, Debug)]
#[command(after_help = "Example: keel stat echo --window 5m")]
pub struct Args {
    /// The service (its Consul name, which is also its metrics name).
    pub service: String,
    /// How far back to look (`30s`, `5m`, `1h`).
    #[arg(long, default_value = "1m", value_parser = humantime::parse_duration)]
    pub window: Duration,
    /// `statsd.prefix` of the services.
    #[arg(long, default_value = "keel")]
    pub prefix: String,
    /// graphite-web's base URL.
    #[arg(
        long,
        env = "KEEL_GRAPHITE_URL",
        default_value = "http://127.0.0.1:8080"
    )]
    pub graphite: String,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// What one RPC served over the window.
#[derive(Debug, Default, PartialEq)]
pub struct RpcStat {
    /// Calls answered.
    pub requests: f64,
    /// Calls answered OK.
    pub ok: f64,
    /// Calls per status code other than OK.
    pub errors: BTreeMap<String, f64>,
    /// `(pct, ms)` for 50, 90, 99; `None` when no timer was recorded.
    pub latency: [(u8, Option<f64>); 3],
}

impl RpcStat {
    /// Share of calls answered OK, 0–1; `None` without calls.
    pub fn success_rate(&self) -> Option<f64> {
        (self.requests > 0.0).then(|| self.ok / self.requests)
    }
}

const PERCENTILES: [u8; 3] = [50, 90, 99];

/// Reads the service's series and prints the table (or JSON).
///
/// # Errors
/// graphite-web does not answer (named, with the setting to change).
pub async fn run(args: &Args) -> anyhow::Result<()> {
    let graphite = Graphite::new(&args.graphite)?;
    let base = format!("{}.{}.grpc.server.*.*", args.prefix, segment(&args.service));
    let series = graphite
        .render(
            &[
                format!("stats_counts.{base}.requests"),
                format!("stats_counts.{base}.status.*"),
                format!("stats.timers.{base}.latency.{{count,upper_50,upper_90,upper_99}}"),
            ],
            args.window,
        )
        .await?;
    let stats = per_rpc(&series);
    let secs = args.window.as_secs_f64().max(1.0);
    if args.json {
        let rpcs: Vec<Value> = stats
            .iter()
            .map(|(rpc, s)| {
                json!({
                    "rpc": rpc,
                    "requests": s.requests,
                    "requests_per_second": s.requests / secs,
                    "success_rate": s.success_rate(),
                    "errors": s.errors,
                    "latency_ms": s.latency.iter().map(|(p, v)| (format!("p{p}"), json!(v))).collect::<serde_json::Map<_, _>>(),
                })
            })
            .collect();
        output::json(&json!({"service": args.service, "window_seconds": secs, "rpcs": rpcs}));
        return Ok(());
    }
    if stats.is_empty() {
        println!(
            "no calls of {} in the last {} (metrics under stats_counts.{}.{})",
            args.service,
            humantime::format_duration(args.window),
            args.prefix,
            segment(&args.service)
        );
        return Ok(());
    }
    let mut table = output::table(["RPC", "RPS", "SUCCESS", "ERRORS", "P50", "P90", "P99"]);
    for (rpc, s) in &stats {
        let errors: Vec<String> = s.errors.iter().map(|(c, n)| format!("{c} {n}")).collect();
        let mut row = vec![
            comfy_table::Cell::new(rpc),
            comfy_table::Cell::new(format!("{:.2}", s.requests / secs)),
            output::ratio_cell(s.success_rate()),
            comfy_table::Cell::new(errors.join(", ")),
        ];
        row.extend(
            s.latency.iter().map(|(_, v)| {
                comfy_table::Cell::new(v.map_or("-".into(), |ms| format!("{ms:.0}ms")))
            }),
        );
        table.add_row(row);
    }
    println!("{table}");
    Ok(())
}

/// Folds the raw series into one [`RpcStat`] per `Service/Method`.
pub fn per_rpc(series: &[Series]) -> BTreeMap<String, RpcStat> {
    let mut stats: BTreeMap<String, RpcStat> = BTreeMap::new();
    let mut timers: BTreeMap<String, BTreeMap<String, &Series>> = BTreeMap::new();
    for s in series {
        if s.target.starts_with("stats_counts.") {
            // stats_counts.<prefix>.<process>.grpc.server.<Service>.<Method>.requests | .status.<CODE>
            let rpc = format!("{}/{}", s.node(5), s.node(6));
            let e = stats.entry(rpc).or_default();
            match (s.node(7), s.node(8)) {
                ("requests", _) => e.requests += s.sum(),
                ("status", "OK") => e.ok += s.sum(),
                ("status", code) if s.sum() > 0.0 => {
                    *e.errors.entry(code.to_owned()).or_default() += s.sum();
                }
                _ => {}
            }
        } else if s.target.starts_with("stats.timers.") {
            // stats.timers.<prefix>.<process>.grpc.server.<Service>.<Method>.latency.<stat>
            let rpc = format!("{}/{}", s.node(6), s.node(7));
            timers
                .entry(rpc)
                .or_default()
                .insert(s.node(9).to_owned(), s);
        }
    }
    stats.retain(|_, s| s.requests > 0.0);
    for (rpc, s) in &mut stats {
        let t = timers.get(rpc);
        let count = t.and_then(|t| t.get("count"));
        s.latency = PERCENTILES.map(|p| {
            let upper = t.and_then(|t| t.get(&format!("upper_{p}")));
            (p, weighted_mean(upper.copied(), count.copied()))
        });
    }
    stats
}

/// Σ value·count / Σ count over the steps where both are recorded.
fn weighted_mean(values: Option<&Series>, counts: Option<&Series>) -> Option<f64> {
    let (values, counts) = (values?, counts?);
    let (mut sum, mut weight) = (0.0, 0.0);
    for (v, c) in values.values.iter().zip(&counts.values) {
        if let (Some(v), Some(c)) = (v, c)
            && *c > 0.0
        {
            sum += v * c;
            weight += c;
        }
    }
    (weight > 0.0).then(|| sum / weight)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(target: &str, values: &[Option<f64>]) -> Series {
        Series {
            target: target.into(),
            values: values.to_vec(),
        }
    }

    #[test]
    fn counters_and_timers_fold_into_one_row_per_rpc() {
        let c = "stats_counts.keel.echo.grpc.server.Echo.Echo";
        let t = "stats.timers.keel.echo.grpc.server.Echo.Echo.latency";
        let series = [
            s(&format!("{c}.requests"), &[Some(6.0), None, Some(4.0)]),
            s(&format!("{c}.status.OK"), &[Some(6.0), None, Some(2.0)]),
            s(&format!("{c}.status.INTERNAL"), &[None, None, Some(2.0)]),
            s(&format!("{c}.status.NOT_FOUND"), &[None, None, None]),
            s(&format!("{t}.count"), &[Some(6.0), None, Some(4.0)]),
            s(&format!("{t}.upper_50"), &[Some(1.0), None, Some(6.0)]),
            s(&format!("{t}.upper_99"), &[Some(2.0), Some(50.0), None]),
            s(
                "stats_counts.keel.echo.grpc.server.Echo.Idle.requests",
                &[None],
            ),
        ];
        let stats = per_rpc(&series);
        assert_eq!(stats.len(), 1, "an RPC without calls is left out");
        let e = &stats["Echo/Echo"];
        assert_eq!(e.requests, 10.0);
        assert_eq!(e.success_rate(), Some(0.8));
        assert_eq!(e.errors, BTreeMap::from([("INTERNAL".into(), 2.0)]));
        // (1·6 + 6·4) / 10; p90 never recorded; p99 only where a count is.
        assert_eq!(e.latency[0], (50, Some(3.0)));
        assert_eq!(e.latency[1], (90, None));
        assert_eq!(e.latency[2], (99, Some(2.0)));
    }
}
