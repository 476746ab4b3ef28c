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
