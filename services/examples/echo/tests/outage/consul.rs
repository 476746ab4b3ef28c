//! Registration against the real Consul agent when it is down at start: the service serves anyway, retries in
//! the background, and appears in Consul (with a passing check) once the agent is back. It stops the shared
//! agent: see `main.rs`.

use std::{process::Command, time::Duration};

use crate::support::*;
use keel_protos::keel::example::v1::{EchoRequest, echo_client::EchoClient};

fn infra_cmd(infra: &Infra, action: &str) {
    let out = Command::new("bash")
        .arg(&infra.infra_script)
        .args([action, "consul"])
        .output()
        .expect("infra.sh");
    assert!(
        out.status.success(),
        "infra.sh {action} consul: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test]
async fn serves_while_consul_is_down_and_registers_when_it_returns() {
    let _one_at_a_time = crate::ONE_AT_A_TIME.lock().await;
    let infra = Infra::get();
    let name = unique("echo-late");
    infra_cmd(&infra, "stop");
    let p = echo_process(&consul_env(&infra, &name));
    let served = async {
        let mut client = EchoClient::new(direct(p.addr().await));
        let mut req = tonic::Request::new(EchoRequest {
            message: "no consul".into(),
            ..Default::default()
        });
        req.set_timeout(Duration::from_secs(2));
        client.echo(req).await.map(|r| r.into_inner().message)
    }
    .await;
    let failed_attempt = p
        .lines()
        .iter()
        .any(|l| l["message"] == "consul registration failed; serving anyway");
    infra_cmd(&infra, "start");
    assert_eq!(served.expect("serves while consul is down"), "no consul");
    assert!(
        failed_attempt,
        "the failed registration is logged; output:\n{}",
        p.output()
    );

    // Backoff is at most 10 s between attempts.
    let ports = passing_ports(&name, 1, CONSUL_WAIT).await;
    assert_eq!(p.addr().await.port(), ports[0]);
}

/// Live settings through a Consul outage: the process keeps the settings it had, serves, and once Consul is
/// back watches KV again and applies a new value.
#[tokio::test]
async fn live_settings_outlast_a_consul_outage_and_the_watch_resumes() {
    let _one_at_a_time = crate::ONE_AT_A_TIME.lock().await;
    let infra = Infra::get();
    let agent = infra.agent();
    let name = unique("echo-kvout");
    let p = echo_process(&consul_env(&infra, &name));
    passing_ports(&name, 1, CONSUL_WAIT).await;
    let key = format!("keel/{name}/client/default_timeout");
    let changed_to = |value: &'static str| {
        let p = &p;
        move || async move {
            p.lines()
                .iter()
                .any(|l| {
                    l["message"] == "setting changed"
                        && l["fields"]["key"] == "client.default_timeout"
                        && l["fields"]["value"] == value
                })
                .then_some(())
        }
    };
    agent.kv_put(&key, "700ms").await.unwrap();
    eventually(
        "the first value applies",
        Duration::from_secs(10),
        changed_to("700ms"),
    )
    .await;

    infra_cmd(&infra, "stop");
    eventually(
        "the watch reports Consul away",
        Duration::from_secs(30),
        || async {
            p.lines()
                .iter()
                .any(|l| {
                    l["message"] == "consul kv unreachable; keeping the last settings, retrying"
                })
                .then_some(())
        },
    )
    .await;
    let changes_while_away = p
        .lines()
        .iter()
        .filter(|l| l["message"] == "setting changed")
        .count();
    let mut client = EchoClient::new(direct(p.addr().await));
    let served = client
        .echo(EchoRequest {
            message: "consul is away".into(),
            ..Default::default()
        })
        .await;
    infra_cmd(&infra, "start");
    assert_eq!(served.unwrap().into_inner().message, "consul is away");
    assert_eq!(
        p.lines()
            .iter()
            .filter(|l| l["message"] == "setting changed")
            .count(),
        changes_while_away,
        "nothing changes while Consul is away"
    );

    // Back: the watch resumes (backoff at most 30 s) and a new value applies.
    eventually(
        "KV takes a value again",
        Duration::from_secs(30),
        || async { agent.kv_put(&key, "800ms").await.ok() },
    )
    .await;
    eventually(
        "the new value applies",
        Duration::from_secs(60),
        changed_to("800ms"),
    )
    .await;
    assert!(
        p.lines()
            .iter()
            .any(|l| l["message"] == "consul kv reachable again; watching settings")
    );
    agent
        .kv_delete(&format!("keel/{name}"), true)
        .await
        .unwrap();
}
