//! `keel-chaos`: faults under a steady load of real calls on the local fleet (`make fleet-up`: machines as
//! network namespaces, `scripts/fleet.sh`), each figure printed beside its target (issue 13).
//!
//! ```sh
//! make fleet-up && make chaos                    # every scenario, full length, then the table
//! target/debug/keel-chaos run --short rolling    # one scenario, shortened (what the tests run)
//! ```
//!
//! `load` is the load generator itself: it runs on the fleet's ops machine (`scripts/fleet.sh exec ops …`),
//! finds every service through that machine's Consul DNS like any client, and prints one JSON line per call.

mod fleet;
mod load;
mod scenarios;

use clap::Parser;

#[derive(Parser, Debug)]
#[command(version, about)]
enum Cmd {
    /// Runs scenarios against the fleet and prints the table of figures (exit 1 when a target is missed).
    Run(scenarios::Args),
    /// The load generator (run on a fleet machine): one JSON line per call on stdout until SIGINT/SIGTERM.
    Load(load::Args),
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Cmd::parse() {
        Cmd::Run(args) => {
            let figures = scenarios::run(&args).await?;
            scenarios::print(&figures);
            if figures.iter().any(|f| !f.met) {
                std::process::exit(1);
            }
            Ok(())
        }
        Cmd::Load(args) => load::run(args).await,
    }
}
