//! Proof 5 (second half), against the real broker: with Kafka stopped the service still answers within its
//! callers' deadlines, the lines it cannot ship are counted as dropped, and shipping resumes when Kafka is
//! back. It stops the shared broker: see `main.rs`.

use std::{process::Command, time::Duration};

use crate::support::*;
use keel_protos::keel::example::v1::{EchoRequest, echo_client::EchoClient};

fn infra_cmd(infra: &Infra, action: &str) {
    let out = Command::new("bash")
        .arg(&infra.infra_script)
        .args([action, "kafka"])
        .output()
        .expect("infra.sh");
    assert!(
        out.status.success(),
        "infra.sh {action} kafka: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

async fn traced_call(client: &mut EchoClient<tonic::transport::Channel>, trace_id: &str) {
    let mut req = tonic::Request::new(EchoRequest {
        message: "kafka outage".into(),
        ..Default::default()
    });
    req.metadata_mut()
        .insert("x-trace-id", trace_id.parse().unwrap());
    // A 2 s deadline: a logger that blocked on Kafka would make this DEADLINE_EXCEEDED.
    req.set_timeout(Duration::from_secs(2));
    client
        .echo(req)
        .await
        .expect("the service answers within the deadline");
}

#[tokio::test]
async fn kafka_outage_drops_are_counted_calls_stay_prompt_and_shipping_recovers() {
    let _one_at_a_time = crate::ONE_AT_A_TIME.lock().await;
    let infra = Infra::get();
    let name = unique("echo-outage");
    let mut p = echo_process(&[
        ("KEEL_SERVICE__NAME", name.clone()),
        ("KEEL_KAFKA__BROKERS", infra.kafka.clone()),
        ("KEEL_LOG__DELIVERY_TIMEOUT", "2s".into()),
    ]);
    let topic = format!("logs.{name}");
    let mut client = EchoClient::new(direct(p.addr().await));

    let before = unique("before");
    traced_call(&mut client, &before).await;
    let want = before.clone();
    let (_, c) = TopicReader::new(&infra.kafka, &topic)
        .until(Duration::from_secs(40), move |v| {
            v["trace_id"] == want.as_str()
        })
        .await;
    drop(c);

    infra_cmd(&infra, "stop");
    let result = std::panic::AssertUnwindSafe(async {
        for i in 0..20 {
            traced_call(&mut client, &format!("during-{i}")).await;
        }
        // Undeliverable lines are counted (and reported on stdout, never shipped).
        eventually(
            "dropped log lines are reported",
            Duration::from_secs(30),
            || async {
                p.lines().iter().find_map(|l| {
                    (l["message"] == "log lines dropped"
                        && l["fields"]["delivery_failed"].as_u64()? >= 20)
                        .then_some(())
                })
            },
        )
        .await;
    });
    let outcome = futures_catch(result).await;
    infra_cmd(&infra, "start");
    if let Err(panic) = outcome {
        std::panic::resume_unwind(panic);
    }

    let after = unique("after");
    let want = after.clone();
    let c = TopicReader::new(&infra.kafka, &topic);
    // The shipper reconnects by itself; keep calling until a fresh line arrives.
    let mut probe = client.clone();
    let caller = tokio::spawn(async move {
        for _ in 0..60 {
            traced_call(&mut probe, &after).await;
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    });
    let (line, _c) = c
        .until(Duration::from_secs(60), move |v| {
            v["trace_id"] == want.as_str()
        })
        .await;
    caller.abort();
    assert_eq!(line["service"], name.as_str());

    p.signal("TERM");
    assert!(p.wait_exit(Duration::from_secs(20)).await.success());
    let summary = p
        .lines()
        .into_iter()
        .find(|l| l["message"] == "log shipper stopping")
        .expect("shipper summary line");
    assert!(
        summary["fields"]["dropped"].as_u64().unwrap() >= 20,
        "{summary}"
    );
    assert!(
        summary["fields"]["shipped"].as_u64().unwrap() >= 2,
        "{summary}"
    );
}

/// Runs a future, turning a panic into an `Err` so the broker is restarted whatever happens.
async fn futures_catch<F: std::future::Future<Output = ()>>(
    f: std::panic::AssertUnwindSafe<F>,
) -> std::thread::Result<()> {
    use futures::FutureExt;
    f.catch_unwind().await
}
