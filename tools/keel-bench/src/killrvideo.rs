//! The KillrVideo rows of `make bench`: the embedded server (`killrvideo-server`: the eight services in one
//! process, one SQLite file each, events on the in-process bus), as `make run` starts it, under ghz; each RPC
//! beside SQLite itself running the statements of the storage behind it (the same SQL, the services' own
//! constants where the statement is fixed text, in the same transactions, on the same file, from as many tasks as ghz has calls in flight, through sqlx's typed SQLite
//! pool with the platform's settings: WAL, 5 s busy timeout, 8 connections), target ≥ 0.5× its rate.
//!
//! Order matters: SubmitYouTubeVideo first, so the reads that follow run on the thousands of videos it added,
//! each tagged one of `tag0`…`tag99` at random: SearchVideos' query (`tag7`) matches about 1% of them. (A term
//! every video carries costs SQLite ~7 µs of CPU per matching video to rank, the service as much: ~80 ms per
//! search at 12,000 matches.)

use std::{path::Path, str::FromStr, time::Duration};

use sqlx::{
    Row as _,
    sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions},
};

use keel_protos::killrvideo::{
    common::Uuid as PbUuid,
    video_catalog::{
        SubmitYouTubeVideoRequest, video_catalog_service_client::VideoCatalogServiceClient,
    },
};
use ratings::statements as rating;
use video_catalog::statements as catalog;

use crate::{
    Row, baseline,
    load::{Measured, Shape, in_process},
    procs::{Proc, sibling},
    row,
};

/// The YouTube id every submitted video points at.
const YOUTUBE_ID: &str = "dQw4w9WgXcQ";

/// The pool of one service's SQLite file, as the platform opens it.
async fn pool(dir: &Path, service: &str) -> anyhow::Result<SqlitePool> {
    let url = format!("sqlite://{}/{service}.db", dir.display());
    Ok(SqlitePoolOptions::new()
        .max_connections(8)
        .connect_with(
            SqliteConnectOptions::from_str(&url)?
                .journal_mode(SqliteJournalMode::Wal)
                .busy_timeout(Duration::from_secs(5)),
        )
        .await?)
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// SQLite's side of a row: `work` in process under `shape`.
async fn sqlite<F, Fut>(name: &str, shape: &Shape, work: F) -> anyhow::Result<Row>
where
    F: Fn(u64) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = anyhow::Result<()>> + Send,
{
    let (measured, _) = in_process(shape.concurrency, shape.duration, work).await?;
    eprintln!("  {name}: {:.0} /s", measured.rate);
    Ok(baseline(name, measured))
}

/// The KillrVideo rows, each `(SQLite's baseline, the server's row)`; `call(addr, method, data)` runs ghz.
///
/// # Errors
/// The server does not start, a load fails.
pub async fn rows(
    dir: &Path,
    shape: &Shape,
    call: impl Fn(std::net::SocketAddr, &str, &str) -> anyhow::Result<Measured>,
) -> anyhow::Result<Vec<(Row, Row)>> {
    let data = dir.join("killrvideo");
    std::fs::create_dir_all(&data)?;
    let server = Proc::start(
        &sibling("killrvideo-server")?,
        &[],
        &[
            ("KEEL_GRPC__LISTEN_ADDR", "127.0.0.1:0".into()),
            ("KEEL_DATABASE__DIR", data.display().to_string()),
        ],
        dir,
        "killrvideo-server",
    )?;
    let idle = server.idle_rss_mb();
    let user = uuid::Uuid::new_v4();
    let video = uuid::Uuid::new_v4();
    let mut out = Vec::new();

    // SubmitYouTubeVideo: a new video per call.
    let submit = format!(
        r#"{{"video_id":{{"value":"{{{{newUUID}}}}"}},"user_id":{{"value":"{user}"}},"name":"bench video {{{{.RequestNumber}}}}","description":"a video of the benchmark","tags":["bench","tag{{{{randomInt 0 100}}}}"],"you_tube_video_id":"{YOUTUBE_ID}"}}"#
    );
    let ours = row("KillrVideo SubmitYouTubeVideo", &server, idle, || {
        call(
            server.addr,
            "killrvideo.video_catalog.VideoCatalogService/SubmitYouTubeVideo",
            &submit,
        )
    })?;
    // The video the reads ask for: one submission.
    VideoCatalogServiceClient::connect(format!("http://{}", server.addr))
        .await?
        .submit_you_tube_video(SubmitYouTubeVideoRequest {
            video_id: Some(PbUuid {
                value: video.to_string(),
            }),
            user_id: Some(PbUuid {
                value: user.to_string(),
            }),
            name: "bench video".into(),
            description: "a video of the benchmark".into(),
            tags: vec!["bench".into(), "tag0".into()],
            you_tube_video_id: YOUTUBE_ID.into(),
        })
        .await?;
    let catalog_db = pool(&data, "video-catalog").await?;
    sqlx::query("CREATE TABLE IF NOT EXISTS bench_outbox AS SELECT * FROM keel_outbox WHERE 0")
        .execute(&catalog_db)
        .await?;
    let base = {
        let pool = catalog_db.clone();
        sqlite(
            "SQLite: SubmitYouTubeVideo's transaction (baseline)",
            shape,
            move |n| submit_transaction(pool.clone(), user, n),
        )
        .await?
    };
    out.push((base, ours));

    // GetVideo: one video by id.
    let ours = row("KillrVideo GetVideo", &server, idle, || {
        call(
            server.addr,
            "killrvideo.video_catalog.VideoCatalogService/GetVideo",
            &format!(r#"{{"video_id":{{"value":"{video}"}}}}"#),
        )
    })?;
    let base = {
        let pool = catalog_db.clone();
        sqlite("SQLite: GetVideo's query (baseline)", shape, move |_| {
            let pool = pool.clone();
            async move {
                let r = sqlx::query(catalog::GET_VIDEO)
                    .bind(video.hyphenated().to_string())
                    .fetch_one(&pool)
                    .await?;
                let _: String = r.try_get(2)?;
                Ok(())
            }
        })
        .await?
    };
    out.push((base, ours));

    // GetLatestVideoPreviews: the first page of 10 (11 rows: the extra one says whether there is more).
    let ours = row("KillrVideo GetLatestVideoPreviews", &server, idle, || {
        call(
            server.addr,
            "killrvideo.video_catalog.VideoCatalogService/GetLatestVideoPreviews",
            r#"{"page_size":10}"#,
        )
    })?;
    let base = {
        let pool = catalog_db.clone();
        sqlite(
            "SQLite: GetLatestVideoPreviews' query (baseline)",
            shape,
            move |_| {
                let pool = pool.clone();
                async move {
                    let since = video_catalog::latest_window_start(now_ms());
                    let rows = sqlx::query(
                        "SELECT videoid, added_ms, name, preview_image_location, userid FROM latest_videos \
                         WHERE added_ms >= $1 ORDER BY added_ms DESC, videoid ASC LIMIT $2",
                    )
                    .bind(since)
                    .bind(11i64)
                    .fetch_all(&pool)
                    .await?;
                    anyhow::ensure!(rows.len() == 11, "latest videos: {} rows", rows.len());
                    Ok(())
                }
            },
        )
        .await?
    };
    out.push((base, ours));

    // SearchVideos: one tag of a hundred; the first page of 10 (+1).
    let ours = row("KillrVideo SearchVideos", &server, idle, || {
        call(
            server.addr,
            "killrvideo.search.SearchService/SearchVideos",
            r#"{"query":"tag7","page_size":10}"#,
        )
    })?;
    let search = pool(&data, "search").await?;
    let base = {
        let pool = search.clone();
        sqlite("SQLite: SearchVideos' query (baseline)", shape, move |_| {
            let pool = pool.clone();
            async move {
                let rows = sqlx::query(
                    "SELECT v.videoid, v.added_ms, v.name, v.preview_image_location, v.userid \
                     FROM search_terms t JOIN search_videos v ON v.videoid = t.videoid WHERE t.term IN ($1) \
                     GROUP BY v.videoid, v.added_ms, v.name, v.preview_image_location, v.userid \
                     ORDER BY COUNT(*) DESC, SUM(t.weight) DESC, v.added_ms DESC, v.videoid LIMIT $2 OFFSET $3",
                )
                .bind("tag7")
                .bind(11i64)
                .bind(0i64)
                .fetch_all(&pool)
                .await?;
                anyhow::ensure!(!rows.is_empty(), "search: no video tagged tag7");
                Ok(())
            }
        })
        .await?
    };
    out.push((base, ours));

    // RateVideo: one video, a new user per call.
    let ours = row("KillrVideo RateVideo", &server, idle, || {
        call(
            server.addr,
            "killrvideo.ratings.RatingsService/RateVideo",
            &format!(
                r#"{{"video_id":{{"value":"{video}"}},"user_id":{{"value":"{{{{newUUID}}}}"}},"rating":4}}"#
            ),
        )
    })?;
    let ratings_db = pool(&data, "ratings").await?;
    sqlx::query("CREATE TABLE IF NOT EXISTS bench_outbox AS SELECT * FROM keel_outbox WHERE 0")
        .execute(&ratings_db)
        .await?;
    let base = {
        let pool = ratings_db.clone();
        sqlite(
            "SQLite: RateVideo's transaction (baseline)",
            shape,
            move |_| rate_transaction(pool.clone(), video),
        )
        .await?
    };
    out.push((base, ours));
    drop(server);
    Ok(out)
}

/// video-catalog's `submit`: the video, its row for its user and for the latest list, the latest list's
/// window kept, its event in an outbox table of the same shape as the platform's (`bench_outbox`, which no
/// relay reads).
async fn submit_transaction(pool: SqlitePool, user: uuid::Uuid, n: u64) -> anyhow::Result<()> {
    let (video, user) = (uuid::Uuid::new_v4().to_string(), user.to_string());
    let (name, added, preview) = (
        format!("baseline video {n}"),
        now_ms(),
        format!("//img.youtube.com/vi/{YOUTUBE_ID}/hqdefault.jpg"),
    );
    let mut tx = pool.begin().await?;
    sqlx::query(catalog::INSERT_VIDEO)
        .bind(&video)
        .bind(&user)
        .bind(&name)
        .bind("a video of the benchmark")
        .bind(YOUTUBE_ID)
        .bind(0i64)
        .bind(&preview)
        .bind(r#"["bench"]"#)
        .bind(added)
        .execute(&mut *tx)
        .await?;
    sqlx::query(catalog::INSERT_USER_VIDEO)
        .bind(&user)
        .bind(added)
        .bind(&video)
        .bind(&name)
        .bind(&preview)
        .execute(&mut *tx)
        .await?;
    sqlx::query(catalog::INSERT_LATEST_VIDEO)
        .bind(added)
        .bind(&video)
        .bind(&user)
        .bind(&name)
        .bind(&preview)
        .execute(&mut *tx)
        .await?;
    sqlx::query(catalog::TRIM_LATEST)
        .bind(video_catalog::latest_window_start(added))
        .execute(&mut *tx)
        .await?;
    outbox_row(
        &mut tx,
        "killrvideo.video_catalog.YouTubeVideoAdded",
        &video,
    )
    .await?;
    tx.commit().await?;
    Ok(())
}

/// An event's row, as the platform's outbox writes it, in `bench_outbox`.
async fn outbox_row(
    tx: &mut sqlx::Transaction<'_, sqlx::Sqlite>,
    topic: &str,
    key: &str,
) -> anyhow::Result<()> {
    sqlx::query(
        "INSERT INTO bench_outbox (id, topic, payload, created_ms, event_key) VALUES ($1, $2, $3, $4, $5)",
    )
    .bind(uuid::Uuid::now_v7().to_string())
    .bind(topic)
    .bind("CiQKIgogYmVuY2ggZXZlbnQgcGF5bG9hZCBvZiBhYm91dCA4MCBieXRlcw==")
    .bind(now_ms())
    .bind(key)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// ratings' `rate` by a new user: the totals row locked first, the user's previous rating read, theirs
/// written, the totals moved, the event queued.
async fn rate_transaction(pool: SqlitePool, video: uuid::Uuid) -> anyhow::Result<()> {
    let (v, u) = (video.to_string(), uuid::Uuid::new_v4().to_string());
    let mut tx = pool.begin().await?;
    sqlx::query(rating::CREATE_TOTALS)
        .bind(&v)
        .execute(&mut *tx)
        .await?;
    sqlx::query(rating::LOCK_TOTALS)
        .bind(&v)
        .execute(&mut *tx)
        .await?;
    let previous = sqlx::query(rating::USER_RATING)
        .bind(&v)
        .bind(&u)
        .fetch_optional(&mut *tx)
        .await?;
    anyhow::ensure!(previous.is_none(), "a new user has no rating yet");
    sqlx::query(rating::PUT_USER_RATING)
        .bind(&v)
        .bind(&u)
        .bind(4i64)
        .execute(&mut *tx)
        .await?;
    sqlx::query(rating::ADD_TO_TOTALS)
        .bind(&v)
        .bind(1i64)
        .bind(4i64)
        .execute(&mut *tx)
        .await?;
    outbox_row(&mut tx, "killrvideo.ratings.UserRatedVideo", &v).await?;
    tx.commit().await?;
    Ok(())
}
