//! `geo-loader`: loads Natural Earth's country polygons (npm `world-atlas`, public domain data; fetched by
//! `make infra-install` into `$KEEL_CACHE/world-atlas`) into geo-search through its gRPC API (`AddThing`), so
//! every polygon passes the service's own validation.
//!
//! ```sh
//! eval "$(scripts/infra.sh env)"; cargo run -p geo-loader        # geo-search through Consul DNS
//! cargo run -p geo-loader -- --addr 127.0.0.1:PORT --atlas DIR   # one instance, without Consul
//! ```
//!
//! Re-running creates nothing twice: a country whose exact name geo-search already holds is skipped. Natural
//! Earth's polygons are not all valid for PostGIS at these scales (Russia, Fiji and Antarctica cross
//! themselves at the antimeridian, Sudan's border at 110m): they are sent with `make_valid`, so geo-search
//! stores them as PostGIS repairs them. A country geo-search still refuses (INVALID_ARGUMENT: too many
//! vertices at the finer scales) is counted and reported with the service's reason; the rest load.

mod atlas;

use std::{
    path::PathBuf,
    sync::atomic::{AtomicU64, Ordering},
    time::{Duration, Instant},
};

use clap::Parser;
use futures::{StreamExt, stream};
use keel_common::{
    Channel, ClientFactory, Metrics,
    config::{Env, Settings},
};
use keel_protos::geo::{AddThingRequest, SearchRequest, search_client::SearchClient};
use tonic::{Request, Status};

/// Loads Natural Earth's countries into geo-search.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// The unpacked world-atlas package (holding `countries-110m.json`).
    #[arg(long, env = "KEEL_WORLD_ATLAS")]
    atlas: PathBuf,
    /// Natural Earth's scale: 110m (177 countries, ~10,000 vertices), 50m or 10m (finer; some countries then
    /// pass geo-search's 10,000-vertex limit and are refused).
    #[arg(long, default_value = "110m", value_parser = ["110m", "50m", "10m"])]
    resolution: String,
    /// geo-search's name in Consul.
    #[arg(long, default_value = "geo-search")]
    service: String,
    /// Where geo-search is when Consul is not configured (`CONSUL_HTTP_ADDR` unset).
    #[arg(long, default_value = "127.0.0.1:50101")]
    addr: String,
    /// Calls in flight at once.
    #[arg(long, default_value_t = 8)]
    concurrency: usize,
}

/// Created / skipped / refused / failed.
#[derive(Default)]
struct Tally {
    created: AtomicU64,
    skipped: AtomicU64,
    refused: AtomicU64,
    failed: AtomicU64,
}

fn req<T>(msg: T) -> Request<T> {
    let mut r = Request::new(msg);
    r.set_timeout(Duration::from_secs(30));
    r
}

/// Whether geo-search holds an area named exactly `name` (its name search matches parts, any case).
async fn holds(search: &mut SearchClient<Channel>, name: &str) -> Result<bool, Status> {
    for page in 1.. {
        let found = search
            .search(req(SearchRequest {
                query: name.to_owned(),
                any_location: true,
                page_number: page,
                result_per_page: 100,
                ..Default::default()
            }))
            .await?
            .into_inner();
        if found.responses.iter().any(|r| r.response == name) {
            return Ok(true);
        }
        if !found.has_more {
            break;
        }
    }
    Ok(false)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let started = Instant::now();
    let file = args
        .atlas
        .join(format!("countries-{}.json", args.resolution));
    let text = std::fs::read_to_string(&file).map_err(|e| {
        anyhow::anyhow!(
            "{}: {e} (make infra-install fetches world-atlas)",
            file.display()
        )
    })?;
    let areas =
        atlas::countries(&text).map_err(|e| anyhow::anyhow!("{}: {e:#}", file.display()))?;
    eprintln!(
        "{}: {} countries, {} vertices",
        file.display(),
        areas.len(),
        areas.iter().map(|a| a.vertices).sum::<usize>()
    );

    let mut env = Env::from_process();
    if env.get("CONSUL_HTTP_ADDR").is_none() {
        env = env.with(
            "KEEL_CLIENT__STATIC_ENDPOINTS",
            format!("{}={}", args.service, args.addr),
        );
    }
    let settings = Settings::from_env("geo-loader", &env)?;
    let clients = ClientFactory::new(&settings, Metrics::disabled());
    let search = SearchClient::new(clients.channel(&args.service)?);
    let tally = Tally::default();
    stream::iter(areas)
        .for_each_concurrent(args.concurrency.max(1), |area| {
            let (mut search, tally) = (search.clone(), &tally);
            async move {
                let outcome = match holds(&mut search, &area.name).await {
                    Ok(true) => Ok(false),
                    Ok(false) => search
                        .add_thing(req(AddThingRequest {
                            name: area.name.clone(),
                            wkt: area.wkt,
                            make_valid: true,
                        }))
                        .await
                        .map(|_| true),
                    Err(e) => Err(e),
                };
                let counter = match &outcome {
                    Ok(true) => &tally.created,
                    Ok(false) => &tally.skipped,
                    Err(s) if s.code() == tonic::Code::InvalidArgument => &tally.refused,
                    Err(_) => &tally.failed,
                };
                counter.fetch_add(1, Ordering::Relaxed);
                if let Err(s) = outcome {
                    eprintln!("  {}: {:?} {}", area.name, s.code(), s.message());
                }
            }
        })
        .await;
    let n = |c: &AtomicU64| c.load(Ordering::Relaxed);
    eprintln!(
        "countries: {} created, {} already there, {} refused, {} failed ({:.1} s)",
        n(&tally.created),
        n(&tally.skipped),
        n(&tally.refused),
        n(&tally.failed),
        started.elapsed().as_secs_f64()
    );
    anyhow::ensure!(n(&tally.failed) == 0, "some countries failed to load");
    Ok(())
}
