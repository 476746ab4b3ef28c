//! Streams at their limits, each kind through Consul DNS from this process to the video lab's: a deadline that
//! expires mid-stream, a reader that stops reading (HTTP/2 flow control holds the stream, not the server's
//! memory), and a SIGTERM of the server while streams are open (they finish within the drain timeout, and the
//! ones still open at its end get UNAVAILABLE, a status, not a cut connection).

use std::time::Duration;

use futures::StreamExt;
use keel_common::testsuite::{self, ServiceProcess, passing_ports};
use keel_protos::video_service::{
    ListVideosRequest, VideoRequest, video_service_client::VideoServiceClient,
};
use sqlx::Connection;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Request};

use super::{clients, served};

/// Each stored video's title is this long, so a listing is large next to HTTP/2's windows.
const TITLE_BYTES: usize = 2000;

/// A video lab on a fresh PostgreSQL database holding `videos` videos (ids `000001`…), registered in Consul,
/// with `env`; its client through Consul DNS.
async fn lab(
    videos: usize,
    env: &[(&str, String)],
) -> (
    ServiceProcess,
    VideoServiceClient<keel_common::client::Channel>,
) {
    let name = format!("video-lab-{}", &testsuite::unique("s")[2..10]);
    let db = testsuite::postgres().await;
    let mut all = vec![("KEEL_DATABASE__URL", db.url.clone())];
    all.extend(env.iter().cloned());
    let p = ServiceProcess::spawn("video-lab", &name, &all);
    passing_ports(&name, 1, Duration::from_secs(60)).await;
    // The service has migrated its database by now (it passes its checks only then).
    let mut conn = sqlx::PgConnection::connect(&db.url).await.unwrap();
    sqlx::query(
        "INSERT INTO videos (id, title, author, url, duration)
         SELECT lpad(g::text, 6, '0'), repeat('t', $1), 'author', 'https://example.com/v.mp4', g
         FROM generate_series(1, $2) AS g",
    )
    .bind(TITLE_BYTES as i32)
    .bind(videos as i32)
    .execute(&mut conn)
    .await
    .unwrap();
    let lab = VideoServiceClient::new(clients().channel(&name).unwrap());
    (p, lab)
}

/// `request` with a deadline of `timeout`.
fn within<T>(request: T, timeout: Duration) -> Request<T> {
    let mut r = Request::new(request);
    r.set_timeout(timeout);
    r
}

fn id(i: usize) -> VideoRequest {
    VideoRequest {
        id: format!("{i:06}"),
    }
}

/// The server's resident memory, in bytes (`VmRSS` of `/proc/<pid>/status`).
fn rss(p: &ServiceProcess) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{}/status", p.pid())).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .expect("VmRSS")
        * 1024
}

#[tokio::test(flavor = "multi_thread")]
async fn a_deadline_that_expires_mid_stream_ends_each_kind_with_deadline_exceeded() {
    // 4,000 videos of 2 KB: 8 MB, more than the client's HTTP/2 windows, so the listing cannot be sent in
    // full before a reader that pauses resumes.
    let (p, mut lab) = lab(4000, &[]).await;
    let deadline = Duration::from_millis(600);

    // Server streaming: a reader that pauses past the deadline gets what was sent, then the status.
    let mut list = lab
        .list_videos(within(ListVideosRequest {}, deadline))
        .await
        .unwrap()
        .into_inner();
    assert!(list.message().await.unwrap().is_some());
    tokio::time::sleep(deadline + Duration::from_millis(300)).await;
    let mut got = 1;
    let status = loop {
        match list.message().await {
            Ok(Some(_)) => got += 1,
            Ok(None) => panic!("the listing ended OK after {got} videos, past its deadline"),
            Err(s) => break s,
        }
    };
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    assert!(got < 4000, "{got} videos arrived");

    // Client streaming: two ids, then the client goes quiet.
    let quiet = tokio_stream::iter([id(1), id(2)]).chain(futures::stream::pending());
    let status = lab.get_videos(within(quiet, deadline)).await.unwrap_err();
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");

    // Bidirectional: one exchange, then the client neither sends nor closes.
    let (tx, rx) = mpsc::channel(1);
    let mut answers = lab
        .get_video(within(ReceiverStream::new(rx), deadline))
        .await
        .unwrap()
        .into_inner();
    tx.send(id(7)).await.unwrap();
    assert_eq!(answers.message().await.unwrap().unwrap().id, "000007");
    let status = answers.message().await.unwrap_err();
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");

    // The server ended each call itself, and recorded the status its client got: the two streams the
    // server answers on, with DEADLINE_EXCEEDED; the client stream, which the client's own deadline may
    // cancel first, ended (not left waiting for ids) after the two it read.
    testsuite::eventually("the call log", Duration::from_secs(5), || async {
        (served(&p, "GetVideos").len() == 1 && served(&p, "GetVideo").len() == 1).then_some(())
    })
    .await;
    let exceeded = Some("DEADLINE_EXCEEDED".to_owned());
    let listed = &served(&p, "ListVideos")[0];
    assert_eq!((listed.0, &listed.2), (Some(1), &exceeded), "{listed:?}");
    assert!(listed.1.unwrap() < 4000, "{listed:?}");
    assert_eq!(
        served(&p, "GetVideo")[0],
        (Some(1), Some(1), exceeded.clone())
    );
    let client_streamed = &served(&p, "GetVideos")[0];
    assert_eq!(client_streamed.0, Some(2), "{client_streamed:?}");
    assert!(
        [exceeded, Some("CANCELLED".to_owned())].contains(&client_streamed.2),
        "{client_streamed:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_reader_that_stops_reading_holds_the_stream_not_the_servers_memory() {
    // 30,000 videos of 2 KB: a 60 MB listing.
    let videos = 30_000;
    let (p, mut lab) = lab(videos, &[]).await;
    let idle = rss(&p);
    let mut list = lab
        .list_videos(within(ListVideosRequest {}, Duration::from_secs(120)))
        .await
        .unwrap()
        .into_inner();
    assert!(list.message().await.unwrap().is_some());
    // Long enough for a server that ignored flow control to have read the whole table into memory.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let stalled = rss(&p);
    let grown = stalled.saturating_sub(idle);
    assert!(
        grown < 20 << 20,
        "the server grew by {} MB while its reader stalled on a 60 MB listing",
        grown >> 20
    );
    // The stream was held, not dropped: reading again gets every video, in order.
    let mut got = 1;
    while let Some(v) = list.message().await.unwrap() {
        got += 1;
        assert_eq!(v.id, format!("{got:06}"));
    }
    assert_eq!(got, videos);
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_lets_open_streams_finish_within_the_drain_and_ends_the_rest_with_unavailable() {
    let drain = Duration::from_secs(2);
    let (mut p, mut lab) = lab(4000, &[("KEEL_GRPC__DRAIN_TIMEOUT", "2s".to_owned())]).await;

    // Open before the SIGTERM: two bidirectional streams, a client stream, a listing read once then paused.
    let mut bidi = Vec::new();
    for _ in 0..2 {
        let (tx, rx) = mpsc::channel(1);
        let mut answers = lab
            .get_video(ReceiverStream::new(rx))
            .await
            .unwrap()
            .into_inner();
        tx.send(id(1)).await.unwrap();
        assert_eq!(answers.message().await.unwrap().unwrap().id, "000001");
        bidi.push((tx, answers));
    }
    let (ids, rx) = mpsc::channel(1);
    let mut collecting = lab.clone();
    let collected =
        tokio::spawn(async move { collecting.get_videos(ReceiverStream::new(rx)).await });
    ids.send(id(1)).await.unwrap();
    let mut list = lab
        .list_videos(ListVideosRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(list.message().await.unwrap().is_some());

    let term = std::time::Instant::now();
    p.signal("TERM");
    // Well within the drain: the streams still carry messages each way, and those that end, end OK.
    tokio::time::sleep(Duration::from_millis(700)).await;
    let (tx, mut finishing) = bidi.remove(0);
    tx.send(id(2)).await.unwrap();
    assert_eq!(finishing.message().await.unwrap().unwrap().id, "000002");
    drop(tx);
    assert!(finishing.message().await.unwrap().is_none(), "ended OK");
    ids.send(id(3)).await.unwrap();
    drop(ids);
    let list_of_two = collected.await.unwrap().unwrap().into_inner();
    assert_eq!(list_of_two.videos.len(), 2);

    // Still open at the drain's end: a status each, UNAVAILABLE (retryable elsewhere), not a cut connection.
    let (_tx, mut open) = bidi.remove(0);
    let status = open.message().await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert_eq!(status.message(), keel_common::layers::SHUTTING_DOWN);
    assert!(term.elapsed() >= drain, "ended after {:?}", term.elapsed());
    let status = loop {
        match list.message().await {
            Ok(Some(_)) => {}
            Ok(None) => panic!("the paused listing ended OK"),
            Err(s) => break s,
        }
    };
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");

    let exit = p.wait_exit(Duration::from_secs(10)).await;
    assert!(exit.success(), "{exit:?}");
    let unavailable = Some("UNAVAILABLE".to_owned());
    assert_eq!(
        served(&p, "GetVideo")
            .iter()
            .map(|c| c.2.clone())
            .collect::<Vec<_>>(),
        [Some("OK".to_owned()), unavailable.clone()]
    );
    assert_eq!(served(&p, "ListVideos")[0].2, unavailable);
    assert!(
        p.output()
            .contains("drain timed out; ending the remaining calls with UNAVAILABLE")
    );
}
