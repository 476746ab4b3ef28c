//! End to end against the cluster: every KillrVideo service as its own process (the binaries `make test`
//! builds), each registered in the real Consul with its own database on the real PostgreSQL, events over the
//! real Kafka; the client knows only service names and finds them through Consul DNS SRV.
//!
//! A user signs up, logs in, submits videos, comments, rates and plays; every read is right at once; search
//! and related videos follow within seconds through Kafka. Then Kafka is stopped, a video is submitted and the
//! video-catalog process is SIGKILLed before it could publish; after Kafka and the process come back the
//! event arrives and the video becomes searchable: nothing is lost.

use std::{
    collections::HashMap,
    path::PathBuf,
    process::Command,
    time::{Duration, Instant},
};

use keel_common::{
    ClientFactory, Metrics,
    config::{Env, Settings},
    testsuite::{ServiceProcess, eventually, infra_var, passing_ports},
};
use keel_protos::killrvideo::{
    comments::{
        CommentOnVideoRequest, GetVideoCommentsRequest,
        comments_service_client::CommentsServiceClient,
    },
    common::TimeUuid,
    ratings::{GetRatingRequest, RateVideoRequest, ratings_service_client::RatingsServiceClient},
    search::{SearchVideosRequest, search_service_client::SearchServiceClient},
    statistics::{
        GetNumberOfPlaysRequest, RecordPlaybackStartedRequest,
        statistics_service_client::StatisticsServiceClient,
    },
    suggested_videos::{
        GetRelatedVideosRequest, GetSuggestedForUserRequest,
        suggested_video_service_client::SuggestedVideoServiceClient,
    },
    user_management::{
        CreateUserRequest, VerifyCredentialsRequest,
        user_management_service_client::UserManagementServiceClient,
    },
    video_catalog::{
        GetUserVideoPreviewsRequest, GetVideoRequest, SubmitYouTubeVideoRequest,
        video_catalog_service_client::VideoCatalogServiceClient,
    },
};
use killrvideo::testsuite::pb;
use tonic::{Code, Request};
use uuid::Uuid;

const SERVICES: &[&str] = &[
    "user-management",
    "video-catalog",
    "comments",
    "ratings",
    "statistics",
    "search",
    "suggested-videos",
];

fn infra(action: &str, component: &str) {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../scripts/infra.sh");
    let out = Command::new("bash")
        .arg(script)
        .args([action, component])
        .output()
        .expect("infra.sh");
    assert!(
        out.status.success(),
        "infra.sh {action} {component}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The service processes of one test run (killed on drop, by `ServiceProcess`).
struct Cluster {
    run: String,
    db_urls: HashMap<&'static str, String>,
    procs: HashMap<&'static str, ServiceProcess>,
}

impl Cluster {
    async fn start() -> Self {
        let run = Uuid::new_v4().simple().to_string()[..8].to_owned();
        let mut db_urls = HashMap::new();
        for s in SERVICES {
            db_urls.insert(*s, killrvideo::testsuite::postgres().await.url);
        }
        let mut c = Cluster {
            run,
            db_urls,
            procs: HashMap::new(),
        };
        for s in SERVICES {
            c.spawn(s);
        }
        c
    }

    fn name(&self, service: &str) -> String {
        format!("{service}-{}", self.run)
    }

    fn spawn(&mut self, service: &'static str) {
        let p = ServiceProcess::spawn(
            service,
            &self.name(service),
            &[
                ("KEEL_DATABASE__URL", self.db_urls[service].clone()),
                ("KEEL_EVENTS__GROUP_PREFIX", format!("test-{}", self.run)),
                ("KEEL_LOG__LEVEL", "info".into()),
            ],
        );
        self.procs.insert(service, p);
    }

    /// SIGKILLs `service`; returns what it had printed.
    fn kill(&mut self, service: &str) -> String {
        let mut p = self.procs.remove(service).expect("a running service");
        p.kill();
        p.output()
    }

    /// Waits until every service has a passing instance in Consul.
    async fn wait_passing(&self) {
        for s in SERVICES {
            passing_ports(&self.name(s), 1, Duration::from_secs(60)).await;
        }
    }
}

fn req<T>(m: T) -> Request<T> {
    let mut r = Request::new(m);
    r.set_timeout(Duration::from_secs(10));
    r
}

fn video(id: Uuid, user: Uuid, name: &str, tags: &[&str]) -> SubmitYouTubeVideoRequest {
    SubmitYouTubeVideoRequest {
        video_id: pb(id),
        user_id: pb(user),
        name: name.into(),
        description: format!("{name} trailer"),
        tags: tags.iter().map(|t| t.to_string()).collect(),
        you_tube_video_id: "dQw4w9WgXcQ".into(),
    }
}

#[tokio::test]
async fn killrvideo_across_processes_through_consul_kafka_and_postgres() {
    let mut cluster = Cluster::start().await;
    cluster.wait_passing().await;
    let env = Env::default()
        .with("CONSUL_HTTP_ADDR", infra_var("CONSUL_HTTP_ADDR"))
        .with("KEEL_CONSUL__DNS_ADDR", infra_var("KEEL_CONSUL_DNS_ADDR"))
        .with("KEEL_CONSUL__DISCOVERY_INTERVAL", "500ms");
    let clients = ClientFactory::new(
        &Settings::from_env("kv-test-client", &env).unwrap(),
        Metrics::disabled(),
    );
    let ch = |s: &str| clients.channel(&cluster.name(s)).unwrap();
    let mut users = UserManagementServiceClient::new(ch("user-management"));
    let mut videos = VideoCatalogServiceClient::new(ch("video-catalog"));
    let mut comments = CommentsServiceClient::new(ch("comments"));
    let mut ratings = RatingsServiceClient::new(ch("ratings"));
    let mut stats = StatisticsServiceClient::new(ch("statistics"));
    let search = SearchServiceClient::new(ch("search"));
    let suggested = SuggestedVideoServiceClient::new(ch("suggested-videos"));

    // The first call waits for the channel's first DNS answer.
    let user = Uuid::new_v4();
    let email = format!("{user}@example.com");
    let create = CreateUserRequest {
        user_id: pb(user),
        first_name: "Patrick".into(),
        last_name: "McFadin".into(),
        email: email.clone(),
        password: "cassandra".into(),
    };
    eventually(
        "user-management reachable through consul dns",
        Duration::from_secs(20),
        || {
            let mut u = users.clone();
            let r = create.clone();
            async move {
                match u.create_user(req(r)).await {
                    Ok(_) => Some(()),
                    Err(s) if s.code() == Code::AlreadyExists => Some(()),
                    Err(_) => None,
                }
            }
        },
    )
    .await;
    let login = users
        .verify_credentials(req(VerifyCredentialsRequest {
            email,
            password: "cassandra".into(),
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(login.user_id, pb(user));

    let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
    let tag = format!("kafkatag{}", cluster.run);
    eventually("video-catalog reachable", Duration::from_secs(20), || {
        let mut v = videos.clone();
        let r = video(a, user, "The Data Model Is Dead", &[&tag, "cassandra"]);
        async move {
            match v.submit_you_tube_video(req(r)).await {
                Ok(_) => Some(()),
                Err(s) if s.code() == Code::AlreadyExists => Some(()),
                Err(_) => None,
            }
        }
    })
    .await;
    videos
        .submit_you_tube_video(req(video(b, user, "Long Live The Data Model", &[&tag])))
        .await
        .unwrap();
    let v = videos
        .get_video(req(GetVideoRequest { video_id: pb(a) }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(v.name, "The Data Model Is Dead");
    let mine = videos
        .get_user_video_previews(req(GetUserVideoPreviewsRequest {
            user_id: pb(user),
            page_size: 10,
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        mine.video_previews
            .iter()
            .map(|p| p.video_id.clone())
            .collect::<Vec<_>>(),
        vec![pb(b), pb(a)]
    );

    let comment_id = Uuid::now_v1(&[9, 8, 7, 6, 5, 4]);
    eventually("comments reachable", Duration::from_secs(20), || {
        let mut c = comments.clone();
        async move {
            c.comment_on_video(req(CommentOnVideoRequest {
                video_id: pb(a),
                user_id: pb(user),
                comment_id: Some(TimeUuid {
                    value: comment_id.to_string(),
                }),
                comment: "first!".into(),
            }))
            .await
            .ok()
        }
    })
    .await;
    let page = comments
        .get_video_comments(req(GetVideoCommentsRequest {
            video_id: pb(a),
            page_size: 1,
            starting_comment_id: Some(TimeUuid {
                value: comment_id.to_string(),
            }),
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(page.comments[0].comment, "first!");

    let rater = Uuid::new_v4();
    eventually("ratings reachable", Duration::from_secs(20), || {
        let mut r = ratings.clone();
        async move {
            r.rate_video(req(RateVideoRequest {
                video_id: pb(a),
                user_id: pb(user),
                rating: 5,
            }))
            .await
            .ok()
        }
    })
    .await;
    ratings
        .rate_video(req(RateVideoRequest {
            video_id: pb(a),
            user_id: pb(rater),
            rating: 4,
        }))
        .await
        .unwrap();
    ratings
        .rate_video(req(RateVideoRequest {
            video_id: pb(b),
            user_id: pb(rater),
            rating: 5,
        }))
        .await
        .unwrap();
    let r = ratings
        .get_rating(req(GetRatingRequest { video_id: pb(a) }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((r.ratings_count, r.ratings_total), (2, 9));

    eventually("statistics reachable", Duration::from_secs(20), || {
        let mut s = stats.clone();
        async move {
            s.record_playback_started(req(RecordPlaybackStartedRequest { video_id: pb(a) }))
                .await
                .ok()
        }
    })
    .await;
    stats
        .record_playback_started(req(RecordPlaybackStartedRequest { video_id: pb(a) }))
        .await
        .unwrap();
    let plays = stats
        .get_number_of_plays(req(GetNumberOfPlaysRequest {
            video_ids: vec![pb(a).unwrap(), pb(b).unwrap()],
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        plays.stats.iter().map(|s| s.views).collect::<Vec<_>>(),
        vec![2, 0]
    );

    // Through Kafka: search and suggestions.
    let search_finds = |query: String, want: usize| {
        let search = search.clone();
        move || {
            let mut s = search.clone();
            let q = query.clone();
            async move {
                let r = s
                    .search_videos(req(SearchVideosRequest {
                        query: q,
                        page_size: 10,
                        ..Default::default()
                    }))
                    .await
                    .ok()?;
                (r.into_inner().videos.len() == want).then_some(())
            }
        }
    };
    eventually(
        "new videos searchable through kafka",
        Duration::from_secs(60),
        search_finds(tag.clone(), 2),
    )
    .await;
    eventually(
        "related videos through kafka",
        Duration::from_secs(30),
        || {
            let mut s = suggested.clone();
            async move {
                let r = s
                    .get_related_videos(req(GetRelatedVideosRequest {
                        video_id: pb(a),
                        page_size: 4,
                        ..Default::default()
                    }))
                    .await
                    .ok()?
                    .into_inner();
                (r.videos.first()?.video_id == pb(b)).then_some(())
            }
        },
    )
    .await;
    // user liked a; rater liked a and b: b is suggested to user.
    eventually(
        "suggestions from a similar user",
        Duration::from_secs(30),
        || {
            let mut s = suggested.clone();
            async move {
                let r = s
                    .get_suggested_for_user(req(GetSuggestedForUserRequest {
                        user_id: pb(user),
                        page_size: 1,
                        ..Default::default()
                    }))
                    .await
                    .ok()?
                    .into_inner();
                (r.videos.first()?.video_id == pb(b)).then_some(())
            }
        },
    )
    .await;

    // Kafka down: the write still succeeds at once; the process dies before it could publish.
    infra("stop", "kafka");
    let c = Uuid::new_v4();
    let lost_tag = format!("outagetag{}", cluster.run);
    let t = Instant::now();
    videos
        .submit_you_tube_video(req(video(
            c,
            user,
            "Written While Kafka Was Down",
            &[&lost_tag],
        )))
        .await
        .unwrap();
    assert!(
        t.elapsed() < Duration::from_secs(3),
        "the write does not wait for Kafka: {:?}",
        t.elapsed()
    );
    // Long enough for the relay's publish to time out (events.delivery_timeout, 5 s) and be logged.
    tokio::time::sleep(Duration::from_secs(7)).await;
    let killed_log = cluster.kill("video-catalog");
    infra("start", "kafka");
    cluster.spawn("video-catalog");
    eventually(
        "the event written during the outage arrives",
        Duration::from_secs(90),
        search_finds(lost_tag, 1),
    )
    .await;
    assert!(
        killed_log.contains("outbox relay failed"),
        "the relay saw Kafka down before the kill"
    );
}
