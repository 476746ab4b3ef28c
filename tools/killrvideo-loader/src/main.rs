//! `killrvideo-loader`: loads the real KillrVideo data (`shared/data`) through the public gRPC APIs, so
//! every write goes through validation, the outbox and the event consumers exactly as a client's would.
//!
//! ```sh
//! cargo run -p killrvideo-loader                        # into the embedded server on 127.0.0.1:50101
//! eval "$(scripts/infra.sh env)"; cargo run -p killrvideo-loader   # into the cluster, through Consul DNS
//! ```
//!
//! With `CONSUL_HTTP_ADDR` set, each service is found by name through Consul DNS SRV (the platform's client
//! factory: balancing, deadlines); otherwise every service is at `--addr`. Re-running creates nothing twice:
//! users and videos that exist answer ALREADY_EXISTS and are counted as skipped, comments are keyed by their
//! id, a rating replaces the user's previous one, and plays are recorded only for videos created by this run.

mod data;

use std::{
    path::PathBuf,
    sync::atomic::{AtomicU64, Ordering},
    time::{Duration, Instant},
};

use clap::Parser;
use futures::{StreamExt, stream};
use keel_common::{
    ClientFactory, Metrics,
    config::{Env, Settings},
};
use keel_protos::killrvideo::{
    comments::{CommentOnVideoRequest, comments_service_client::CommentsServiceClient},
    common::{TimeUuid, Uuid as PbUuid},
    ratings::{RateVideoRequest, ratings_service_client::RatingsServiceClient},
    statistics::{
        RecordPlaybackStartedRequest, statistics_service_client::StatisticsServiceClient,
    },
    user_management::{
        CreateUserRequest, user_management_service_client::UserManagementServiceClient,
    },
    video_catalog::{
        SubmitYouTubeVideoRequest, video_catalog_service_client::VideoCatalogServiceClient,
    },
};
use tonic::{Code, Request, Status};

/// Loads the KillrVideo data sets through the gRPC APIs.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// The `shared/data` folder.
    #[arg(long, env = "KILLRVIDEO_DATA", default_value = "../shared/data")]
    data: PathBuf,
    /// Where every service is when Consul is not configured (the embedded server).
    #[arg(long, default_value = "127.0.0.1:50101")]
    addr: String,
    /// Load at most this many of the 43,800 movie-data users (the trailers' uploaders always); all by default.
    #[arg(long)]
    max_users: Option<usize>,
    /// Record at most this many plays per video (the data has up to 5,935); all by default.
    #[arg(long)]
    max_plays_per_video: Option<u64>,
    /// Password given to every loaded user (the data sets carry only digests).
    #[arg(long, default_value = "killrvideo")]
    password: String,
    /// Calls in flight at once.
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
}

/// Created / skipped / failed of one kind.
#[derive(Default)]
struct Tally {
    created: AtomicU64,
    skipped: AtomicU64,
    failed: AtomicU64,
}

impl Tally {
    /// Counts one answer; returns whether it created something.
    fn count(&self, what: &str, result: Result<(), Status>) -> bool {
        match result {
            Ok(()) => {
                self.created.fetch_add(1, Ordering::Relaxed);
                true
            }
            Err(s) if s.code() == Code::AlreadyExists => {
                self.skipped.fetch_add(1, Ordering::Relaxed);
                false
            }
            Err(s) => {
                if self.failed.fetch_add(1, Ordering::Relaxed) < 5 {
                    eprintln!("  {what} failed: {:?} {}", s.code(), s.message());
                }
                false
            }
        }
    }

    fn done(&self) -> u64 {
        self.created.load(Ordering::Relaxed)
            + self.skipped.load(Ordering::Relaxed)
            + self.failed.load(Ordering::Relaxed)
    }
}

fn pb(id: &str) -> Option<PbUuid> {
    Some(PbUuid {
        value: id.to_owned(),
    })
}

fn req<T>(msg: T) -> Request<T> {
    let mut r = Request::new(msg);
    r.set_timeout(Duration::from_secs(30));
    r
}

/// Runs `call` for every item, `concurrency` at a time, printing progress every 2 s.
async fn phase<T, F, Fut>(name: &str, items: Vec<T>, concurrency: usize, tally: &Tally, call: F)
where
    F: Fn(T) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let total = items.len();
    let start = Instant::now();
    let mut last = Instant::now();
    let mut s = stream::iter(items).map(call).buffer_unordered(concurrency);
    while s.next().await.is_some() {
        if last.elapsed() > Duration::from_secs(2) {
            eprintln!(
                "  {name}: {}/{total} ({:.0}/s)",
                tally.done(),
                tally.done() as f64 / start.elapsed().as_secs_f64()
            );
            last = Instant::now();
        }
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let started = Instant::now();
    let data = data::Dataset::load(&args.data, args.max_users)?;
    eprintln!(
        "data: {} users, {} videos, {} comments, {} ratings, {} play counts",
        data.users.len(),
        data.videos.len(),
        data.comments.len(),
        data.ratings.len(),
        data.plays.len()
    );

    let mut env = Env::from_process();
    if env.get("CONSUL_HTTP_ADDR").is_none() {
        let endpoints: Vec<String> = [
            "user-management",
            "video-catalog",
            "comments",
            "ratings",
            "statistics",
        ]
        .iter()
        .map(|s| format!("{s}={}", args.addr))
        .collect();
        env = env.with("KEEL_CLIENT__STATIC_ENDPOINTS", endpoints.join(","));
    }
    let settings = Settings::from_env("killrvideo-loader", &env)?;
    let clients = ClientFactory::new(&settings, Metrics::disabled());
    let users = UserManagementServiceClient::new(clients.channel("user-management")?);
    let videos = VideoCatalogServiceClient::new(clients.channel("video-catalog")?);
    let comments = CommentsServiceClient::new(clients.channel("comments")?);
    let ratings = RatingsServiceClient::new(clients.channel("ratings")?);
    let stats = StatisticsServiceClient::new(clients.channel("statistics")?);
    let n = args.concurrency.max(1);

    let t_users = Tally::default();
    phase("users", data.users, n, &t_users, |u| {
        let mut c = users.clone();
        let password = args.password.clone();
        let t = &t_users;
        async move {
            let r = c
                .create_user(req(CreateUserRequest {
                    user_id: pb(&u.id),
                    first_name: u.first_name,
                    last_name: u.last_name,
                    email: u.email,
                    password,
                }))
                .await;
            t.count("user", r.map(drop));
        }
    })
    .await;

    let t_videos = Tally::default();
    let created = std::sync::Mutex::new(std::collections::HashSet::new());
    phase("videos", data.videos, n, &t_videos, |v| {
        let mut c = videos.clone();
        let (t, created) = (&t_videos, &created);
        async move {
            let id = v.id.clone();
            let r = c
                .submit_you_tube_video(req(SubmitYouTubeVideoRequest {
                    video_id: pb(&v.id),
                    user_id: pb(&v.user_id),
                    // A few videos have no description, which the API requires: the name stands in.
                    description: if v.description.trim().is_empty() {
                        v.name.clone()
                    } else {
                        v.description
                    },
                    name: v.name,
                    tags: v.tags,
                    you_tube_video_id: v.youtube_id,
                }))
                .await;
            if t.count("video", r.map(drop)) {
                created.lock().expect("created").insert(id);
            }
        }
    })
    .await;

    let t_comments = Tally::default();
    phase("comments", data.comments, n, &t_comments, |cm| {
        let mut c = comments.clone();
        let t = &t_comments;
        async move {
            let r = c
                .comment_on_video(req(CommentOnVideoRequest {
                    video_id: pb(&cm.video_id),
                    user_id: pb(&cm.user_id),
                    comment_id: Some(TimeUuid {
                        value: cm.comment_id,
                    }),
                    comment: cm.text,
                }))
                .await;
            t.count("comment", r.map(drop));
        }
    })
    .await;

    let t_ratings = Tally::default();
    phase("ratings", data.ratings, n, &t_ratings, |rt| {
        let mut c = ratings.clone();
        let t = &t_ratings;
        async move {
            let r = c
                .rate_video(req(RateVideoRequest {
                    video_id: pb(&rt.video_id),
                    user_id: pb(&rt.user_id),
                    rating: rt.rating,
                }))
                .await;
            t.count("rating", r.map(drop));
        }
    })
    .await;

    let created = created.into_inner().expect("created");
    let plays: Vec<String> = data
        .plays
        .into_iter()
        .filter(|(v, _)| created.contains(v))
        .flat_map(|(v, views)| {
            std::iter::repeat_n(
                v,
                args.max_plays_per_video.map_or(views, |m| views.min(m)) as usize,
            )
        })
        .collect();
    let t_plays = Tally::default();
    phase("plays", plays, n, &t_plays, |v| {
        let mut c = stats.clone();
        let t = &t_plays;
        async move {
            let r = c
                .record_playback_started(req(RecordPlaybackStartedRequest { video_id: pb(&v) }))
                .await;
            t.count("play", r.map(drop));
        }
    })
    .await;

    println!(
        "{:<10} {:>9} {:>9} {:>9}",
        "kind", "ok", "existed", "failed"
    );
    let mut failed = 0;
    for (name, t) in [
        ("users", &t_users),
        ("videos", &t_videos),
        ("comments", &t_comments),
        ("ratings", &t_ratings),
        ("plays", &t_plays),
    ] {
        let f = t.failed.load(Ordering::Relaxed);
        failed += f;
        println!(
            "{name:<10} {:>9} {:>9} {f:>9}",
            t.created.load(Ordering::Relaxed),
            t.skipped.load(Ordering::Relaxed)
        );
    }
    println!("elapsed {:.1}s", started.elapsed().as_secs_f64());
    if failed > 0 {
        anyhow::bail!("{failed} calls failed");
    }
    Ok(())
}
