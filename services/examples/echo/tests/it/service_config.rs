//! gRPC service config (A2 JSON) for a target, published in Consul KV at `keel/<target>/service-config` and
//! followed live by a client's factory: a method `timeout`, an A6 `retryPolicy` (trailers-only answers with a
//! retryable status are tried again; others are not), and `waitForReady` (issue 14). Real echo processes and
//! the real Consul.

use std::time::Duration;

use crate::support::*;
use keel_common::{App, ClientFactory, Metrics, live};
use keel_protos::keel::example::v1::{EchoRequest, echo_client::EchoClient};
use tonic::Code;

/// Server-side call-log lines of Echo/Echo with trace id `trace`.
fn attempts(p: &ServiceProcess, trace: &str) -> usize {
    p.lines()
        .iter()
        .filter(|l| {
            l["message"] == "grpc call"
                && l["trace_id"] == trace
                && l["fields"]["side"] == "server"
                && l["fields"]["method"] == "/keel.example.v1.Echo/Echo"
        })
        .count()
}

fn traced(req: EchoRequest, trace: &str) -> tonic::Request<EchoRequest> {
    let mut r = tonic::Request::new(req);
    r.metadata_mut()
        .insert("x-trace-id", trace.parse().unwrap());
    r
}

/// A client process's factory, following Consul KV as every service's does (keep the live settings).
fn following_factory(infra: &Infra) -> (ClientFactory, live::LiveSettings) {
    let settings = std::sync::Arc::new(infra.client_settings());
    let watched = live::watch(live::Watch {
        app: App::named("test-client"),
        env: keel_common::config::Env::default()
            .with("CONSUL_HTTP_ADDR", &infra.consul_http)
            .with("KEEL_CONSUL__DNS_ADDR", &infra.consul_dns),
        initial: settings.clone(),
        index: 0,
        restart: Box::new(|| {}),
    });
    let factory = ClientFactory::new(&settings, Metrics::disabled());
    factory.follow(&watched);
    (factory, watched)
}

#[tokio::test]
async fn a_service_config_in_consul_kv_sets_timeouts_retries_and_wait_for_ready_live() {
    let infra = Infra::get();
    let agent = infra.agent();
    let (a, b) = (unique("echo-sca"), unique("echo-scb"));
    let pa = echo_process(&consul_env(&infra, &a));
    passing_ports(&a, 1, CONSUL_WAIT).await;

    let (factory, _watched) = following_factory(&infra);
    let mut client = EchoClient::new(factory.channel(&a).unwrap());
    let slow = || EchoRequest {
        message: "slow".into(),
        delay_ms: 800,
        ..Default::default()
    };
    assert!(
        client.echo(slow()).await.is_ok(),
        "no config: the default 10 s deadline"
    );

    let config = r#"{"methodConfig": [
        {"name": [{"service": "keel.example.v1.Echo", "method": "Echo"}], "timeout": "0.3s",
         "retryPolicy": {"maxAttempts": 3, "initialBackoff": "0.01s", "maxBackoff": "0.05s",
                         "backoffMultiplier": 2, "retryableStatusCodes": ["INTERNAL"]}}]}"#;
    agent
        .kv_put(&format!("keel/{a}/service-config"), config)
        .await
        .unwrap();
    let late = eventually(
        "the method timeout applies",
        Duration::from_secs(10),
        || {
            let mut c = client.clone();
            async move { c.echo(slow()).await.err() }
        },
    )
    .await;
    assert_eq!(late.code(), Code::DeadlineExceeded, "{late:?}");

    // INTERNAL is retryable here: three attempts reach the server; NOT_FOUND is not: one.
    let t = unique("retry");
    let failing = |code: Code| EchoRequest {
        fail_with_code: code as i32,
        ..Default::default()
    };
    let err = client
        .echo(traced(failing(Code::Internal), &format!("{t}-i")))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Internal);
    let err = client
        .echo(traced(failing(Code::NotFound), &format!("{t}-n")))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    eventually(
        "the attempts are logged",
        Duration::from_secs(5),
        || async {
            (attempts(&pa, &format!("{t}-i")) == 3 && attempts(&pa, &format!("{t}-n")) == 1)
                .then_some(())
        },
    )
    .await;

    // A bad config is refused and the one in force stays (the 0.3 s timeout).
    agent
        .kv_put(
            &format!("keel/{a}/service-config"),
            r#"{"methodConfig": [{"timeout": "soon"}]}"#,
        )
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        client.echo(slow()).await.unwrap_err().code(),
        Code::DeadlineExceeded
    );

    // waitForReady: a call to B, which has no instance yet, waits for one instead of failing at once.
    let mut to_b = EchoClient::new(factory.channel(&b).unwrap());
    let fast_fail = to_b.echo(EchoRequest::default()).await.unwrap_err();
    assert_eq!(
        fast_fail.code(),
        Code::Unavailable,
        "without the config: fail fast"
    );
    agent
        .kv_put(
            &format!("keel/{b}/service-config"),
            r#"{"methodConfig": [{"name": [{}], "waitForReady": true, "timeout": "20s"}]}"#,
        )
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let waiting = tokio::spawn({
        let mut c = to_b.clone();
        async move {
            c.echo(EchoRequest {
                message: "waited".into(),
                ..Default::default()
            })
            .await
        }
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!waiting.is_finished(), "the call waits for an instance");
    let _pb = echo_process(&consul_env(&infra, &b));
    let answer = waiting.await.unwrap().expect("answered once B is up");
    assert_eq!(answer.into_inner().message, "waited");

    for t in [&a, &b] {
        agent.kv_delete(&format!("keel/{t}"), true).await.unwrap();
    }
}

/// How many of `n` calls each instance answered (by instance id), with `key` as the routing key if given.
async fn spread(
    client: &mut EchoClient<keel_common::client::Channel>,
    n: usize,
    key: Option<&str>,
) -> std::collections::BTreeMap<String, usize> {
    let mut by = std::collections::BTreeMap::new();
    for _ in 0..n {
        let mut req = tonic::Request::new(EchoRequest::default());
        if let Some(k) = key {
            keel_common::routing::set_routing_key(&mut req, k);
        }
        let id = client.echo(req).await.unwrap().into_inner().instance_id;
        *by.entry(id).or_insert(0) += 1;
    }
    by
}

#[tokio::test]
async fn load_balancing_config_in_consul_kv_switches_the_policy_live() {
    let infra = Infra::get();
    let agent = infra.agent();
    let name = unique("echo-lb");
    let _instances: Vec<ServiceProcess> = (0..3)
        .map(|_| echo_process(&consul_env(&infra, &name)))
        .collect();
    passing_ports(&name, 3, CONSUL_WAIT).await;
    let (factory, _watched) = following_factory(&infra);
    let mut client = EchoClient::new(factory.channel(&name).unwrap());
    let key = format!("keel/{name}/service-config");
    let policy = |p: &str| format!(r#"{{"loadBalancingConfig": [{{"{p}": {{}}}}]}}"#);

    // round_robin: the three in turn, exactly a third each.
    agent.kv_put(&key, &policy("round_robin")).await.unwrap();
    eventually("round robin", Duration::from_secs(10), || {
        let mut c = client.clone();
        async move {
            let by = spread(&mut c, 30, None).await;
            (by.len() == 3 && by.values().all(|n| *n == 10)).then_some(())
        }
    })
    .await;

    // pick_first: one instance takes every call.
    agent.kv_put(&key, &policy("pick_first")).await.unwrap();
    let first = eventually("pick first", Duration::from_secs(10), || {
        let mut c = client.clone();
        async move {
            let by = spread(&mut c, 20, None).await;
            (by.len() == 1).then(|| by.into_keys().next().unwrap())
        }
    })
    .await;
    assert_eq!(spread(&mut client, 20, None).await.get(&first), Some(&20));

    // key_affinity: a key always goes to the same instance; many keys reach all three.
    agent.kv_put(&key, &policy("key_affinity")).await.unwrap();
    eventually("key affinity", Duration::from_secs(10), || {
        let mut c = client.clone();
        async move {
            let mut owners = std::collections::BTreeSet::new();
            for k in 0..30 {
                let by = spread(&mut c, 3, Some(&format!("key-{k}"))).await;
                if by.len() != 1 {
                    return None;
                }
                owners.extend(by.into_keys());
            }
            (owners.len() == 3).then_some(())
        }
    })
    .await;

    // p2c (the channel's default, also when the config names no policy): more than one instance is used.
    agent.kv_put(&key, &policy("p2c")).await.unwrap();
    eventually("p2c", Duration::from_secs(10), || {
        let mut c = client.clone();
        async move { (spread(&mut c, 60, Some("key-0")).await.len() > 1).then_some(()) }
    })
    .await;

    // A policy we do not know is refused; the one in force (p2c) stays.
    agent.kv_put(&key, &policy("weighted_dice")).await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(spread(&mut client, 60, Some("key-0")).await.len() > 1);
    agent
        .kv_delete(&format!("keel/{name}"), true)
        .await
        .unwrap();
}
