//! The client's connections (`client.keepalive_interval`, `client.idle_timeout`), seen from a real echo
//! process: the server's call log names the peer port of each call, and at debug its HTTP/2 frames.

use std::time::Duration;

use crate::support::*;
use keel_common::{ClientFactory, Metrics, config::Env};
use keel_protos::keel::example::v1::{EchoRequest, echo_client::EchoClient};

/// A client of the echo at `addr` with `client.*` settings `env`.
fn client(addr: std::net::SocketAddr, env: &[(&str, &str)]) -> EchoClient<keel_common::Channel> {
    let mut e = Env::default().with("KEEL_CLIENT__STATIC_ENDPOINTS", format!("echo={addr}"));
    for (k, v) in env {
        e = e.with(*k, *v);
    }
    let settings = keel_common::Settings::from_env("conn-test", &e).unwrap();
    EchoClient::new(
        ClientFactory::new(&settings, Metrics::disabled())
            .channel("echo")
            .unwrap(),
    )
}

/// Calls with trace id `trace`; returns the peer (client address) the server logged for it.
async fn peer_of_call(
    p: &ServiceProcess,
    c: &mut EchoClient<keel_common::Channel>,
    trace: &str,
) -> String {
    let mut req = tonic::Request::new(EchoRequest {
        message: "hi".into(),
        ..Default::default()
    });
    req.metadata_mut()
        .insert("x-trace-id", trace.parse().unwrap());
    c.echo(req).await.unwrap();
    eventually("the call log line", Duration::from_secs(5), || async {
        p.lines().iter().find_map(|l| {
            (l["message"] == "grpc call"
                && l["trace_id"] == trace
                && l["fields"]["side"] == "server")
                .then(|| l["fields"]["peer"].as_str().unwrap_or_default().to_owned())
        })
    })
    .await
}

#[tokio::test]
async fn an_idle_connection_is_closed_and_the_next_call_opens_a_new_one() {
    let p = echo_process(&[]);
    let addr = p.addr().await;
    let mut idle = client(addr, &[("KEEL_CLIENT__IDLE_TIMEOUT", "1s")]);
    let mut kept = client(addr, &[("KEEL_CLIENT__IDLE_TIMEOUT", "0s")]);
    let t = unique("idle");
    let (first, again) = (
        peer_of_call(&p, &mut idle, &format!("{t}-1")).await,
        peer_of_call(&p, &mut idle, &format!("{t}-2")).await,
    );
    assert_eq!(
        first, again,
        "calls in quick succession share the connection"
    );
    let before = peer_of_call(&p, &mut kept, &format!("{t}-k1")).await;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let after_idle = peer_of_call(&p, &mut idle, &format!("{t}-3")).await;
    assert_ne!(first, after_idle, "idle for over 1 s: a new connection");
    let kept_after = peer_of_call(&p, &mut kept, &format!("{t}-k2")).await;
    assert_eq!(
        before, kept_after,
        "client.idle_timeout 0s keeps the connection"
    );
}

#[tokio::test]
async fn client_keepalive_pings_an_idle_connection_at_the_configured_interval() {
    let p = echo_process(&[("RUST_LOG", "info,h2::codec::framed_read=debug".into())]);
    let addr = p.addr().await;
    let pings = || {
        p.lines()
            .iter()
            .filter(|l| {
                l["message"] == "received"
                    && l["fields"]["frame"]
                        .as_str()
                        .is_some_and(|f| f.starts_with("Ping { ack: false"))
            })
            .count()
    };
    let mut quiet = client(addr, &[]);
    quiet.echo(EchoRequest::default()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        pings(),
        0,
        "the default interval (30 s) sends none this soon"
    );
    drop(quiet);

    let mut pinging = client(addr, &[("KEEL_CLIENT__KEEPALIVE_INTERVAL", "200ms")]);
    pinging.echo(EchoRequest::default()).await.unwrap();
    eventually(
        "PINGs on the idle connection",
        Duration::from_secs(5),
        || async { (pings() >= 3).then_some(()) },
    )
    .await;
}

/// The server's logged peer of the call with trace id `trace` on `p`, if `p` served it.
fn logged_peer(p: &ServiceProcess, trace: &str) -> Option<String> {
    p.lines().iter().find_map(|l| {
        (l["message"] == "grpc call" && l["trace_id"] == trace && l["fields"]["side"] == "server")
            .then(|| l["fields"]["peer"].as_str().unwrap_or_default().to_owned())
    })
}

#[tokio::test]
async fn an_instance_listed_again_after_leaving_discovery_gets_a_new_connection() {
    let (p, q) = (echo_process(&[]), echo_process(&[]));
    let (a, b) = (p.addr().await, q.addr().await);
    let settings = keel_common::Settings::from_env("conn-test", &Env::default()).unwrap();
    let (tx, rx) = tokio::sync::watch::channel(Some(vec![a]));
    let mut c =
        EchoClient::new(ClientFactory::new(&settings, Metrics::disabled()).balanced("echo", rx));
    let t = unique("relisted");
    let first = peer_of_call(&p, &mut c, &format!("{t}-1")).await;
    // `a` leaves discovery (a call goes to `b`, so the channel takes the change in), then is listed again.
    tx.send(Some(vec![b])).unwrap();
    peer_of_call(&q, &mut c, &format!("{t}-2")).await;
    tx.send(Some(vec![a])).unwrap();
    let again = peer_of_call(&p, &mut c, &format!("{t}-3")).await;
    assert_ne!(
        first, again,
        "the connection of before it left is not used again"
    );
    assert!(logged_peer(&q, &format!("{t}-3")).is_none());
}

/// A client of `first` and `live` under pick first, which tries the lowest address first (`first` must be
/// the lower), without any retryPolicy: only the transparent retry of a call no server processed sends a call
/// on from `first`.
fn pick_first_client(
    first: std::net::SocketAddr,
    live: std::net::SocketAddr,
) -> EchoClient<keel_common::Channel> {
    client(
        live,
        &[
            (
                "KEEL_CLIENT__STATIC_ENDPOINTS",
                &format!("echo={first}|{live}"),
            ),
            (
                "KEEL_CLIENT__SERVICE_CONFIG__ECHO",
                r#"{"loadBalancingConfig":[{"pick_first":{}}]}"#,
            ),
        ],
    )
}

#[tokio::test]
async fn a_call_whose_connection_is_refused_is_sent_to_another_instance() {
    let p = echo_process(&[]);
    let live = p.addr().await;
    // Nothing listens on port 1; pick first tries the lowest address first, so the refused one.
    let refused: std::net::SocketAddr = "127.0.0.1:1".parse().unwrap();
    let mut c = pick_first_client(refused, live);
    peer_of_call(&p, &mut c, &unique("refused")).await;
}

/// An HTTP/2 server on `ip` (port chosen by the system) that serves no call: it refuses every stream it is
/// sent (`RST_STREAM` with `REFUSED_STREAM`), or with `go_away` closes each connection with a graceful
/// `GOAWAY` (`NO_ERROR`, last stream 0) before it reads one, as a draining instance does to a call racing
/// its drain. Returns its address and the count of connections it took.
async fn refusing_server(
    ip: &str,
    go_away: bool,
) -> (
    std::net::SocketAddr,
    std::sync::Arc<std::sync::atomic::AtomicUsize>,
) {
    use std::sync::{Arc, atomic::AtomicUsize, atomic::Ordering::Relaxed};
    let listener = tokio::net::TcpListener::bind((ip, 0)).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let taken = Arc::new(AtomicUsize::new(0));
    let count = taken.clone();
    tokio::spawn(async move {
        while let Ok((socket, _)) = listener.accept().await {
            count.fetch_add(1, Relaxed);
            tokio::spawn(async move {
                let Ok(mut conn) = h2::server::handshake(socket).await else {
                    return;
                };
                if go_away {
                    conn.abrupt_shutdown(h2::Reason::NO_ERROR);
                }
                while let Some(Ok((_, mut respond))) = conn.accept().await {
                    respond.send_reset(h2::Reason::REFUSED_STREAM);
                }
                // The socket stays open a while: closed with the client's frames unread, it would be reset,
                // and the client could lose the GOAWAY before it.
                tokio::time::sleep(Duration::from_secs(1)).await;
                drop(conn);
            });
        }
    });
    (addr, taken)
}

/// A call to an instance that does not process it (listed first for pick first) is answered by the other.
async fn a_call_not_processed_by_refuser_is_answered_by_the_other(go_away: bool) {
    // The echo on 127.0.0.2 so the refusing server (127.0.0.1) comes first in pick first's sorted list.
    let p = echo_process(&[("KEEL_GRPC__LISTEN_ADDR", "127.0.0.2:0".into())]);
    let live = p.addr().await;
    let (refuser, taken) = refusing_server("127.0.0.1", go_away).await;
    let mut c = pick_first_client(refuser, live);
    peer_of_call(&p, &mut c, &unique("not-processed")).await;
    assert!(
        taken.load(std::sync::atomic::Ordering::Relaxed) > 0,
        "the call went to the refusing server first"
    );
}

#[tokio::test]
async fn a_call_whose_stream_is_refused_is_sent_to_another_instance() {
    a_call_not_processed_by_refuser_is_answered_by_the_other(false).await;
}

#[tokio::test]
async fn a_call_left_out_by_a_graceful_goaway_is_sent_to_another_instance() {
    a_call_not_processed_by_refuser_is_answered_by_the_other(true).await;
}

#[tokio::test]
async fn a_key_whose_owner_refuses_connections_is_answered_by_the_next_instance_in_rendezvous_order()
 {
    let p = echo_process(&[]);
    let live = p.addr().await;
    // Nothing listens on port 1, still listed (an instance that crashed, or stopped accepting, before
    // discovery drops it): a key it owns.
    let refused: std::net::SocketAddr = "127.0.0.1:1".parse().unwrap();
    let key = (0..)
        .map(|i| format!("key{i}"))
        .find(|k| keel_common::routing::owner(k, &[refused, live]) == Some(refused))
        .unwrap();
    let mut c = client(
        live,
        &[
            (
                "KEEL_CLIENT__STATIC_ENDPOINTS",
                &format!("echo={refused}|{live}"),
            ),
            (
                "KEEL_CLIENT__SERVICE_CONFIG__ECHO",
                r#"{"loadBalancingConfig":[{"key_affinity":{}}]}"#,
            ),
        ],
    );
    let trace = unique("owner-refused");
    let mut req = tonic::Request::new(EchoRequest {
        message: "hi".into(),
        ..Default::default()
    });
    keel_common::routing::set_routing_key(&mut req, &key);
    req.metadata_mut()
        .insert("x-trace-id", trace.parse().unwrap());
    c.echo(req).await.expect("answered by the live instance");
    eventually(
        "the live instance's call log line",
        Duration::from_secs(5),
        || async { logged_peer(&p, &trace) },
    )
    .await;
}
