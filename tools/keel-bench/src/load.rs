//! The load generators: ghz (the gRPC ecosystem's, <https://ghz.sh>) for the services and their bare baselines,
//! pgbench for what the database itself serves of a service's query, and [`in_process`] for what pgbench
//! cannot run (SQLite, the platform's pool).

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Command,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, bail};

/// How a load is shaped: the same for every row of a run.
#[derive(Clone, Debug)]
pub struct Shape {
    /// Calls (or pgbench clients) in flight at once.
    pub concurrency: usize,
    /// gRPC connections the calls share.
    pub connections: usize,
    /// How long a row is measured (after a 1 s warm-up).
    pub duration: Duration,
}

/// What a load measured.
#[derive(Clone, Debug, Default)]
pub struct Measured {
    /// Calls (transactions) completed.
    pub calls: u64,
    /// Calls that failed.
    pub errors: u64,
    /// Calls per second.
    pub rate: f64,
    /// Latency percentiles in microseconds: p50, p99, p99.9 (none for pgbench).
    pub latency_us: Option<[f64; 3]>,
}

/// ghz, from `KEEL_GHZ`, else the copy `scripts/infra.sh install tools` builds under the cache.
pub fn ghz_path() -> anyhow::Result<PathBuf> {
    let path = std::env::var_os("KEEL_GHZ")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let cache = std::env::var_os("KEEL_CACHE")
                .map(PathBuf::from)
                .unwrap_or_else(|| {
                    PathBuf::from(std::env::var("HOME").unwrap_or_default()).join(".cache/keel")
                });
            cache.join("bin/ghz")
        });
    if !path.exists() {
        bail!(
            "ghz not found at {}: run `make infra-install` (or set KEEL_GHZ)",
            path.display()
        );
    }
    Ok(path)
}

/// Calls `method` (`package.Service/Method`) at `addr` with request `data` (JSON; ghz templates such as
/// `{{.RequestNumber}}` allowed) under `shape`, after a 1 s warm-up; message types from `protoset`.
///
/// # Errors
/// ghz fails or prints no report.
pub fn ghz(
    ghz: &Path,
    protoset: &Path,
    addr: SocketAddr,
    method: &str,
    data: &str,
    metadata: Option<&str>,
    shape: &Shape,
) -> anyhow::Result<Measured> {
    let run = |duration: Duration| -> anyhow::Result<serde_json::Value> {
        let mut cmd = Command::new(ghz);
        cmd.arg("--insecure")
            .arg("--protoset")
            .arg(protoset)
            .arg("--call")
            .arg(method)
            .arg("-d")
            .arg(data)
            .arg("-c")
            .arg(shape.concurrency.to_string())
            .arg("--connections")
            .arg(shape.connections.to_string())
            .arg("-z")
            .arg(format!("{}ms", duration.as_millis()))
            .arg("-O")
            .arg("json");
        if let Some(m) = metadata {
            cmd.arg("-m").arg(m);
        }
        let out = cmd.arg(addr.to_string()).output().context("run ghz")?;
        serde_json::from_slice(&out.stdout).with_context(|| {
            format!(
                "ghz printed no report: {}",
                String::from_utf8_lossy(&out.stderr)
            )
        })
    };
    run(Duration::from_secs(1))?;
    let report = run(shape.duration)?;
    let ok = report["statusCodeDistribution"]["OK"].as_u64().unwrap_or(0);
    // Calls in flight when the time is up fail on ghz's own side as it closes its connections: not the
    // server's errors.
    let failures: Vec<(&String, u64)> = report["errorDistribution"]
        .as_object()
        .map(|e| {
            e.iter()
                .filter(|(why, _)| !why.contains("use of closed network connection"))
                .filter_map(|(why, n)| Some((why, n.as_u64()?)))
                .collect()
        })
        .unwrap_or_default();
    // What failed, beside the table (the errors column counts them).
    for (why, n) in &failures {
        eprintln!("    {n} failed: {why}");
    }
    let errors: u64 = failures.iter().map(|(_, n)| n).sum();
    let mut latencies: Vec<f64> = report["details"]
        .as_array()
        .map(|d| d.iter().filter_map(|x| x["latency"].as_f64()).collect())
        .unwrap_or_default();
    // ghz reports nanoseconds.
    latencies.iter_mut().for_each(|l| *l /= 1000.0);
    Ok(Measured {
        calls: ok + errors,
        errors,
        rate: report["rps"].as_f64().unwrap_or(0.0),
        latency_us: Some(percentiles(latencies)),
    })
}

/// p50, p99 and p99.9 of `latencies` (nearest rank; zeros when empty).
fn percentiles(mut latencies: Vec<f64>) -> [f64; 3] {
    latencies.sort_by(f64::total_cmp);
    [0.50, 0.99, 0.999].map(|p| {
        let i = ((latencies.len() as f64 * p).ceil() as usize).clamp(1, latencies.len().max(1)) - 1;
        latencies.get(i).copied().unwrap_or(0.0)
    })
}

/// pgbench running `script` (one transaction) against `url` with `shape.concurrency` clients on 2 threads,
/// prepared statements (the database's best), for `shape.duration`.
///
/// # Errors
/// pgbench fails or prints no rate.
pub fn pgbench(url: &str, script: &str, dir: &Path, shape: &Shape) -> anyhow::Result<Measured> {
    let file = dir.join(format!("pgbench-{}.sql", uuid::Uuid::new_v4().simple()));
    std::fs::write(&file, script)?;
    let out = Command::new("pgbench")
        .args(["-n", "-M", "prepared", "-j", "2"])
        .arg("-c")
        .arg(shape.concurrency.to_string())
        .arg("-T")
        .arg(shape.duration.as_secs().max(1).to_string())
        .arg("-f")
        .arg(&file)
        .arg(url)
        .output()
        .context("run pgbench (Debian postgresql-client)")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let field = |prefix: &str| {
        text.lines()
            .find_map(|l| l.trim().strip_prefix(prefix))
            .and_then(|r| r.split_whitespace().next()?.parse::<f64>().ok())
    };
    let rate = field("tps = ").with_context(|| {
        format!(
            "pgbench printed no tps: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        )
    })?;
    Ok(Measured {
        calls: field("number of transactions actually processed: ").unwrap_or(0.0) as u64,
        errors: field("number of failed transactions: ").unwrap_or(0.0) as u64,
        rate,
        latency_us: None,
    })
}

/// Runs `work(n)` (`n` counts up across tasks from 0) from `concurrency` tasks of this process for 1 s, then
/// `duration`: what the second run measured (latency percentiles from every call), and this process's CPU µs
/// per call. An error of `work` ends the run.
///
/// # Errors
/// The first error `work` returns.
pub async fn in_process<F, Fut>(
    concurrency: usize,
    duration: Duration,
    work: F,
) -> anyhow::Result<(Measured, f64)>
where
    F: Fn(u64) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = anyhow::Result<()>> + Send,
{
    let seq = Arc::new(AtomicU64::new(0));
    let mut result = (Measured::default(), 0.0);
    for length in [Duration::from_secs(1), duration] {
        let (started, cpu) = (
            Instant::now(),
            crate::procs::cpu_seconds_of(std::process::id()),
        );
        let until = started + length;
        let tasks: Vec<_> = (0..concurrency)
            .map(|_| {
                let (work, seq) = (work.clone(), seq.clone());
                tokio::spawn(async move {
                    let mut latencies = Vec::new();
                    while Instant::now() < until {
                        let t = Instant::now();
                        work(seq.fetch_add(1, Ordering::Relaxed)).await?;
                        latencies.push(t.elapsed().as_secs_f64() * 1e6);
                    }
                    anyhow::Ok(latencies)
                })
            })
            .collect();
        let mut latencies = Vec::new();
        for t in tasks {
            latencies.extend(t.await??);
        }
        let cpu = crate::procs::cpu_seconds_of(std::process::id()) - cpu;
        let n = latencies.len() as u64;
        result = (
            Measured {
                calls: n,
                errors: 0,
                rate: n as f64 / started.elapsed().as_secs_f64(),
                latency_us: Some(percentiles(latencies)),
            },
            cpu * 1e6 / n.max(1) as f64,
        );
    }
    Ok(result)
}
