//! The video lab as its own process, registered in the real Consul, on the real PostgreSQL: the seed's grpcurl
//! commands as written (`-proto video_service.proto`, and reflection's `list`) against the instance Consul
//! reports, and every kind of call through the platform's channel found by Consul DNS.

mod streams;

use std::{io::Write, process::Stdio, time::Duration};

use keel_common::{
    ClientFactory, Metrics,
    config::{Env, Settings},
    testsuite::{self, ServiceProcess, infra_var, passing_ports},
};
use keel_protos::video_service::{
    ListVideosRequest, Video, VideoRequest, video_service_client::VideoServiceClient,
};
use tonic::Code;

fn proto_dir() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../protos/stack/video_service")
}

/// A client factory of another process's kind: Consul DNS for discovery, nothing else.
fn clients() -> ClientFactory {
    let env = Env::default()
        .with("CONSUL_HTTP_ADDR", infra_var("CONSUL_HTTP_ADDR"))
        .with("KEEL_CONSUL__DNS_ADDR", infra_var("KEEL_CONSUL_DNS_ADDR"));
    ClientFactory::new(
        &Settings::from_env("lab-client", &env).unwrap(),
        Metrics::disabled(),
    )
}

/// The server-side call-log lines of `method` (`GetVideo`): (messages received, messages sent, status).
fn served(p: &ServiceProcess, method: &str) -> Vec<(Option<u64>, Option<u64>, Option<String>)> {
    p.lines()
        .iter()
        .filter(|l| {
            l["message"] == "grpc call"
                && l["fields"]["side"] == "server"
                && l["fields"]["method"] == format!("/video_service.VideoService/{method}")
        })
        .map(|l| {
            (
                l["fields"]["messages_received"].as_u64(),
                l["fields"]["messages_sent"].as_u64(),
                l["fields"]["status"].as_str().map(str::to_owned),
            )
        })
        .collect()
}

/// `grpcurl -proto video_service.proto -plaintext [-d DATA] ADDR METHOD`, with `stdin` for `-d @`; stdout.
fn grpcurl(addr: &str, method: &str, data: Option<&str>, stdin: Option<&str>) -> String {
    let mut cmd = std::process::Command::new(infra_var("KEEL_GRPCURL"));
    cmd.arg("-import-path")
        .arg(proto_dir())
        .args(["-proto", "video_service.proto", "-plaintext"]);
    if let Some(d) = data {
        cmd.args(["-d", d]);
    }
    let mut child = cmd
        .args([addr, method])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("grpcurl");
    if let Some(input) = stdin {
        child
            .stdin
            .take()
            .unwrap()
            .write_all(input.as_bytes())
            .unwrap();
    }
    drop(child.stdin.take());
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "grpcurl {method}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// The JSON objects grpcurl printed, one per message.
fn messages(text: &str) -> Vec<serde_json::Value> {
    serde_json::Deserializer::from_str(text)
        .into_iter::<serde_json::Value>()
        .map(Result::unwrap)
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_seeds_grpcurl_session_and_every_kind_of_call_through_consul_dns() {
    let name = format!("video-lab-{}", &testsuite::unique("v")[2..10]);
    let db = testsuite::postgres().await;
    let p = ServiceProcess::spawn(
        "video-lab",
        &name,
        &[("KEEL_DATABASE__URL", db.url.clone())],
    );
    let port = passing_ports(&name, 1, Duration::from_secs(60)).await[0];
    let addr = format!("127.0.0.1:{port}");

    // The seed's commands, as written.
    for id in ["2", "1"] {
        let added = grpcurl(
            &addr,
            "video_service.VideoService/AddVideo",
            Some(&format!(
                r#"{{"id":"{id}", "title": "Sample Video", "author": "John Doe", "url": "https://example.com/sample.mp4", "duration": 120}}"#
            )),
            None,
        );
        assert_eq!(messages(&added)[0]["id"], id);
    }
    let listed = messages(&grpcurl(
        &addr,
        "video_service.VideoService/ListVideos",
        None,
        None,
    ));
    let ids: Vec<&str> = listed.iter().map(|v| v["id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["1", "2"], "every video, in id order");
    assert_eq!(listed[0]["duration"], 120);
    let got = messages(&grpcurl(
        &addr,
        "video_service.VideoService/GetVideos",
        Some("@"),
        Some("{\"id\":\"2\"}\n{\"id\":\"1\"}\n"),
    ));
    let ids: Vec<&str> = got[0]["videos"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["2", "1"], "in the order asked");
    let each = messages(&grpcurl(
        &addr,
        "video_service.VideoService/GetVideo",
        Some("@"),
        Some("{\"id\":\"2\"}\n{\"id\":\"1\"}\n"),
    ));
    assert_eq!(each.len(), 2, "one answer per request");
    assert_eq!(
        (each[0]["id"].as_str(), each[1]["id"].as_str()),
        (Some("2"), Some("1"))
    );
    let listing = std::process::Command::new(infra_var("KEEL_GRPCURL"))
        .args(["--plaintext", &addr, "list"])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&listing.stdout)
            .lines()
            .any(|l| l == "video_service.VideoService")
    );

    // Every kind of call through the platform's channel, the service found by Consul DNS.
    let clients = clients();
    let mut lab = VideoServiceClient::new(clients.channel(&name).unwrap());
    let taken = lab
        .add_video(Video {
            id: "1".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(taken.code(), Code::AlreadyExists);
    let mut stream = lab
        .list_videos(ListVideosRequest {})
        .await
        .unwrap()
        .into_inner();
    let mut n = 0;
    while let Some(v) = stream.message().await.unwrap() {
        assert!(!v.id.is_empty());
        n += 1;
    }
    assert_eq!(n, 2);
    let ids = |list: &[&str]| {
        let reqs: Vec<VideoRequest> = list
            .iter()
            .map(|i| VideoRequest { id: (*i).into() })
            .collect();
        tokio_stream::iter(reqs)
    };
    let list = lab.get_videos(ids(&["1", "2"])).await.unwrap().into_inner();
    assert_eq!(list.videos.len(), 2);
    let missing = lab.get_videos(ids(&["1", "nope"])).await.unwrap_err();
    assert_eq!(missing.code(), Code::NotFound);
    assert!(missing.message().contains("nope"), "{missing:?}");

    // Bidirectional, interactively: each answer arrives before the next request is sent.
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    let mut answers = lab
        .get_video(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    for id in ["2", "1"] {
        tx.send(VideoRequest { id: id.into() }).await.unwrap();
        let v = answers.message().await.unwrap().expect("an answer");
        assert_eq!(v.id, id);
    }
    tx.send(VideoRequest { id: "nope".into() }).await.unwrap();
    assert_eq!(answers.message().await.unwrap_err().code(), Code::NotFound);

    // Each stream's call-log line counts its messages, each way, as the server saw them.
    let counts = |method: &str| served(&p, method);
    testsuite::eventually("the call log", Duration::from_secs(5), || async {
        (counts("GetVideo").len() == 2).then_some(())
    })
    .await;
    let ok = Some("OK".to_owned());
    assert!(
        counts("ListVideos").contains(&(Some(1), Some(2), ok.clone())),
        "{:?}",
        counts("ListVideos")
    );
    assert!(
        counts("GetVideos").contains(&(Some(2), Some(1), ok.clone())),
        "{:?}",
        counts("GetVideos")
    );
    assert!(
        counts("GetVideo").contains(&(Some(2), Some(2), ok)),
        "{:?}",
        counts("GetVideo")
    );
    assert!(
        counts("GetVideo").contains(&(Some(3), Some(2), Some("NOT_FOUND".to_owned()))),
        "{:?}",
        counts("GetVideo")
    );
}
