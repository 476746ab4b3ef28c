//! `keel-bench db-path`: what each piece of the platform's database path costs per query, in process on the
//! real PostgreSQL (`KEEL_DATABASE_URL`): accounts' `GetByToken` statement on a table of 10,000 accounts, from
//! `--concurrency` tasks sharing one pool of `--connections`, each row beside the first (sqlx's typed
//! PostgreSQL pool with no hooks):
//! - `sqlx PgPool`: the floor sqlx gives;
//! - `sqlx Pool`: the `Any` driver every service uses (both backends behind one pool type);
//! - `keel pool, outside a call`: `db::connect`'s pool, as every service opens it (`db::Pool`: no ping when a
//!   connection goes back, `statement_timeout` set only when a call needs another);
//! - `keel pool, in a call with a deadline`: the same inside a request context, so the timeout set is what is
//!   left of the call's deadline.
//!
//! With `--sqlite`, the same statement and table on an SQLite file in WAL mode (no server needed): sqlx's typed
//! `SqlitePool`, its `AnyPool`, and the platform's pool, each beside the first.
//!
//! Columns: queries/s, the ratio to the first row, CPU µs of this process per query (`/proc/self/stat`).

use std::time::{Duration, Instant};

use keel_common::{context, db};
use sqlx::{Executor, Row};

/// Options of `keel-bench db-path`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// How long each row runs (after a 1 s warm-up).
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Queries in flight at once.
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// Connections of each pool.
    #[arg(long, default_value_t = 8)]
    connections: u32,
    /// Measure the SQLite path instead (a file in a directory of its own, no server needed).
    #[arg(long)]
    sqlite: bool,
}

const QUERY: &str = "SELECT id, name, max_cache_keys, used_cache_keys, token_hash FROM bench_accounts \
                     WHERE token_hash = $1";
const TABLE: &str = "CREATE TABLE bench_accounts (id TEXT PRIMARY KEY, name TEXT NOT NULL, \
                     token_hash TEXT NOT NULL UNIQUE, max_cache_keys BIGINT NOT NULL, \
                     used_cache_keys BIGINT NOT NULL)";
const ACCOUNTS: u64 = 10_000;

/// The work of a row on `$pool` (any sqlx pool, or `&db::Pool`'s executor): GetByToken's statement for
/// account `i`, its name read. A macro, not a function: the pools are of three sqlx databases.
macro_rules! get_by_token {
    ($pool:expr) => {{
        let pool = $pool;
        move |i| {
            let pool = pool.clone();
            async move {
                let row = sqlx::query(QUERY).bind(token(i)).fetch_one(&pool).await?;
                let _: String = row.try_get(1)?;
                anyhow::Ok(())
            }
        }
    }};
}

/// sqlx's `AnyPool` of `args.connections` to `url`.
async fn any_pool(args: &Args, url: &str) -> anyhow::Result<sqlx::AnyPool> {
    sqlx::any::install_default_drivers();
    Ok(sqlx::any::AnyPoolOptions::new()
        .max_connections(args.connections)
        .connect(url)
        .await?)
}

fn token(i: u64) -> String {
    format!("{:064x}", i % ACCOUNTS)
}

/// Runs `query` from `args.concurrency` tasks: (queries/s, CPU µs per query).
async fn measure<F, Fut>(args: &Args, query: F) -> anyhow::Result<(f64, f64)>
where
    F: Fn(u64) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = anyhow::Result<()>> + Send,
{
    let (m, cpu) = crate::load::in_process(args.concurrency, args.duration, query).await?;
    Ok((m.rate, cpu))
}

/// Runs the rows and prints the table.
///
/// # Errors
/// No PostgreSQL at `KEEL_DATABASE_URL`, or a query fails.
pub async fn run(args: Args) -> anyhow::Result<()> {
    if args.sqlite {
        return sqlite_rows(&args).await;
    }
    let admin = std::env::var("KEEL_DATABASE_URL").map_err(|_| {
        anyhow::anyhow!("KEEL_DATABASE_URL: eval \"$(scripts/infra.sh env)\" first")
    })?;
    let name = format!(
        "keelbench_db_{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    );
    let mut admin_conn = <sqlx::PgConnection as sqlx::Connection>::connect(&admin).await?;
    admin_conn
        .execute(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .await?;
    let url = format!(
        "{}/{name}",
        admin
            .rsplit_once('/')
            .map_or(admin.as_str(), |(base, _)| base)
    );
    let outcome = rows(&args, &url).await;
    admin_conn
        .execute(sqlx::AssertSqlSafe(format!(
            "DROP DATABASE {name} WITH (FORCE)"
        )))
        .await?;
    outcome
}

async fn rows(args: &Args, url: &str) -> anyhow::Result<()> {
    let typed = sqlx::postgres::PgPoolOptions::new()
        .max_connections(args.connections)
        .connect(url)
        .await?;
    typed.execute(TABLE).await?;
    typed
        .execute(sqlx::AssertSqlSafe(format!(
            "INSERT INTO bench_accounts SELECT i::text, 'account ' || i, lpad(to_hex(i), 64, '0'), 100, 0 \
             FROM generate_series(0, {}) AS i",
            ACCOUNTS - 1
        )))
        .await?;
    let mut table = Vec::new();

    table.push((
        "sqlx PgPool (typed), no hooks",
        measure(args, get_by_token!(typed.clone())).await?,
    ));

    let any = any_pool(args, url).await?;
    table.push((
        "sqlx AnyPool, no hooks",
        measure(args, get_by_token!(any.clone())).await?,
    ));
    any.close().await;

    let settings = keel_common::Settings::from_env(
        "bench",
        &keel_common::config::Env::default()
            .with("KEEL_DATABASE__URL", url)
            .with(
                "KEEL_DATABASE__MAX_CONNECTIONS",
                args.connections.to_string(),
            ),
    )?;
    let keel = db::connect(&settings, "bench", &sqlx::migrate::Migrator::DEFAULT).await?;
    table.push((
        "keel pool (db::connect), outside a call",
        measure(args, get_by_token!(keel.clone())).await?,
    ));
    let in_call = get_by_token!(keel.clone());
    table.push((
        "keel pool, in a call with a 2 s deadline",
        measure(args, move |i| {
            let ctx = context::RequestContext {
                trace_id: "".into(),
                deadline: Some(Instant::now() + Duration::from_secs(2)),
            };
            context::scope(ctx, in_call(i))
        })
        .await?,
    ));
    keel.close().await;
    typed.close().await;

    print_table(args, &table);
    Ok(())
}

/// Prints the rows, each beside the first.
fn print_table(args: &Args, table: &[(&str, (f64, f64))]) {
    println!(
        "\n{} tasks, {} connections, {:?} per row; accounts' GetByToken statement, 10,000 rows\n",
        args.concurrency, args.connections, args.duration
    );
    println!("| pool | queries/s | × first | CPU µs / query |\n|---|---:|---:|---:|");
    let first = table[0].1.0;
    for (name, (rate, cpu)) in table {
        println!("| {name} | {rate:.0} | {:.2}× | {cpu:.1} |", rate / first);
    }
}

/// The same rows on an SQLite file (WAL, as the platform opens it).
async fn sqlite_rows(args: &Args) -> anyhow::Result<()> {
    let dir = std::env::temp_dir().join(format!("keel-bench-db-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir)?;
    let outcome = sqlite_rows_in(args, &dir).await;
    std::fs::remove_dir_all(&dir)?;
    outcome
}

async fn sqlite_rows_in(args: &Args, dir: &std::path::Path) -> anyhow::Result<()> {
    use std::str::FromStr;
    let url = format!("sqlite://{}/bench.db?mode=rwc", dir.display());
    let typed = sqlx::sqlite::SqlitePoolOptions::new()
        .max_connections(args.connections)
        .connect_with(
            sqlx::sqlite::SqliteConnectOptions::from_str(&url)?
                .journal_mode(sqlx::sqlite::SqliteJournalMode::Wal)
                .busy_timeout(Duration::from_secs(5)),
        )
        .await?;
    typed.execute(TABLE).await?;
    let mut tx = typed.begin().await?;
    for i in 0..ACCOUNTS {
        sqlx::query("INSERT INTO bench_accounts VALUES ($1, $2, $3, 100, 0)")
            .bind(i.to_string())
            .bind(format!("account {i}"))
            .bind(token(i))
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await?;
    let mut table = Vec::new();
    table.push((
        "sqlx SqlitePool (typed)",
        measure(args, get_by_token!(typed.clone())).await?,
    ));
    let any = any_pool(args, &url).await?;
    table.push((
        "sqlx AnyPool",
        measure(args, get_by_token!(any.clone())).await?,
    ));
    any.close().await;
    let keel = db::connect_url(
        &url,
        args.connections,
        Duration::from_secs(3),
        &sqlx::migrate::Migrator::DEFAULT,
    )
    .await?;
    table.push((
        "keel pool (db::connect)",
        measure(args, get_by_token!(keel.clone())).await?,
    ));
    keel.close().await;
    typed.close().await;
    print_table(args, &table);
    Ok(())
}
