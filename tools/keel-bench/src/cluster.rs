//! The `make up` row of `make bench`: KillrVideo's GetVideo on the local cluster (`scripts/cluster.sh`: every
//! service as its own release process, two instances each, registered in Consul, each with its PostgreSQL
//! database, logs to Kafka and metrics to StatsD), called as a peer service calls it: through the platform's
//! client channel, which finds the instances through Consul DNS and balances between them (p2c). The load runs
//! in this process at the run's concurrency; beside it, pgbench running GetVideo's query on video-catalog's
//! database, target ≥ 0.5×.
//!
//! A cluster already running (`make up`) is used as it is and left running; otherwise this starts one and
//! stops it after.

use std::{path::Path, process::Command, time::Duration};

use anyhow::{Context, bail};
use backon::{ConstantBuilder, Retryable};
use keel_common::{ClientFactory, Metrics, Settings, config::Env};
use keel_protos::killrvideo::{
    common::Uuid as PbUuid,
    video_catalog::{
        GetVideoRequest, SubmitYouTubeVideoRequest,
        video_catalog_service_client::VideoCatalogServiceClient,
    },
};

use crate::{
    Row, baseline,
    load::{Shape, in_process, pgbench},
};

/// The cluster of `scripts/cluster.sh`, stopped on drop if this started it.
struct Cluster {
    script: std::path::PathBuf,
    started: bool,
}

impl Cluster {
    fn up(root: &Path) -> anyhow::Result<Self> {
        let script = root.join("scripts/cluster.sh");
        let status = Command::new(&script).arg("status").output()?;
        let running = String::from_utf8_lossy(&status.stdout)
            .lines()
            .any(|l| l.starts_with("video-catalog-1 ") && l.contains("up (pid"));
        if !running {
            let out = Command::new(&script)
                .arg("start")
                .env(
                    "KEEL_BIN_DIR",
                    crate::procs::sibling("video-catalog")?.with_file_name(""),
                )
                .output()
                .context("scripts/cluster.sh start")?;
            if !out.status.success() {
                bail!(
                    "scripts/cluster.sh start: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
        }
        Ok(Self {
            script,
            started: !running,
        })
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if self.started {
            let _ = Command::new(&self.script).arg("stop").output();
        }
    }
}

/// `(pgbench's baseline, the cluster's row)`.
///
/// # Errors
/// The cluster does not start or its video-catalog never answers; pgbench fails.
pub async fn rows(root: &Path, dir: &Path, shape: &Shape) -> anyhow::Result<(Row, Row)> {
    let admin = std::env::var("KEEL_DATABASE_URL").context("KEEL_DATABASE_URL")?;
    let _cluster = Cluster::up(root)?;
    let mut env = Env::default();
    for k in ["CONSUL_HTTP_ADDR", "KEEL_CONSUL__DNS_ADDR"] {
        env = env.with(
            k,
            std::env::var(k).with_context(|| format!("{k} is not set"))?,
        );
    }
    let settings = Settings::from_env("keel-bench", &env).map_err(|e| anyhow::anyhow!("{e}"))?;
    let clients = ClientFactory::new(&settings, Metrics::disabled());
    let client = VideoCatalogServiceClient::new(clients.channel("video-catalog")?);
    let video = PbUuid {
        value: uuid::Uuid::new_v4().to_string(),
    };
    // The instances register as they come up: submit once they answer (every 500 ms, for 2 minutes).
    let submit = SubmitYouTubeVideoRequest {
        video_id: Some(video.clone()),
        user_id: Some(PbUuid {
            value: uuid::Uuid::new_v4().to_string(),
        }),
        name: "bench video".into(),
        description: "a video of the benchmark".into(),
        tags: vec!["bench".into()],
        you_tube_video_id: "dQw4w9WgXcQ".into(),
    };
    (|| {
        let (mut client, submit) = (client.clone(), submit.clone());
        async move { client.submit_you_tube_video(submit).await }
    })
    .retry(
        ConstantBuilder::default()
            .with_delay(Duration::from_millis(500))
            .with_max_times(240),
    )
    .await
    .map_err(|e| anyhow::anyhow!("video-catalog of the cluster does not answer: {e}"))?;
    // Every service process of the cluster, idle (the load has not begun), read once each serves and has
    // settled: the largest is the row's.
    serving(Duration::from_secs(60));
    std::thread::sleep(crate::procs::SETTLE);
    let idle = idle_rss();
    let largest = idle
        .iter()
        .max_by(|a, b| a.1.total_cmp(&b.1))
        .cloned()
        .unwrap_or_default();
    eprintln!(
        "  make up cluster idle RSS, MB: {}",
        idle.iter()
            .map(|(name, mb)| format!("{name} {mb:.1}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let pids = pids("video-catalog");
    let cpu = |pids: &[u32]| {
        pids.iter()
            .map(|p| crate::procs::cpu_seconds_of(*p))
            .sum::<f64>()
    };
    let before = cpu(&pids);
    let request = GetVideoRequest {
        video_id: Some(video.clone()),
    };
    let (measured, _) = in_process(shape.concurrency, shape.duration, move |_| {
        let (mut client, request) = (client.clone(), request.clone());
        async move {
            client.get_video(request).await?;
            Ok(())
        }
    })
    .await?;
    let used = cpu(&pids) - before;
    eprintln!("  make up cluster GetVideo: {:.0} calls/s", measured.rate);
    // Both runs of `in_process` (warm-up and measure) used the CPU: count its calls at the measured rate.
    let calls = measured.rate * (shape.duration.as_secs_f64() + 1.0);
    let peak = pids
        .iter()
        .map(|p| crate::procs::rss_mb_of(*p).1)
        .fold(0.0, f64::max);
    let ours = Row {
        name: format!(
            "KillrVideo GetVideo, `make up` cluster ({} instances via Consul DNS, PostgreSQL; idle RSS: the \
             largest of its {} processes, {})",
            pids.len(),
            idle.len(),
            largest.0
        ),
        cpu_per_1k: (calls > 0.0).then(|| used * 1000.0 / calls),
        measured,
        against: None,
        beside: None,
        rss: Some((largest.1, peak)),
    };
    let db = format!(
        "{}/kv_video_catalog",
        admin.rsplit_once('/').map_or(admin.as_str(), |(b, _)| b)
    );
    let base = baseline(
        "pgbench: GetVideo's query (baseline)",
        pgbench(
            &db,
            &format!(
                "SELECT videoid, userid, name, description, location, location_type, preview_image_location, \
                 tags, added_ms FROM videos WHERE videoid = '{}';\n",
                video.value
            ),
            dir,
            shape,
        )?,
    );
    Ok((base, ours))
}

/// The cluster's run directory (`scripts/cluster.sh`): `<service>-<n>.pid` and `.log` per instance.
fn run_dir() -> std::path::PathBuf {
    std::env::var("KEEL_RUN_DIR").map_or_else(
        |_| Path::new("/var/tmp/keel").join("cluster"),
        |d| Path::new(&d).join("cluster"),
    )
}

/// One instance of the cluster: its name (`video-catalog-1`), its pid, and its log file.
struct Instance {
    name: String,
    pid: Option<u32>,
    log: std::path::PathBuf,
}

/// Every instance in the cluster's run directory (a `.pid` file each), in name order.
fn instances() -> Vec<Instance> {
    let run = run_dir();
    let mut out: Vec<Instance> = std::fs::read_dir(&run)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e
                .file_name()
                .to_string_lossy()
                .strip_suffix(".pid")?
                .to_owned();
            let pid = std::fs::read_to_string(e.path())
                .ok()
                .and_then(|p| p.trim().parse().ok());
            let log = run.join(format!("{name}.log"));
            Some(Instance { name, pid, log })
        })
        .collect();
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

/// Waits, at most `limit`, until every instance of the cluster has logged that it serves (`health SERVING`);
/// those that never did are printed with their log's last line.
fn serving(limit: Duration) {
    let start = std::time::Instant::now();
    let not_serving = || -> Vec<(String, String)> {
        instances()
            .into_iter()
            .filter_map(|i| {
                let log = std::fs::read_to_string(&i.log).unwrap_or_default();
                (!log.contains(r#""message":"health SERVING""#))
                    .then(|| (i.name, log.lines().last().unwrap_or_default().to_owned()))
            })
            .collect()
    };
    loop {
        let left = not_serving();
        if left.is_empty() {
            return;
        }
        if start.elapsed() >= limit {
            for (name, last) in left {
                eprintln!("  WARNING: {name} of the cluster does not serve; its log ends: {last}");
            }
            return;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// Resident memory now of every running instance of the cluster, MB, by instance (`video-catalog-1`), in
/// name order.
fn idle_rss() -> Vec<(String, f64)> {
    instances()
        .into_iter()
        .filter_map(|i| {
            let (rss, _) = crate::procs::rss_mb_of(i.pid?);
            (rss > 0.0).then_some((i.name, rss))
        })
        .collect()
}

/// The pids of `service`'s instances in the cluster (`<service>-<n>`).
fn pids(service: &str) -> Vec<u32> {
    instances()
        .into_iter()
        .filter(|i| {
            i.name
                .strip_prefix(service)
                .and_then(|n| n.strip_prefix('-'))
                .is_some_and(|n| n.parse::<u32>().is_ok())
        })
        .filter_map(|i| i.pid)
        .collect()
}
