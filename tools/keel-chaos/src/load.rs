//! The load: a steady rate of real calls, each service found through Consul DNS with the platform's client
//! stack, cycling through KillrVideo reads and writes and cache writes and reads:
//!
//! | op | call |
//! |---|---|
//! | `cache.Store` | a new key of the load's account (64 bytes) |
//! | `cache.Get` | a key stored earlier; its value must come back (a wrong or missing value counts as failed) |
//! | `user-management.GetUserProfile` | the load's user |
//! | `video-catalog.GetVideo` | a video submitted earlier |
//! | `video-catalog.SubmitYouTubeVideo` | a new video of the load's user |
//! | `video-catalog.GetLatestVideoPreviews` | the first page of 5 |
//!
//! Every call's outcome goes to stdout as one JSON line, `{"at": <unix ms>, "op": …, "code": "OK", "ms": …}`
//! (a failed call's with its status `message`),
//! so a fault's effect can be read second by second. First comes `{"ready": true}` once the load's account,
//! user and first video exist; on SIGINT/SIGTERM the load stops starting calls, lets those in flight end, and
//! prints `{"end": true, …}` with
//! - `keys_stored`, `keys_held`, `used_cache_keys`: the keys whose Store was acknowledged, the keys the cache
//!   instances hold (each asked for its `Dump`) and what the accounts service counts for the account, which a
//!   quota that stayed exact keeps equal to what is held;
//! - `videos_submitted`, `videos_indexed`, `videos_duplicated`: the videos whose submission was acknowledged,
//!   how many of them the search read model (fed by their `YouTubeVideoAdded` events through Kafka) finds by
//!   the load's own tag, and how many it lists more than once — waiting up to a minute for the events to
//!   arrive: an acknowledged write whose event never arrives is lost.

use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::Context as _;
use keel_common::{
    ClientFactory, Metrics,
    config::{Env, Secret, Settings},
    context::set_bearer_token,
    routing::set_routing_key,
};
use keel_protos::{
    killrvideo::{
        common::Uuid as PbUuid,
        search::{SearchVideosRequest, search_service_client::SearchServiceClient},
        user_management::{
            CreateUserRequest, GetUserProfileRequest,
            user_management_service_client::UserManagementServiceClient,
        },
        video_catalog::{
            GetLatestVideoPreviewsRequest, GetVideoRequest, SubmitYouTubeVideoRequest,
            video_catalog_service_client::VideoCatalogServiceClient,
        },
    },
    rpc::{
        CreateAccountReq, DumpReq, GetByTokenReq, GetReq, StoreReq,
        accounts_client::AccountsClient, cache_client::CacheClient,
    },
};
use tonic::{Code, Request, Status};

/// `keel-chaos load`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Calls started per second, evenly spaced.
    #[arg(long, default_value_t = 40)]
    rate: u32,
    /// The accounts operator token (creates the load's cache account).
    #[arg(long, env = "KEEL_FLEET_ADMIN_TOKEN", hide_env_values = true)]
    admin_token: String,
}

type Channel = keel_common::client::Channel;

/// What the load made and uses.
struct State {
    cache: CacheClient<Channel>,
    users: UserManagementServiceClient<Channel>,
    videos: VideoCatalogServiceClient<Channel>,
    token: String,
    user: PbUuid,
    /// The tag of every video of this load, its search term.
    tag: String,
    stored: Mutex<Vec<String>>,
    submitted: Mutex<Vec<PbUuid>>,
    seq: std::sync::atomic::AtomicU64,
}

const OPS: [&str; 6] = [
    "cache.Store",
    "cache.Get",
    "user-management.GetUserProfile",
    "video-catalog.GetVideo",
    "video-catalog.SubmitYouTubeVideo",
    "video-catalog.GetLatestVideoPreviews",
];

fn uuid() -> PbUuid {
    PbUuid {
        value: uuid::Uuid::new_v4().to_string(),
    }
}

fn value_of(key: &str) -> Vec<u8> {
    let mut v = key.as_bytes().to_vec();
    v.resize(64, b'.');
    v
}

/// Set when stdout is closed (the reader went away).
static GONE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Writes `line` to stdout, one line, flushed; a closed stdout sets [`GONE`] instead of panicking.
fn emit(line: &serde_json::Value) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    if writeln!(out, "{line}").and_then(|()| out.flush()).is_err() {
        GONE.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Runs the load until SIGINT or SIGTERM.
///
/// # Errors
/// The fleet's services do not answer the set-up calls within two minutes.
pub async fn run(args: Args) -> anyhow::Result<()> {
    let settings = Settings::from_env("keel-chaos", &Env::from_process())
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let clients = ClientFactory::new(&settings, Metrics::disabled());
    let state = Arc::new(setup(&clients, &args.admin_token).await?);
    emit(&serde_json::json!({ "ready": true }));

    let (stop_tx, mut stop) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        keel_common::shutdown::signal().await;
        let _ = stop_tx.send(true);
    });
    let mut tick = tokio::time::interval(Duration::from_secs(1) / args.rate.max(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut calls = tokio::task::JoinSet::new();
    let mut n = 0usize;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => break,
        }
        // Whoever reads the outcomes went away: nothing left to measure for.
        if GONE.load(std::sync::atomic::Ordering::Relaxed) {
            break;
        }
        let op = OPS[n % OPS.len()];
        n += 1;
        let state = state.clone();
        calls.spawn(async move {
            let at = now_ms();
            let start = Instant::now();
            let (code, message) = match call(&state, op).await {
                Ok(()) => (Code::Ok, None),
                Err(s) => (s.code(), Some(s.message().to_owned())),
            };
            let ms = start.elapsed().as_secs_f64() * 1e3;
            let mut line = serde_json::json!({
                "at": at, "op": op, "code": keel_common::metrics::code_name(code), "ms": ms
            });
            if let Some(m) = message {
                line["message"] = m.into();
            }
            emit(&line);
        });
        while calls.try_join_next().is_some() {}
    }
    while calls.join_next().await.is_some() {}
    let used = AccountsClient::new(clients.channel("accounts")?)
        .get_by_token(GetByTokenReq {
            token: state.token.clone(),
        })
        .await
        .ok()
        .and_then(|r| r.into_inner().account)
        .map(|a| a.used_cache_keys);
    let stored = state.stored.lock().expect("stored").len();
    let held = held(&clients, &settings, &state.token).await;
    let submitted: Vec<String> = state
        .submitted
        .lock()
        .expect("submitted")
        .iter()
        .map(|v| v.value.clone())
        .collect();
    let search = SearchServiceClient::new(clients.channel("search")?);
    let (indexed, duplicated) = indexed(search, &state.tag, &submitted).await;
    emit(&serde_json::json!({
        "end": true, "keys_stored": stored, "keys_held": held, "used_cache_keys": used,
        "videos_submitted": submitted.len(), "videos_indexed": indexed,
        "videos_duplicated": duplicated,
    }));
    Ok(())
}

/// The keys of the load's account that the cache instances hold, in all: each instance found through Consul
/// DNS asked for its `Dump` (`None` when one cannot be).
async fn held(clients: &ClientFactory, settings: &Settings, token: &str) -> Option<u64> {
    use futures::StreamExt;
    let resolver = keel_common::discovery::SrvResolver::new(settings.consul.dns_addr);
    let mut total = 0;
    for addr in resolver.resolve("cache").await.ok()? {
        let (_tx, one) = tokio::sync::watch::channel(Some(vec![addr]));
        let mut items = CacheClient::new(clients.balanced("cache", one))
            .dump(DumpReq {
                account_token: token.to_owned(),
            })
            .await
            .ok()?
            .into_inner();
        while let Some(item) = items.next().await {
            item.ok()?;
            total += 1;
        }
    }
    Some(total)
}

/// How many of `submitted` the search service lists for `tag`, and how many of those more than once, once
/// every one is there or after a minute.
async fn indexed(
    mut search: SearchServiceClient<Channel>,
    tag: &str,
    submitted: &[String],
) -> (usize, usize) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let mut seen: std::collections::HashMap<String, usize> = Default::default();
        let mut paging_state = String::new();
        loop {
            let Ok(page) = search
                .search_videos(SearchVideosRequest {
                    query: tag.to_owned(),
                    page_size: 1000,
                    paging_state: paging_state.clone(),
                })
                .await
            else {
                break;
            };
            let page = page.into_inner();
            for v in page.videos {
                if let Some(id) = v.video_id {
                    *seen.entry(id.value).or_default() += 1;
                }
            }
            if page.paging_state.is_empty() {
                break;
            }
            paging_state = page.paging_state;
        }
        let found = submitted.iter().filter(|v| seen.contains_key(*v)).count();
        let twice = seen.values().filter(|n| **n > 1).count();
        if found == submitted.len() || Instant::now() > deadline {
            return (found, twice);
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// The load's account, user and first video, retried until the fleet answers (two minutes at most).
async fn setup(clients: &ClientFactory, admin_token: &str) -> anyhow::Result<State> {
    let cache = CacheClient::new(clients.keyed_channel("cache")?);
    let users = UserManagementServiceClient::new(clients.channel("user-management")?);
    let mut videos = VideoCatalogServiceClient::new(clients.channel("video-catalog")?);
    let mut accounts = AccountsClient::new(clients.channel("accounts")?);
    let deadline = Instant::now() + Duration::from_secs(120);
    let retry = |what: &'static str, e: Status| {
        if Instant::now() > deadline {
            return Err(anyhow::anyhow!("{what}: {e}"));
        }
        Ok(())
    };
    let token = loop {
        let mut req = Request::new(CreateAccountReq {
            name: format!("chaos-{}", &uuid().value[..8]),
            max_cache_keys: 10_000_000,
        });
        set_bearer_token(&mut req, &Secret::new(admin_token));
        match accounts.create_account(req).await {
            Ok(r) => break r.into_inner().token,
            Err(e) => retry("creating the cache account", e)?,
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    };
    let user = uuid();
    loop {
        let r = users
            .clone()
            .create_user(CreateUserRequest {
                user_id: Some(user.clone()),
                first_name: "Chaos".into(),
                last_name: "Load".into(),
                email: format!("chaos-{}@keel.invalid", user.value),
                password: "chaos-load-password".into(),
            })
            .await;
        match r {
            Ok(_) => break,
            Err(e) if e.code() == Code::AlreadyExists => break,
            Err(e) => retry("creating the load's user", e)?,
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let first = uuid();
    let tag = format!("chaos{}", &uuid().value[..8]);
    loop {
        match videos
            .submit_you_tube_video(submission(&first, &user, &tag))
            .await
        {
            Ok(_) => break,
            Err(e) if e.code() == Code::AlreadyExists => break,
            Err(e) => retry("submitting the first video", e)?,
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    Ok(State {
        cache,
        users,
        videos,
        token,
        user,
        tag,
        stored: Mutex::new(Vec::new()),
        submitted: Mutex::new(vec![first]),
        seq: Default::default(),
    })
}

fn submission(video: &PbUuid, user: &PbUuid, tag: &str) -> SubmitYouTubeVideoRequest {
    SubmitYouTubeVideoRequest {
        video_id: Some(video.clone()),
        user_id: Some(user.clone()),
        name: format!("Chaos {}", &video.value[..8]),
        description: "A video of the chaos load".into(),
        tags: vec![tag.to_owned()],
        you_tube_video_id: "dQw4w9WgXcQ".into(),
    }
}

/// One call of kind `op`.
async fn call(s: &State, op: &str) -> Result<(), Status> {
    let n = s.seq.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    match op {
        "cache.Store" => {
            let key = format!("k{n}");
            let mut req = Request::new(StoreReq {
                key: key.clone(),
                val: value_of(&key),
                account_token: s.token.clone(),
                ttl_ms: 0,
            });
            set_routing_key(&mut req, &key);
            s.cache.clone().store(req).await?;
            s.stored.lock().expect("stored").push(key);
        }
        "cache.Get" => {
            let key = {
                let stored = s.stored.lock().expect("stored");
                match stored.len() {
                    0 => return Ok(()),
                    len => stored[(n as usize * 7919) % len].clone(),
                }
            };
            let mut req = Request::new(GetReq {
                key: key.clone(),
                account_token: s.token.clone(),
            });
            set_routing_key(&mut req, &key);
            let got = s.cache.clone().get(req).await?.into_inner().val;
            if got != value_of(&key) {
                return Err(Status::data_loss(format!("{key}: another value came back")));
            }
        }
        "user-management.GetUserProfile" => {
            let profiles = s
                .users
                .clone()
                .get_user_profile(GetUserProfileRequest {
                    user_ids: vec![s.user.clone()],
                })
                .await?
                .into_inner()
                .profiles;
            if profiles.len() != 1 {
                return Err(Status::not_found("the load's user is missing"));
            }
        }
        "video-catalog.GetVideo" => {
            let video = {
                let submitted = s.submitted.lock().expect("submitted");
                submitted[(n as usize * 7919) % submitted.len()].clone()
            };
            s.videos
                .clone()
                .get_video(GetVideoRequest {
                    video_id: Some(video),
                })
                .await?;
        }
        "video-catalog.SubmitYouTubeVideo" => {
            let video = uuid();
            s.videos
                .clone()
                .submit_you_tube_video(submission(&video, &s.user, &s.tag))
                .await?;
            s.submitted.lock().expect("submitted").push(video);
        }
        _ => {
            s.videos
                .clone()
                .get_latest_video_previews(GetLatestVideoPreviewsRequest {
                    page_size: 5,
                    ..Default::default()
                })
                .await?;
        }
    }
    Ok(())
}

/// The load's lines, parsed.
#[derive(Clone, Debug, serde::Deserialize)]
pub struct Outcome {
    /// When the call started, unix ms.
    pub at: u64,
    /// Its kind.
    pub op: String,
    /// Its status code name.
    pub code: String,
    /// How long it took, ms.
    pub ms: f64,
    /// The status message of a failed call.
    #[serde(default)]
    pub message: Option<String>,
}

impl Outcome {
    /// Whether it failed.
    pub fn failed(&self) -> bool {
        self.code != "OK"
    }
}

/// The load's `end` line.
#[derive(Clone, Debug, serde::Deserialize)]
pub struct End {
    /// Cache keys whose Store was acknowledged.
    pub keys_stored: u64,
    /// Keys of the load's account the cache instances hold (`None`: one could not be asked).
    pub keys_held: Option<u64>,
    /// What accounts counts for the load's account (`None`: it did not answer).
    pub used_cache_keys: Option<u64>,
    /// Videos whose submission was acknowledged.
    pub videos_submitted: u64,
    /// How many of them search finds.
    pub videos_indexed: u64,
    /// How many of them search lists more than once.
    pub videos_duplicated: u64,
}

/// Parses the load's output (lines that are neither outcomes nor the end line are skipped).
///
/// # Errors
/// An outcome or the end line does not have its fields.
pub fn parse(output: &str) -> anyhow::Result<(Vec<Outcome>, Option<End>)> {
    let mut outcomes = Vec::new();
    let mut end = None;
    for line in output.lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if v["end"] == true {
            end = Some(serde_json::from_value(v).context("the end line")?);
        } else if v.get("op").is_some() {
            outcomes.push(serde_json::from_value(v)?);
        }
    }
    Ok((outcomes, end))
}
