//! `make bench`: the per-call cost of the stack, measured as its users would: release builds of the services
//! as processes of their own on 127.0.0.1, under ghz at a fixed concurrency, each row beside a baseline of the
//! same run so every figure is a ratio:
//! - the platform's overhead: a bare tonic server of the same proto with none of our layers
//!   (`keel-bench bare`), target ≥ 0.9× its calls/s;
//! - a database-bound RPC: pgbench running the service's own query on the same PostgreSQL (prepared
//!   statements), target ≥ 0.5× its transactions/s; for the KillrVideo server on SQLite, the same statements
//!   run in process on its files ([`killrvideo`]); for the `make up` cluster, called through Consul DNS
//!   ([`cluster`]), pgbench again. accounts' GetByToken has a second baseline, a bare tonic server answering
//!   it with sqlx's typed `PgPool` (`keel-bench bare --proto accounts`), target ≥ 0.9×: what our layers and
//!   pool cost on a database-bound call, apart from what tonic and the database cost.
//!
//! Columns: calls/s, the ratio and its target, latency p50/p99/p99.9 (µs, from every call ghz recorded),
//! errors, server CPU-seconds per 1,000 calls (`/proc/<pid>/stat`), idle and peak resident memory (MB,
//! idle read 3 s after start; target idle ≤ 15 per service process, for the `make up` row the largest of
//! the cluster's processes). PostgreSQL comes from `KEEL_DATABASE_URL` (`scripts/infra.sh env`).
//!
//! `keel-bench client-stack` measures what ghz cannot: the platform's client stack, in process.

mod bare;
mod client_stack;
mod cluster;
mod db_path;
mod killrvideo;
mod layers;
mod load;
mod procs;

use std::{net::SocketAddr, process::Command, time::Duration};

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use keel_common::config::Secret;
use keel_protos::rpc::{CreateAccountReq, accounts_client::AccountsClient};
use load::{Measured, Shape};
use procs::{Proc, sibling};

#[derive(Parser, Debug)]
#[command(
    about = "Benchmarks of the stack: release service processes under ghz, beside their baselines"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Cmd>,
    /// How long each row is measured (after a 1 s warm-up).
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Calls in flight at once (pgbench: clients).
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// gRPC connections the calls share.
    #[arg(long, default_value_t = 4)]
    connections: usize,
    /// Only these sections (comma separated; all when unset).
    #[arg(long, value_enum, value_delimiter = ',')]
    only: Vec<Section>,
}

/// The sections of the table, in order.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum Section {
    /// echo beside a bare tonic server, as benched, as deployed, without the call log line.
    Echo,
    /// cache Store and Get beside a bare tonic server; accounts GetByToken beside pgbench.
    Cache,
    /// geo-search's point and name searches beside pgbench.
    Geo,
    /// The embedded KillrVideo server's RPCs beside SQLite.
    Killrvideo,
    /// KillrVideo GetVideo on the `make up` cluster through Consul DNS beside pgbench.
    Cluster,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Serves a bare tonic server (a baseline) until killed.
    Bare {
        /// Which proto.
        #[arg(long, value_enum)]
        proto: bare::Proto,
        /// Where to listen.
        #[arg(long, default_value = "127.0.0.1:0")]
        addr: SocketAddr,
        /// The PostgreSQL URL of `--proto accounts`.
        #[arg(long)]
        database: Option<String>,
    },
    /// The platform's client stack against its server over real gRPC on 127.0.0.1, in one process (latency).
    ClientStack(client_stack::Args),
    /// What each piece of the platform's database path costs per query, in process on PostgreSQL.
    DbPath(db_path::Args),
    /// What each layer of the server and client stacks costs per call, one by one, in process.
    Layers(layers::Args),
}

/// One row of the table.
struct Row {
    name: String,
    measured: Measured,
    /// `(baseline's calls/s, target ratio)`; `None` for a baseline row.
    against: Option<(f64, f64)>,
    /// A second baseline of a database-bound row, bare tonic with sqlx running the same statement (what the
    /// platform's layers cost on top): `(its calls/s, target ratio)`.
    beside: Option<(f64, f64)>,
    cpu_per_1k: Option<f64>,
    rss: Option<(f64, f64)>,
}

const ADMIN_TOKEN: &str = "bench-admin-token";

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Some(Cmd::Bare {
            proto,
            addr,
            database,
        }) => bare::serve(proto, addr, database.as_deref()).await,
        Some(Cmd::ClientStack(args)) => client_stack::run(args).await,
        Some(Cmd::DbPath(args)) => db_path::run(args).await,
        Some(Cmd::Layers(args)) => {
            // Its own current-thread runtimes, one per row: calls one after another on this thread.
            tokio::task::spawn_blocking(move || layers::run(&args)).await?
        }
        None => run(&cli).await,
    }
}

/// Measures `proc` under `load`: its CPU per 1,000 calls and memory come with the row.
fn row(
    name: &str,
    proc: &Proc,
    idle_rss: f64,
    load: impl FnOnce() -> anyhow::Result<Measured>,
) -> anyhow::Result<Row> {
    let cpu = proc.cpu_seconds();
    let measured = load()?;
    let used = proc.cpu_seconds() - cpu;
    let (_, peak) = proc.rss_mb();
    eprintln!("  {name}: {:.0} calls/s", measured.rate);
    Ok(Row {
        name: name.to_owned(),
        cpu_per_1k: (measured.calls > 0).then(|| used * 1000.0 / measured.calls as f64),
        measured,
        against: None,
        beside: None,
        rss: Some((idle_rss, peak)),
    })
}

async fn run(cli: &Cli) -> anyhow::Result<()> {
    let shape = Shape {
        concurrency: cli.concurrency,
        connections: cli.connections,
        duration: cli.duration,
    };
    let ghz = load::ghz_path()?;
    let pg = std::env::var("KEEL_DATABASE_URL")
        .context("KEEL_DATABASE_URL is not set: run through `make bench` (it starts PostgreSQL)")?;
    let dir = std::env::temp_dir().join(format!("keel-bench-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir)?;
    let protoset = dir.join("keel.protoset");
    std::fs::write(&protoset, keel_protos::FILE_DESCRIPTOR_SET)?;
    let bench = std::env::current_exe()?;
    let mut rows = Vec::new();
    let mut databases = Vec::new();
    let call = |addr, method: &str, data: &str, meta: Option<&str>| {
        load::ghz(&ghz, &protoset, addr, method, data, meta, &shape)
    };
    let on = |s: Section| cli.only.is_empty() || cli.only.contains(&s);

    if on(Section::Echo) {
        eprintln!("echo");
        let echo = r#"{"message":"bench"}"#;
        let bare = Proc::start(&bench, &["bare", "--proto", "echo"], &[], &dir, "bare-echo")?;
        let base = row(
            "bare tonic Echo (baseline)",
            &bare,
            bare.idle_rss_mb(),
            || call(bare.addr, "keel.example.v1.Echo/Echo", echo, None),
        )?;
        drop(bare);
        // The platform as the bench runs it (stdout logs, StatsD counted but not sent), then as deployed (StatsD
        // and the Kafka log shipper of infra.sh), each of the two alone, then without the call log line: each
        // layer's share.
        let deployed = [
            (
                "KEEL_STATSD__ADDR",
                std::env::var("KEEL_STATSD_ADDR").unwrap_or_default(),
            ),
            (
                "KEEL_KAFKA__BROKERS",
                std::env::var("KEEL_KAFKA_BROKERS").unwrap_or_default(),
            ),
        ];
        let quiet = [("KEEL_LOG__LEVEL", "info,keel::calls=warn".to_owned())];
        let variants: [(&str, &[(&str, String)]); 5] = [
            ("echo Echo", &[]),
            ("echo Echo, StatsD and Kafka logs on", &deployed),
            ("echo Echo, StatsD on", &deployed[..1]),
            ("echo Echo, Kafka logs on", &deployed[1..]),
            ("echo Echo, no call log line", &quiet),
        ];
        let base_rate = base.measured.rate;
        rows.push(base);
        for (name, env) in variants {
            let svc = Proc::start(&sibling("echo")?, &[], env, &dir, "echo")?;
            let idle = svc.idle_rss_mb();
            let mut ours = row(name, &svc, idle, || {
                call(svc.addr, "keel.example.v1.Echo/Echo", echo, None)
            })?;
            drop(svc);
            ours.against = Some((base_rate, 0.9));
            rows.push(ours);
        }
    }

    if on(Section::Cache) {
        eprintln!("cache");
        let value = "YmVuY2ggdmFsdWUgYmVuY2ggdmFsdWUgYmVuY2ggdmFsdWU=";
        let accounts_db = database(&pg, "accounts")?;
        databases.push(accounts_db.clone());
        let accounts = Proc::start(
            &sibling("accounts")?,
            &[],
            &[
                ("KEEL_DATABASE__URL", accounts_db.clone()),
                ("KEEL_ACCOUNTS__ADMIN_TOKEN", ADMIN_TOKEN.into()),
            ],
            &dir,
            "accounts",
        )?;
        let token = create_account(accounts.addr).await?;
        let store = |token: &str| {
            format!(
                r#"{{"key":"k{{{{.RequestNumber}}}}","val":"{value}","account_token":"{token}"}}"#
            )
        };
        let get = |token: &str| format!(r#"{{"key":"hot","account_token":"{token}"}}"#);
        let bare = Proc::start(
            &bench,
            &["bare", "--proto", "cache"],
            &[],
            &dir,
            "bare-cache",
        )?;
        let idle = bare.idle_rss_mb();
        let base_store = row(
            "bare tonic Cache.Store, new keys (baseline)",
            &bare,
            idle,
            || call(bare.addr, "rpc.Cache/Store", &store(&token), None),
        )?;
        call(
            bare.addr,
            "rpc.Cache/Store",
            &store(&token).replace("k{{.RequestNumber}}", "hot"),
            None,
        )?;
        let base_get = row("bare tonic Cache.Get (baseline)", &bare, idle, || {
            call(bare.addr, "rpc.Cache/Get", &get(&token), None)
        })?;
        drop(bare);
        let cache = Proc::start(
            &sibling("cache")?,
            &[],
            &[
                (
                    "KEEL_CLIENT__STATIC_ENDPOINTS",
                    format!("accounts={}", accounts.addr),
                ),
                ("KEEL_CACHE__ACCOUNTS_TOKEN", ADMIN_TOKEN.into()),
                ("KEEL_CACHE__MAX_BYTES", (1u64 << 31).to_string()),
            ],
            &dir,
            "cache",
        )?;
        let idle = cache.idle_rss_mb();
        let ours_store = row("cache Store, new keys", &cache, idle, || {
            call(cache.addr, "rpc.Cache/Store", &store(&token), None)
        })?;
        call(
            cache.addr,
            "rpc.Cache/Store",
            &store(&token).replace("k{{.RequestNumber}}", "hot"),
            None,
        )?;
        let ours_get = row("cache Get", &cache, idle, || {
            call(cache.addr, "rpc.Cache/Get", &get(&token), None)
        })?;
        drop(cache);
        push_pair(&mut rows, base_store, ours_store, 0.9);
        push_pair(&mut rows, base_get, ours_get, 0.9);

        eprintln!("accounts");
        let hash = psql(&accounts_db, "SELECT token_hash FROM accounts LIMIT 1")?;
        let base = baseline(
            "pgbench: GetByToken's query (baseline)",
            load::pgbench(
                &accounts_db,
                &format!(
                    "{};\n",
                    accounts::storage::BY_TOKEN_DIGEST.replace("$1", &format!("'{hash}'"))
                ),
                &dir,
                &shape,
            )?,
        );
        let by_token = format!(r#"{{"token":"{token}"}}"#);
        let bare = Proc::start(
            &bench,
            &["bare", "--proto", "accounts", "--database", &accounts_db],
            &[],
            &dir,
            "bare-accounts",
        )?;
        let idle = bare.idle_rss_mb();
        let bare_row = row(
            "bare tonic + sqlx PgPool: GetByToken (baseline)",
            &bare,
            idle,
            || call(bare.addr, "rpc.Accounts/GetByToken", &by_token, None),
        )?;
        drop(bare);
        let idle = accounts.idle_rss_mb();
        let mut ours = row("accounts GetByToken (PostgreSQL)", &accounts, idle, || {
            call(accounts.addr, "rpc.Accounts/GetByToken", &by_token, None)
        })?;
        drop(accounts);
        ours.beside = Some((bare_row.measured.rate, 0.9));
        rows.push(bare_row);
        push_pair(&mut rows, base, ours, 0.5);
    }

    if on(Section::Geo) {
        eprintln!("geo-search");
        let geo_db = database(&pg, "geo")?;
        databases.push(geo_db.clone());
        psql(
            &geo_db,
            "CREATE EXTENSION IF NOT EXISTS postgis; CREATE EXTENSION IF NOT EXISTS pg_trgm",
        )?;
        let geo = Proc::start(
            &sibling("geo-search")?,
            &[],
            &[("KEEL_DATABASE__URL", geo_db.clone())],
            &dir,
            "geo-search",
        )?;
        load_countries(geo.addr)?;
        let idle = geo.idle_rss_mb();
        // Each search beside pgbench running its statement: a point in Paris (France, a multipolygon of ~300
        // vertices at 110m, holds it); "land" (Finland, Iceland, Poland, Thailand… 11 of the 177: one page of 10
        // and has_more).
        let searches = [
            (
                "point",
                "\\set lng 2.3522\n\\set lat 48.8566\n\
                 SELECT id, name FROM things WHERE ST_Contains(geom, ST_SetSRID(ST_MakePoint(:lng, :lat), 4326)) \
                 ORDER BY name, id LIMIT 11 OFFSET 0;\n",
                r#"{"lat":48.8566,"lng":2.3522,"result_per_page":10}"#,
            ),
            (
                "name",
                "\\set page 11\n\
                 SELECT id, name FROM things WHERE name ILIKE '%land%' ORDER BY name, id LIMIT :page OFFSET 0;\n",
                r#"{"query":"land","any_location":true,"result_per_page":10}"#,
            ),
        ];
        for (kind, script, request) in searches {
            let base = baseline(
                &format!("pgbench: {kind} search's query (baseline)"),
                load::pgbench(&geo_db, script, &dir, &shape)?,
            );
            let name = format!("geo-search search, a {kind} (177 countries)");
            let ours = row(&name, &geo, idle, || {
                call(geo.addr, "Search/search", request, None)
            })?;
            push_pair(&mut rows, base, ours, 0.5);
        }
        drop(geo);
    }

    if on(Section::Killrvideo) {
        eprintln!("killrvideo");
        let pairs = killrvideo::rows(&dir, &shape, |addr, method, data| {
            call(addr, method, data, None)
        })
        .await?;
        for (base, ours) in pairs {
            push_pair(&mut rows, base, ours, 0.5);
        }
    }

    if on(Section::Cluster) {
        eprintln!("make up cluster");
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
        let (base, ours) = cluster::rows(&root, &dir, &shape).await?;
        push_pair(&mut rows, base, ours, 0.5);
    }

    print(&rows, &shape);
    for db in databases {
        let name = db.rsplit('/').next().unwrap_or_default().to_owned();
        let _ = psql(&pg, &format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"));
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// A baseline row measured outside our processes (pgbench): no CPU or memory of ours.
fn baseline(name: &str, measured: Measured) -> Row {
    Row {
        name: name.to_owned(),
        measured,
        against: None,
        beside: None,
        cpu_per_1k: None,
        rss: None,
    }
}

/// Adds `ours` after its `base`line, with the ratio's target.
fn push_pair(rows: &mut Vec<Row>, base: Row, mut ours: Row, target: f64) {
    ours.against = Some((base.measured.rate, target));
    rows.push(base);
    rows.push(ours);
}

/// A new database `keelbench_<what>_<hex>` on the server of `admin` (a PostgreSQL URL); returns its URL.
fn database(admin: &str, what: &str) -> anyhow::Result<String> {
    let name = format!(
        "keelbench_{what}_{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    );
    psql(admin, &format!("CREATE DATABASE {name}"))?;
    let base = admin.rsplit_once('/').map_or(admin, |(b, _)| b);
    Ok(format!("{base}/{name}"))
}

/// Runs `sql` with psql on `url`; returns what it printed (unaligned, tuples only).
fn psql(url: &str, sql: &str) -> anyhow::Result<String> {
    let out = Command::new("psql")
        .args(["-X", "-q", "-At", "-v", "ON_ERROR_STOP=1", "-c", sql, url])
        .output()
        .context("run psql")?;
    if !out.status.success() {
        bail!("psql: {sql}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// An account for the cache rows, made with the operator token; returns its token.
async fn create_account(accounts: SocketAddr) -> anyhow::Result<String> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{accounts}"))?
        .connect()
        .await?;
    let mut req = tonic::Request::new(CreateAccountReq {
        name: "bench".into(),
        max_cache_keys: i64::MAX / 2,
    });
    keel_common::context::set_bearer_token(&mut req, &Secret::new(ADMIN_TOKEN));
    Ok(AccountsClient::new(channel)
        .create_account(req)
        .await?
        .into_inner()
        .token)
}

/// Natural Earth's countries (world-atlas, 110m) into the geo-search at `geo`, by the project's loader.
fn load_countries(geo: SocketAddr) -> anyhow::Result<()> {
    let out = Command::new(sibling("geo-loader")?)
        .args(["--addr", &geo.to_string()])
        .env_remove("CONSUL_HTTP_ADDR")
        .output()
        .context("run geo-loader")?;
    let said = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() || !said.contains("177 created") {
        bail!("geo-loader did not load the 177 countries:\n{said}");
    }
    Ok(())
}

/// `rate` as a ratio of a baseline's, beside its target: `0.93× (≥ 0.9) ok`.
/// The issue's target for a service's resident memory once idle, MB.
const IDLE_RSS_TARGET_MB: f64 = 15.0;

fn verdict(rate: f64, (base, target): (f64, f64)) -> String {
    let x = if base > 0.0 { rate / base } else { 0.0 };
    let met = if x >= target { "ok" } else { "BELOW" };
    format!("{x:.2}× (≥ {target}) {met}")
}

fn print(rows: &[Row], shape: &Shape) {
    let machine = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines().find_map(|l| {
                l.strip_prefix("model name")?
                    .split(':')
                    .nth(1)
                    .map(|s| s.trim().to_owned())
            })
        })
        .unwrap_or_default();
    println!(
        "\n{} concurrent calls over {} connections, {:?} per row; {} CPUs ({machine}); release builds\n",
        shape.concurrency,
        shape.connections,
        shape.duration,
        std::thread::available_parallelism().map_or(0, |n| n.get()),
    );
    println!(
        "| row | calls/s | × baseline (target) | p50 µs | p99 µs | p99.9 µs | errors | CPU-s / 1k calls | RSS idle / peak MB |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    for r in rows {
        let m = &r.measured;
        let ratio = match r.against {
            None => "baseline".to_owned(),
            Some(against) => {
                let mut cell = verdict(m.rate, against);
                if let Some(beside) = r.beside {
                    cell += &format!("; bare tonic + sqlx: {}", verdict(m.rate, beside));
                }
                cell
            }
        };
        let lat = m.latency_us.map_or(
            ["–".to_owned(), "–".to_owned(), "–".to_owned()],
            |l| l.map(|v| format!("{v:.0}")),
        );
        println!(
            "| {} | {:.0} | {ratio} | {} | {} | {} | {} | {} | {} |",
            r.name,
            m.rate,
            lat[0],
            lat[1],
            lat[2],
            m.errors,
            r.cpu_per_1k.map_or("–".into(), |c| format!("{c:.3}")),
            r.rss.map_or("–".into(), |(idle, peak)| {
                let mut cell = format!("{idle:.1} / {peak:.1}");
                // The target is the services': baselines get the figures alone.
                if r.against.is_some() {
                    let met = if idle <= IDLE_RSS_TARGET_MB {
                        "ok"
                    } else {
                        "BELOW"
                    };
                    cell += &format!(" (idle ≤ {IDLE_RSS_TARGET_MB}) {met}");
                }
                cell
            }),
        );
    }
}
