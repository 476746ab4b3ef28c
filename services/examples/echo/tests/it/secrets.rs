//! Secrets never reach the logs: an echo process given a Consul ACL token, a database URL with a password in
//! its user info and in its query, and an operator token in a service section, registers, serves a call and
//! stops; none of them appears in anything it printed, while the settings report shows them redacted.

use std::time::Duration;

use keel_protos::keel::example::v1::{EchoRequest, echo_client::EchoClient};

use crate::support::*;

#[tokio::test]
async fn no_secret_appears_in_any_log_line() {
    let infra = Infra::get();
    let name = unique("echo-secrets");
    let secrets = [
        "consul-token-3b1f9c",
        "db-password-77aa01",
        "query-password-5e5e5e",
        "operator-token-c0ffee",
    ];
    let mut env = consul_env(&infra, &name);
    env.extend([
        ("CONSUL_HTTP_TOKEN", secrets[0].to_owned()),
        (
            "KEEL_DATABASE__URL",
            format!(
                "postgres://kv:{}@127.0.0.1:1/kv?sslpassword={}",
                secrets[1], secrets[2]
            ),
        ),
        ("KEEL_ACCOUNTS__ADMIN_TOKEN", secrets[3].to_owned()),
        ("KEEL_LOG__LEVEL", "debug".into()),
    ]);
    let mut p = echo_process(&env);
    let port = passing_ports(&name, 1, CONSUL_WAIT).await[0];
    EchoClient::new(direct(format!("127.0.0.1:{port}").parse().unwrap()))
        .echo(EchoRequest {
            message: "hello".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    p.signal("TERM");
    p.wait_exit(Duration::from_secs(30)).await;
    let out = p.output();
    for s in secrets {
        assert!(!out.contains(s), "{s} leaked into the log:\n{out}");
    }
    let reported = |key: &str| {
        p.lines()
            .into_iter()
            .find(|l| l["message"] == "setting" && l["fields"]["key"] == key)
            .map(|l| l["fields"]["value"].as_str().unwrap_or_default().to_owned())
            .unwrap_or_else(|| panic!("{key} not reported"))
    };
    assert_eq!(reported("consul.token"), "<redacted>");
    assert!(reported("database.url").contains("kv:***@"));
}
