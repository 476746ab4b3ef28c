//! The fleet as the scenarios drive it: `scripts/fleet.sh` for its machines and processes, Consul's HTTP API
//! on the ops machine for what the cluster sees, and the load running on the ops machine.

use std::{
    io::{BufRead, BufReader},
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{Context, bail};

/// The fleet of `scripts/fleet.sh`, from the repository at `root`.
#[derive(Clone, Debug)]
pub struct Fleet {
    root: PathBuf,
    /// `deploy/fleet.toml`'s services, read once (the scenarios poll [`Fleet::passing`] every 250 ms).
    services: std::sync::Arc<std::sync::OnceLock<Vec<FleetService>>>,
}

/// One service of `deploy/fleet.toml`.
#[derive(Clone, Debug)]
pub struct FleetService {
    /// Its name.
    pub name: String,
    /// Its instances.
    pub instances: usize,
    /// Whether it has a database.
    pub database: bool,
}

impl Fleet {
    /// The fleet of the repository at `root`.
    pub fn new(root: PathBuf) -> Self {
        Self {
            root,
            services: Default::default(),
        }
    }

    /// Runs `scripts/fleet.sh args…`; its stdout.
    ///
    /// # Errors
    /// The script fails (its stderr in the message).
    pub fn script(&self, args: &[&str]) -> anyhow::Result<String> {
        let out = Command::new(self.root.join("scripts/fleet.sh"))
            .args(args)
            .output()
            .context("scripts/fleet.sh")?;
        if !out.status.success() {
            bail!(
                "scripts/fleet.sh {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    }

    /// The services of `deploy/fleet.toml` (read on first use).
    pub fn services(&self) -> anyhow::Result<Vec<FleetService>> {
        if let Some(known) = self.services.get() {
            return Ok(known.clone());
        }
        let read = self
            .script(&["list"])?
            .lines()
            .map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                Ok(FleetService {
                    name: f.first().context("name")?.to_string(),
                    instances: f.get(2).context("instances")?.parse()?,
                    database: f.get(3) == Some(&"yes"),
                })
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        Ok(self.services.get_or_init(|| read).clone())
    }

    /// The machine running instance `n` (1-based) of `service`.
    pub fn machine(&self, service: &str, n: usize) -> anyhow::Result<String> {
        self.script(&["where", service, &n.to_string()])
    }

    /// The PID of process `name` (`consul`, `kafka`, `<service>-<n>`) on `machine`.
    pub fn pid(&self, machine: &str, name: &str) -> anyhow::Result<u32> {
        Ok(self.script(&["pid", machine, name])?.parse()?)
    }

    /// (Re)starts instance `n` of `service`.
    pub fn start(&self, service: &str, n: usize) -> anyhow::Result<()> {
        self.script(&["start", service, &n.to_string()]).map(drop)
    }

    /// (Re)starts the Consul agent of `machine`.
    pub fn start_agent(&self, machine: &str) -> anyhow::Result<()> {
        self.script(&["start-agent", machine]).map(drop)
    }

    /// Connects (`true`) or cuts `machine`'s network link.
    pub fn link(&self, machine: &str, up: bool) -> anyhow::Result<()> {
        self.script(&["link", machine, if up { "up" } else { "down" }])
            .map(drop)
    }

    /// Stops (`false`) or starts PostgreSQL.
    pub fn postgres(&self, up: bool) -> anyhow::Result<()> {
        self.script(&[if up { "pg-start" } else { "pg-stop" }])
            .map(drop)
    }

    /// SIGKILLs Kafka broker `n` (a crash).
    pub fn kill_broker(&self, n: usize) -> anyhow::Result<()> {
        signal(self.pid(&format!("server-{n}"), "kafka")?, "KILL")
    }

    /// Starts Kafka brokers `brokers` together (one alone cannot reach a controller quorum) and waits for them.
    pub fn start_brokers(&self, brokers: &[usize]) -> anyhow::Result<()> {
        let mut args = vec!["kafka-start".to_owned()];
        args.extend(brokers.iter().map(usize::to_string));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        self.script(&args).map(drop)
    }

    /// GET `path` of the Consul HTTP API, asked of the ops machine's agent.
    pub fn consul(&self, path: &str) -> anyhow::Result<serde_json::Value> {
        let url = format!("http://127.0.0.1:8500{path}");
        let body = self.script(&["exec", "ops", "curl", "-sf", "--max-time", "5", &url])?;
        Ok(serde_json::from_str(&body)?)
    }

    /// The largest value of graphite `target` over the last 10 minutes (graphite-web on the ops machine);
    /// `None` when it has no data.
    pub fn graphite_max(&self, target: &str) -> Option<f64> {
        let url = format!("http://127.0.0.1:18080/render?format=json&from=-10min&target={target}");
        let body = self
            .script(&["exec", "ops", "curl", "-sf", "--max-time", "10", &url])
            .ok()?;
        let v: serde_json::Value = serde_json::from_str(&body).ok()?;
        v.as_array()?
            .iter()
            .flat_map(|s| s["datapoints"].as_array().into_iter().flatten())
            .filter_map(|p| p[0].as_f64())
            .reduce(f64::max)
    }

    /// The record timestamps (unix ms) of topic `topic` from `from_ms` on, read with kcat on the ops machine.
    ///
    /// # Errors
    /// kcat fails.
    pub fn topic_timestamps(&self, topic: &str, from_ms: u64) -> anyhow::Result<Vec<u64>> {
        let brokers =
            "kafka-1.keel.internal:9092,kafka-2.keel.internal:9092,kafka-3.keel.internal:9092";
        let out = self.script(&[
            "exec",
            "ops",
            "kcat",
            "-b",
            brokers,
            "-C",
            "-t",
            topic,
            "-o",
            &format!("s@{from_ms}"),
            "-e",
            "-q",
            "-f",
            "%T\\n",
        ])?;
        Ok(out.lines().filter_map(|l| l.trim().parse().ok()).collect())
    }

    /// Passing instances of `service` by machine (Consul's health, as DNS answers it).
    pub fn passing_on(&self, service: &str) -> anyhow::Result<Vec<String>> {
        let v = self.consul(&format!("/v1/health/service/{service}?passing"))?;
        Ok(v.as_array()
            .into_iter()
            .flatten()
            .filter_map(|e| e["Node"]["Node"].as_str().map(str::to_owned))
            .collect())
    }

    /// Passing instances of the fleet's services, in all: those whose every check passes, their machine's
    /// included (one question to Consul: `/v1/health/state/any`).
    pub fn passing(&self) -> anyhow::Result<usize> {
        let names: Vec<String> = self.services()?.into_iter().map(|s| s.name).collect();
        let checks = self.consul("/v1/health/state/any")?;
        let checks = checks.as_array().context("checks")?;
        let node_ok = |node: &str| {
            checks.iter().all(|c| {
                c["Node"] != node
                    || !c["ServiceID"].as_str().is_some_and(str::is_empty)
                    || c["Status"] == "passing"
            })
        };
        let mut instances: std::collections::HashMap<&str, bool> = Default::default();
        for c in checks {
            let (Some(svc), Some(id), Some(node)) = (
                c["ServiceName"].as_str(),
                c["ServiceID"].as_str(),
                c["Node"].as_str(),
            ) else {
                continue;
            };
            if !names.iter().any(|n| n == svc) {
                continue;
            }
            let ok = c["Status"] == "passing" && node_ok(node);
            *instances.entry(id).or_insert(true) &= ok;
        }
        Ok(instances.values().filter(|ok| **ok).count())
    }

    /// Waits until `count` instances pass (at most `limit`); the time it took.
    ///
    /// # Errors
    /// They do not in time.
    pub fn wait_passing(&self, count: usize, limit: Duration) -> anyhow::Result<Duration> {
        let start = Instant::now();
        loop {
            if self.passing().unwrap_or(0) >= count {
                return Ok(start.elapsed());
            }
            if start.elapsed() > limit {
                bail!("fewer than {count} instances pass after {limit:?}");
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// Starts the load on the ops machine at `rate` calls per second and waits until it is ready.
    ///
    /// # Errors
    /// It cannot start, or is not ready within two minutes.
    pub fn load(&self, rate: u32) -> anyhow::Result<Load> {
        let token = self.script(&["secret", "KEEL_FLEET_ADMIN_TOKEN"])?;
        let bin = std::env::current_exe()?;
        let mut child = Command::new(self.root.join("scripts/fleet.sh"))
            .args(["exec", "ops", "env", "-i", "PATH=/usr/bin:/bin"])
            .args([
                "CONSUL_HTTP_ADDR=127.0.0.1:8500",
                "KEEL_CONSUL__DNS_ADDR=127.0.0.1:8600",
                "KEEL_CONSUL__DISCOVERY_INTERVAL=2s",
                "KEEL_CLIENT__DEFAULT_TIMEOUT=2s",
                &format!("KEEL_FLEET_ADMIN_TOKEN={token}"),
            ])
            .arg(bin)
            .args(["load", "--rate", &rate.to_string()])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("starting the load")?;
        let lines = Arc::new(Mutex::new(String::new()));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let stdout = child.stdout.take().context("stdout")?;
        let sink = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if line.contains("\"ready\"") {
                    let _ = ready_tx.send(());
                }
                let mut all = sink.lock().expect("lines");
                all.push_str(&line);
                all.push('\n');
            }
        });
        if ready_rx.recv_timeout(Duration::from_secs(150)).is_err() {
            let _ = child.kill();
            bail!("the load was not ready in time");
        }
        Ok(Load { child, lines })
    }
}

/// The load, running.
pub struct Load {
    child: Child,
    lines: Arc<Mutex<String>>,
}

impl Load {
    /// Stops it (SIGTERM: in-flight calls end) and returns what it printed.
    ///
    /// # Errors
    /// It does not end within 30 s.
    pub fn stop(mut self) -> anyhow::Result<String> {
        signal(self.child.id(), "TERM")?;
        let start = Instant::now();
        while self.child.try_wait()?.is_none() {
            if start.elapsed() > Duration::from_secs(30) {
                let _ = self.child.kill();
                bail!("the load did not stop");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        std::thread::sleep(Duration::from_millis(200));
        let lines = self.lines.lock().expect("lines").clone();
        // Every outcome, kept for a closer look when asked (`KEEL_CHAOS_OUTCOMES=<file>`, appended).
        if let Some(path) = std::env::var_os("KEEL_CHAOS_OUTCOMES") {
            use std::io::Write;
            let mut f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)?;
            f.write_all(lines.as_bytes())?;
        }
        Ok(lines)
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Sends signal `sig` (`TERM`, `KILL`) to `pid`.
///
/// # Errors
/// `kill` fails.
pub fn signal(pid: u32, sig: &str) -> anyhow::Result<()> {
    let ok = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status()?
        .success();
    if !ok {
        bail!("kill -{sig} {pid} failed");
    }
    Ok(())
}

/// Whether process `pid` runs.
pub fn alive(pid: u32) -> bool {
    Command::new("kill")
        .args(["-0", &pid.to_string()])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Waits until process `pid` has exited (at most `limit`).
///
/// # Errors
/// It still runs after `limit`.
pub fn wait_exit(pid: u32, limit: Duration) -> anyhow::Result<Duration> {
    let start = Instant::now();
    while alive(pid) {
        if start.elapsed() > limit {
            bail!("process {pid} still runs after {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(start.elapsed())
}
