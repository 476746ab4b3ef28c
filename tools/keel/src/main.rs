//! `keel`: the operator's command, with verbs modelled on `linkerd viz`, `micro` and `consul catalog`:
//! `services`, `stat`, `call`, `logs`, `tap`, `health`, and `dashboards` (Graphite and Grafana dashboards
//! generated from the protos). Every verb takes `--help` with an example; tables for people, `--json` for scripts.

mod call;
mod consul;
mod dashboards;
mod deploy;
mod graphite;
mod health;
mod logs;
mod output;
mod services;
mod stat;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(name = "keel", about = "Operate a keel fleet", version)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Every service in Consul: instances passing/total, versions, and calls/s and error ratio from Graphite.
    Services(services::Args),
    /// Per RPC of one service: calls/s, success rate, status codes, latency p50/p90/p99 from Graphite.
    Stat(stat::Args),
    /// Calls a method of a service found through Consul DNS, its types learnt through server reflection.
    Call(call::Args),
    /// A service's log lines from its Kafka topic (or one request's lines across every service).
    Logs(logs::LogsArgs),
    /// Live stream of the calls a service serves, from its call log.
    Tap(logs::TapArgs),
    /// Every service instance's Consul health, whether Consul, Kafka, PostgreSQL and graphite-web answer,
    /// outbox backlogs and dropped telemetry; exit code 1 when something is critical (for cron).
    Health(health::Args),
    /// Renders deploy/fleet.toml into the systemd units and environment files, Kubernetes manifests, Consul
    /// agent configurations and Kafka broker properties beside it.
    #[command(after_help = "Example: keel deploy --dir deploy")]
    Deploy {
        /// The directory holding fleet.toml.
        #[arg(long, default_value = "deploy")]
        dir: PathBuf,
    },
    /// Writes one dashboard per gRPC service (golden signals per RPC), a fleet overview and the platform's
    /// health, as graphite-web and Grafana JSON, and loads them into graphite-web.
    #[command(
        after_help = "Example: keel dashboards --out deploy/dashboards --load http://127.0.0.1:18080"
    )]
    Dashboards {
        /// `statsd.prefix` of the services.
        #[arg(long, default_value = "keel")]
        prefix: String,
        /// Directory to write `graphite/*.json` and `grafana/*.json` into.
        #[arg(long)]
        out: Option<PathBuf>,
        /// graphite-web to save the dashboards into (its dashboard API).
        #[arg(long, env = "KEEL_GRAPHITE_URL")]
        load: Option<String>,
        /// How far back the loaded dashboards show by default (`30minutes`, `2hours`, `1days`).
        #[arg(long, default_value = "30minutes")]
        last: dashboards::Range,
    },
}

#[tokio::main]
async fn main() {
    let code = match run(Cli::parse().command).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("keel: {e:#}");
            2
        }
    };
    std::process::exit(code);
}

/// Runs one verb; returns the exit code (0 fine, 1 something critical or a failed call).
async fn run(cmd: Cmd) -> anyhow::Result<i32> {
    match cmd {
        Cmd::Services(args) => services::run(&args).await.map(|()| 0),
        Cmd::Stat(args) => stat::run(&args).await.map(|()| 0),
        Cmd::Call(args) => call::run(&args).await,
        Cmd::Logs(args) => blocking(move || logs::logs(args)).await,
        Cmd::Tap(args) => blocking(move || logs::tap(args)).await,
        Cmd::Health(args) => Ok(if health::run(&args).await? { 0 } else { 1 }),
        Cmd::Deploy { dir } => {
            let n = deploy::write(&dir)?;
            println!("wrote {n} files under {}", dir.display());
            Ok(0)
        }
        Cmd::Dashboards {
            prefix,
            out,
            load,
            last,
        } => {
            let boards = dashboards::generate(&prefix)?;
            if let Some(dir) = &out {
                dashboards::write(&boards, dir)?;
                println!("wrote {} dashboards to {}", boards.len(), dir.display());
            }
            if let Some(url) = &load {
                dashboards::load(&boards, url, &last).await?;
                println!("loaded {} dashboards into {url}/dashboard/", boards.len());
            }
            if out.is_none() && load.is_none() {
                for b in &boards {
                    println!("{}", b.name);
                }
            }
            Ok(0)
        }
    }
}

/// Runs a Kafka reader (blocking polls) off the runtime's threads.
async fn blocking(f: impl FnOnce() -> anyhow::Result<()> + Send + 'static) -> anyhow::Result<i32> {
    tokio::task::spawn_blocking(f).await??;
    Ok(0)
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    #[test]
    fn every_verb_parses_and_has_an_example() {
        super::Cli::command().debug_assert();
        for verb in super::Cli::command().get_subcommands() {
            let help = verb
                .get_after_help()
                .map(ToString::to_string)
                .unwrap_or_default();
            assert!(help.contains("keel "), "{} has no example", verb.get_name());
        }
    }
}
