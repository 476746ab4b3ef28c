//! Server processes of a benchmark: release binaries beside this one, started with a clean environment, and
//! what the kernel says they cost (`/proc/<pid>/stat` CPU time, `/proc/<pid>/status` resident memory).

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, bail};

/// A server process; killed on drop.
pub struct Proc {
    child: Child,
    /// Where it listens.
    pub addr: SocketAddr,
}

/// A binary of the same build as this one (`target/release/<name>` when run by `make bench`).
pub fn sibling(name: &str) -> anyhow::Result<PathBuf> {
    let path = std::env::current_exe()?
        .parent()
        .context("no directory")?
        .join(name);
    if !path.exists() {
        bail!(
            "{} is missing: `make bench` builds it (cargo build --release --bins)",
            path.display()
        );
    }
    Ok(path)
}

impl Proc {
    /// Starts `binary` with only PATH and `env`, its output in `dir/<label>.log`, and waits (20 s at most) for
    /// the address it logs: the platform's `grpc server listening` JSON line, or a bare server's
    /// `listening <addr>`.
    ///
    /// # Errors
    /// It does not start, or logs no address in time.
    pub fn start(
        binary: &Path,
        args: &[&str],
        env: &[(&str, String)],
        dir: &Path,
        label: &str,
    ) -> anyhow::Result<Self> {
        let log = dir.join(format!("{label}.log"));
        let file = std::fs::File::create(&log)?;
        let child = Command::new(binary)
            .args(args)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file)
            .spawn()
            .with_context(|| format!("start {}", binary.display()))?;
        let start = Instant::now();
        loop {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            if let Some(addr) = text.lines().find_map(listening_addr) {
                return Ok(Self { child, addr });
            }
            if start.elapsed() > Duration::from_secs(20) {
                bail!(
                    "{label} logged no listening address in 20 s; see {}",
                    log.display()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// CPU seconds (user + system) it used so far.
    pub fn cpu_seconds(&self) -> f64 {
        cpu_seconds_of(self.child.id())
    }

    /// Resident memory now (`VmRSS`) and at its peak (`VmHWM`), in MB (10⁶ bytes, the unit of the issue's
    /// target).
    pub fn rss_mb(&self) -> (f64, f64) {
        rss_mb_of(self.child.id())
    }

    /// Resident memory once idle, MB: read [`SETTLE`] after the call, so that what a service does in its first
    /// seconds (connecting to Kafka and StatsD, the first flush of its metrics) is counted.
    pub fn idle_rss_mb(&self) -> f64 {
        std::thread::sleep(SETTLE);
        self.rss_mb().0
    }
}

/// How long a process is left to settle before its idle memory is read.
pub const SETTLE: Duration = Duration::from_secs(3);

/// `(VmRSS, VmHWM)` of process `pid` in MB (10⁶ bytes); zeros when it is gone.
pub fn rss_mb_of(pid: u32) -> (f64, f64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let kib = |key: &str| {
        status
            .lines()
            .find_map(|l| {
                l.strip_prefix(key)?
                    .trim()
                    .strip_suffix("kB")?
                    .trim()
                    .parse::<f64>()
                    .ok()
            })
            .unwrap_or(0.0)
    };
    (kib("VmRSS:") * 1024.0 / 1e6, kib("VmHWM:") * 1024.0 / 1e6)
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn listening_addr(line: &str) -> Option<SocketAddr> {
    if let Some(rest) = line.strip_prefix("listening ") {
        return rest.trim().parse().ok();
    }
    let v: serde_json::Value = serde_json::from_str(line).ok()?;
    (v["message"] == "grpc server listening")
        .then(|| v["fields"]["addr"].as_str()?.parse().ok())
        .flatten()
}

/// CPU seconds (user + system) process `pid` used so far (`/proc/<pid>/stat`).
pub fn cpu_seconds_of(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces): state is field 3, utime 14, stime 15.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (ticks(11) + ticks(12)) / clock_ticks()
}

/// The kernel's clock ticks per second (`getconf CLK_TCK`, 100 when it cannot be asked).
fn clock_ticks() -> f64 {
    static TICKS: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
            .unwrap_or(100.0)
    })
}

/// CPU time of this process's threads alive now, in nanoseconds, from each one's `/proc/self/task/*/schedstat`
/// (the scheduler's own count, to the nanosecond; `/proc/<pid>/stat` counts in 10 ms ticks). Threads that have
/// exited are not counted: measure before the threads of a measurement end.
pub fn cpu_ns_of_threads() -> u64 {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return 0;
    };
    tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listening_lines_of_the_platform_and_of_bare_servers() {
        let platform = r#"{"message":"grpc server listening","fields":{"addr":"127.0.0.1:5000"}}"#;
        assert_eq!(
            listening_addr(platform),
            Some(([127, 0, 0, 1], 5000).into())
        );
        assert_eq!(
            listening_addr("listening 127.0.0.1:7"),
            Some(([127, 0, 0, 1], 7).into())
        );
        assert_eq!(listening_addr(r#"{"message":"other"}"#), None);
    }
}
