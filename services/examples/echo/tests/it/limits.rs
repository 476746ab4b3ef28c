//! Resource limits of the server stack: over `grpc.max_concurrent_requests` a call is rejected at once with
//! RESOURCE_EXHAUSTED before any handler runs (load shedding, not queueing), and a request larger than
//! `grpc.max_request_bytes` is refused with OUT_OF_RANGE (tonic's code for it; grpc-go says RESOURCE_EXHAUSTED).

use std::time::Duration;

use crate::support::*;
use keel_protos::keel::example::v1::{EchoRequest, echo_client::EchoClient};
use tonic::Code;

#[tokio::test]
async fn over_the_concurrency_limit_calls_are_shed_and_oversized_requests_refused() {
    let p = echo_process(&[
        ("KEEL_GRPC__MAX_CONCURRENT_REQUESTS", "1".into()),
        ("KEEL_GRPC__MAX_REQUEST_BYTES", "1024".into()),
    ]);
    let client = EchoClient::new(direct(p.addr().await));

    // One slow call holds the only slot; the next is shed at once.
    let mut slow = client.clone();
    let holder = tokio::spawn(async move {
        slow.echo(EchoRequest {
            message: "slow".into(),
            delay_ms: 1500,
            ..Default::default()
        })
        .await
    });
    // Only once the slow call is in the handler does it hold the slot; a call sent before could take it first.
    eventually(
        "the slow call reaches the handler",
        Duration::from_secs(5),
        || async { p.output().contains("\"text\":\"slow\"").then_some(()) },
    )
    .await;
    let shed = eventually(
        "a call over the limit is shed",
        Duration::from_secs(5),
        || {
            let mut c = client.clone();
            async move {
                match c
                    .echo(EchoRequest {
                        message: "one too many".into(),
                        ..Default::default()
                    })
                    .await
                {
                    Err(s) if s.code() == Code::ResourceExhausted => Some(s),
                    _ => None,
                }
            }
        },
    )
    .await;
    assert!(shed.message().contains("overloaded"), "{shed:?}");
    assert!(
        holder.await.unwrap().is_ok(),
        "the call holding the slot completes"
    );
    assert!(
        !p.output().contains("\"text\":\"one too many\""),
        "the shed call never reached the handler"
    );

    let err = client
        .clone()
        .echo(EchoRequest {
            message: "x".repeat(4096),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::OutOfRange, "{err:?}");
    assert!(err.message().contains("limit is: 1024 bytes"), "{err:?}");
    let ok = client
        .clone()
        .echo(EchoRequest {
            message: "small".into(),
            ..Default::default()
        })
        .await;
    assert!(ok.is_ok(), "{ok:?}");
}

/// gzip: a compressed request is always accepted and answered compressed; an uncompressed one is answered
/// compressed only with `grpc.gzip_responses` (a new compressor per message is the largest cost of a small
/// call, so a client that merely accepts gzip does not get it by default).
#[tokio::test]
async fn gzip_answers_go_to_callers_that_compress_or_with_gzip_responses_to_all_that_accept() {
    use tonic::codec::CompressionEncoding::Gzip;
    // (grpc.gzip_responses, the request compressed, the answer compressed); every client accepts gzip.
    for (setting, request_gzip, answer_gzip) in [
        (None, true, true),
        (None, false, false),
        (Some("true"), false, true),
    ] {
        let mut env = vec![("KEEL_GRPC__LISTEN_ADDR", "127.0.0.1:0".to_owned())];
        if let Some(v) = setting {
            env.push(("KEEL_GRPC__GZIP_RESPONSES", v.to_owned()));
        }
        let p = echo_process(&env);
        let mut client = EchoClient::new(direct(p.addr().await)).accept_compressed(Gzip);
        if request_gzip {
            client = client.send_compressed(Gzip);
        }
        let reply = client
            .echo(EchoRequest {
                message: "squeeze me ".repeat(100),
                ..Default::default()
            })
            .await
            .expect("a gzip request is accepted");
        assert_eq!(reply.get_ref().message, "squeeze me ".repeat(100));
        assert_eq!(
            reply
                .metadata()
                .get("grpc-encoding")
                .is_some_and(|v| v == "gzip"),
            answer_gzip,
            "grpc.gzip_responses = {setting:?}, request gzip {request_gzip}: {:?}",
            reply.metadata()
        );
    }
}
