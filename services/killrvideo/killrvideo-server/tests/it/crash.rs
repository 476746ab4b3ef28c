//! Anything acknowledged survives a crash: the embedded server SIGKILLed in the middle of a burst of video
//! submissions, restarted on the same files, ends with every acknowledged video searchable exactly once. (The
//! in-process bus used to let the outbox delete an event a consumer had only queued, so a crash lost it.)

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use keel_common::testsuite::{ServiceProcess, eventually};
use keel_protos::killrvideo::{
    search::{SearchVideosRequest, search_service_client::SearchServiceClient},
    video_catalog::{
        SubmitYouTubeVideoRequest, video_catalog_service_client::VideoCatalogServiceClient,
    },
};
use killrvideo::testsuite::pb;
use tonic::transport::Channel;
use uuid::Uuid;

/// Submissions acknowledged before the kill.
const ACKED_BEFORE_KILL: usize = 300;

fn server(dir: &std::path::Path) -> ServiceProcess {
    ServiceProcess::bare(
        "killrvideo-server",
        &[
            ("KEEL_DATABASE__DIR", dir.display().to_string()),
            ("KEEL_GRPC__LISTEN_ADDR", "127.0.0.1:0".into()),
        ],
    )
}

/// The ids of the videos a search for `word` finds.
async fn found(search: &mut SearchServiceClient<Channel>, word: &str) -> Vec<String> {
    search
        .search_videos(SearchVideosRequest {
            query: word.to_owned(),
            page_size: 10,
            paging_state: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .videos
        .into_iter()
        .filter_map(|v| v.video_id)
        .map(|v| v.value)
        .collect()
}

async fn channel(p: &ServiceProcess) -> Channel {
    Channel::from_shared(format!("http://{}", p.addr().await))
        .unwrap()
        .connect()
        .await
        .unwrap()
}

#[tokio::test]
async fn a_sigkill_during_a_burst_of_submissions_loses_no_acknowledged_video() {
    let dir = std::env::temp_dir().join(format!("keel-crash-{}", Uuid::new_v4().simple()));
    let first = server(&dir);
    let ch = channel(&first).await;
    let acked: Arc<Mutex<Vec<(Uuid, String)>>> = Arc::default();
    let user = Uuid::new_v4();
    let workers: Vec<_> = (0..32)
        .map(|_| {
            let (acked, mut videos) = (acked.clone(), VideoCatalogServiceClient::new(ch.clone()));
            tokio::spawn(async move {
                loop {
                    let (id, word) = (Uuid::new_v4(), format!("burst{}", Uuid::new_v4().simple()));
                    let submitted = videos
                        .submit_you_tube_video(SubmitYouTubeVideoRequest {
                            video_id: pb(id),
                            user_id: pb(user),
                            name: format!("crash test {word}"),
                            // Many distinct words: indexing lags behind the writes, so events are in
                            // flight to the consumers when the process dies.
                            description: (0..400).map(|i| format!("w{i} ")).collect(),
                            tags: vec!["crash".into()],
                            you_tube_video_id: "dQw4w9WgXcQ".into(),
                        })
                        .await;
                    match submitted {
                        Ok(_) => acked.lock().unwrap().push((id, word)),
                        Err(_) => return, // the server is gone
                    }
                }
            })
        })
        .collect();
    eventually(
        "submissions acknowledged",
        Duration::from_secs(120),
        || async { (acked.lock().unwrap().len() >= ACKED_BEFORE_KILL).then_some(()) },
    )
    .await;
    first.signal("KILL");
    for w in workers {
        w.await.unwrap();
    }
    let acked = acked.lock().unwrap().clone();
    assert!(acked.len() >= ACKED_BEFORE_KILL);

    let second = server(&dir);
    let mut search = SearchServiceClient::new(channel(&second).await);
    let missing = Arc::new(Mutex::new(acked.clone()));
    eventually(
        "every acknowledged video searchable after the restart",
        Duration::from_secs(60),
        || {
            let (mut search, missing) = (search.clone(), missing.clone());
            async move {
                let left = std::mem::take(&mut *missing.lock().unwrap());
                let mut still = Vec::new();
                for (id, word) in left {
                    let ids = found(&mut search, &word).await;
                    assert!(ids.len() <= 1, "{word} indexed more than once: {ids:?}");
                    if ids != [id.to_string()] {
                        still.push((id, word));
                    }
                }
                let done = still.is_empty();
                *missing.lock().unwrap() = still;
                done.then_some(())
            }
        },
    )
    .await;
    // Nothing is left for a third start to find either: the count is stable.
    let (_, word) = &acked[0];
    assert_eq!(found(&mut search, word).await.len(), 1);
    drop(second);
    let _ = std::fs::remove_dir_all(&dir);
}
