//! `keel`: the operator's command. `keel health` shows the fleet's state (exit code for cron); `keel
//! dashboards` writes the Graphite and Grafana dashboards of every service (generated from the protos) and
//! loads them into graphite-web.

mod dashboards;
mod health;

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
    /// Every service instance's Consul health and whether Consul, Kafka, PostgreSQL and graphite-web answer;
    /// exit code 1 when something is critical (for cron).
    ///
    /// Example: eval "$(scripts/infra.sh env)"; keel health --service echo
    Health(health::Args),
    /// Writes one dashboard per gRPC service (golden signals per RPC), a fleet overview and the platform's
    /// health, as graphite-web and Grafana JSON, and loads them into graphite-web.
    ///
    /// Example: keel dashboards --out deploy/dashboards --load http://127.0.0.1:18080
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
async fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Cmd::Health(args) => {
            if !health::run(&args).await? {
                std::process::exit(1);
            }
            Ok(())
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
            Ok(())
        }
    }
}
