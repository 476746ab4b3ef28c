//! `keel-bench client-stack`: closed-loop load over real gRPC on 127.0.0.1 against servers started in this
//! process (no external server: accounts on a temporary SQLite file), printing one table row per scenario:
//! calls, calls per second, latency percentiles (HdrHistogram, microseconds) and the process's CPU per call
//! (client and server together, from the scheduler's per-thread figures). It measures what ghz cannot: the
//! platform's *client* stack.
//!
//! Scenarios:
//! - `echo, plain tonic channel`: the platform's server stack (context, metrics, shedding, limits) behind a bare
//!   tonic client;
//! - `echo, platform channel`: the same server through `ClientFactory::channel` (deadline and trace id,
//!   client metrics, p2c over PeakEWMA, buffer): the difference is the client stack's cost;
//! - `cache Store, new keys` / `cache Get`: the cache with its accounts service, tokens cached and
//!   reservations shared (the defaults);
//! - `cache Store, new keys, token_ttl 0`: every Store also asks accounts for the token.
//!
//! Numbers depend on the machine; compare rows of one run, and runs of one machine. Build with `--release`.

use std::{
    future::Future,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use hdrhistogram::Histogram;
use keel_common::{
    App, ClientFactory, Metrics,
    config::{Env, Secret, Settings},
};
use keel_protos::{
    keel::example::v1::{EchoRequest, echo_client::EchoClient},
    rpc::{
        CreateAccountReq, GetReq, StoreReq, accounts_client::AccountsClient,
        cache_client::CacheClient,
    },
};

/// Options of `keel-bench client-stack`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// How long each scenario runs (after a 1 s warm-up).
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Calls in flight at once.
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// Value size of cache Stores, bytes.
    #[arg(long, default_value_t = 256)]
    value_bytes: usize,
}

/// Serves `app` on 127.0.0.1:0, with `env` as its configuration; returns the address.
async fn serve(app: App, env: Env) -> anyhow::Result<SocketAddr> {
    let settings = app.settings(&env)?;
    app.spawn(settings).await
}

fn clients(name: &str, routes: &[(&str, SocketAddr)]) -> anyhow::Result<ClientFactory> {
    let list: Vec<String> = routes.iter().map(|(s, a)| format!("{s}={a}")).collect();
    let env = Env::default().with("KEEL_CLIENT__STATIC_ENDPOINTS", list.join(","));
    Ok(ClientFactory::new(
        &Settings::from_env(name, &env)?,
        Metrics::disabled(),
    ))
}

/// One row of the table.
struct Row {
    scenario: String,
    calls: u64,
    errors: u64,
    elapsed: Duration,
    latency: Histogram<u64>,
    /// CPU time of the whole process over the run (client and server both), ns.
    cpu_ns: u64,
}

/// Runs `call` from `concurrency` loops for 1 s (discarded), then for `duration`.
async fn measure<F, Fut>(scenario: &str, args: &Args, call: F) -> Row
where
    F: Fn(u64) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = bool> + Send,
{
    let seq = Arc::new(AtomicU64::new(0));
    for (phase, length) in [("warm-up", Duration::from_secs(1)), ("run", args.duration)] {
        let started = Instant::now();
        let cpu_before = crate::procs::cpu_ns_of_threads();
        let until = started + length;
        let workers: Vec<_> = (0..args.concurrency)
            .map(|_| {
                let call = call.clone();
                let seq = seq.clone();
                tokio::spawn(async move {
                    let mut h =
                        Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("bounds");
                    let mut errors = 0;
                    while Instant::now() < until {
                        let t = Instant::now();
                        let ok = call(seq.fetch_add(1, Ordering::Relaxed)).await;
                        h.saturating_record(t.elapsed().as_micros() as u64);
                        errors += u64::from(!ok);
                    }
                    (h, errors)
                })
            })
            .collect();
        let mut latency = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("bounds");
        let mut errors = 0;
        for w in workers {
            let (h, e) = w.await.expect("worker");
            latency.add(h).expect("same bounds");
            errors += e;
        }
        if phase == "run" {
            return Row {
                scenario: scenario.to_owned(),
                calls: latency.len(),
                errors,
                elapsed: started.elapsed(),
                latency,
                cpu_ns: crate::procs::cpu_ns_of_threads().saturating_sub(cpu_before),
            };
        }
    }
    unreachable!("the run phase returns")
}

fn print(rows: &[Row], args: &Args) {
    println!(
        "\nconcurrency {}, {} per scenario, values {} B\n",
        args.concurrency,
        humantime::format_duration(args.duration),
        args.value_bytes
    );
    println!(
        "| scenario | calls | errors | calls/s | p50 µs | p90 µs | p99 µs | max µs | CPU µs / call (client and server) |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|"
    );
    for r in rows {
        let q = |p: f64| r.latency.value_at_quantile(p);
        println!(
            "| {} | {} | {} | {:.0} | {} | {} | {} | {} | {:.1} |",
            r.scenario,
            r.calls,
            r.errors,
            r.calls as f64 / r.elapsed.as_secs_f64(),
            q(0.5),
            q(0.9),
            q(0.99),
            r.latency.max(),
            r.cpu_ns as f64 / 1000.0 / r.calls.max(1) as f64
        );
    }
}

/// The accounts server's operator credential, which the cache servers present too.
const ADMIN_TOKEN: &str = "bench-admin-token";

async fn cache_server(accounts: SocketAddr, token_ttl: &str) -> anyhow::Result<SocketAddr> {
    let env = Env::default()
        .with(
            "KEEL_CLIENT__STATIC_ENDPOINTS",
            format!("accounts={accounts}"),
        )
        .with("KEEL_CACHE__TOKEN_TTL", token_ttl)
        .with("KEEL_CACHE__ACCOUNTS_TOKEN", ADMIN_TOKEN)
        .with("KEEL_CACHE__MAX_BYTES", (1usize << 30).to_string());
    serve(App::of::<cache::Cache>(), env).await
}

/// Runs the scenarios and prints the table.
///
/// # Errors
/// A server cannot start or an account cannot be made.
pub async fn run(args: Args) -> anyhow::Result<()> {
    let mut rows = Vec::new();

    let echo = serve(App::of::<echo::EchoService>(), Env::default()).await?;
    let plain = EchoClient::new(
        tonic::transport::Endpoint::from_shared(format!("http://{echo}"))?
            .connect()
            .await?,
    );
    let platform = EchoClient::new(clients("bench", &[("echo", echo)])?.channel("echo")?);
    let request = || EchoRequest {
        message: "bench".into(),
        ..Default::default()
    };
    rows.push(
        measure("echo, plain tonic channel", &args, move |_| {
            let mut c = plain.clone();
            async move { c.echo(request()).await.is_ok() }
        })
        .await,
    );
    rows.push(
        measure("echo, platform channel", &args, move |_| {
            let mut c = platform.clone();
            async move { c.echo(request()).await.is_ok() }
        })
        .await,
    );

    let dir = std::env::temp_dir().join(format!("keel-bench-{}", uuid::Uuid::new_v4().simple()));
    let accounts_env = Env::default()
        .with(
            "KEEL_DATABASE__URL",
            format!("sqlite://{}/accounts.db?mode=rwc", dir.display()),
        )
        .with("KEEL_ACCOUNTS__ADMIN_TOKEN", ADMIN_TOKEN);
    let accounts = serve(App::of::<accounts::Accounts>(), accounts_env).await?;
    let token =
        AccountsClient::new(clients("bench", &[("accounts", accounts)])?.channel("accounts")?)
            .create_account({
                let mut req = tonic::Request::new(CreateAccountReq {
                    name: "bench".into(),
                    max_cache_keys: i64::MAX / 2,
                });
                keel_common::context::set_bearer_token(&mut req, &Secret::new(ADMIN_TOKEN));
                req
            })
            .await?
            .into_inner()
            .token;
    let value = vec![7u8; args.value_bytes];
    for (ttl, label) in [("5s", ""), ("0s", ", token_ttl 0")] {
        let addr = cache_server(accounts, ttl).await?;
        let cache = CacheClient::new(clients("bench", &[("cache", addr)])?.channel("cache")?);
        let (c, t, v) = (cache.clone(), token.clone(), value.clone());
        rows.push(
            measure(&format!("cache Store, new keys{label}"), &args, move |i| {
                let (mut c, t, v) = (c.clone(), t.clone(), v.clone());
                async move {
                    c.store(StoreReq {
                        key: format!("k{i}"),
                        val: v,
                        account_token: t,
                        ttl_ms: 0,
                    })
                    .await
                    .is_ok()
                }
            })
            .await,
        );
        if label.is_empty() {
            // Keys k0.. up to the Stores of the run just measured (its warm-up stored more): every Get hits.
            let stored = rows.last().map_or(1, |r: &Row| r.calls.max(1));
            let t = token.clone();
            rows.push(
                measure("cache Get", &args, move |i| {
                    let (mut c, t) = (cache.clone(), t.clone());
                    async move {
                        c.get(GetReq {
                            key: format!("k{}", i % stored),
                            account_token: t,
                        })
                        .await
                        .is_ok()
                    }
                })
                .await,
            );
        }
    }
    print(&rows, &args);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
