//! Live settings from Consul KV, on the real Consul (issue 14): a `PUT` under `keel/<service>/` changes the log
//! level and the client deadline of a running echo while calls flow and none fails; a bad value is refused
//! with its key and the previous value stays; a setting that cannot change live is reported, and with
//! `consul.kv_restart_on_change` the process shuts down gracefully for its supervisor.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use crate::support::*;
use keel_common::{ClientFactory, Metrics};
use keel_protos::keel::example::v1::{EchoRequest, echo_client::EchoClient};
use serde_json::Value;

/// Whether `p` logged a line with `message` whose fields match every `(field, value)`.
fn logged(p: &ServiceProcess, message: &str, fields: &[(&str, &str)]) -> bool {
    p.lines().iter().any(|l| line_is(l, message, fields))
}

fn line_is(l: &Value, message: &str, fields: &[(&str, &str)]) -> bool {
    l["message"] == message && fields.iter().all(|(k, v)| l["fields"][*k] == *v)
}

#[tokio::test]
async fn a_kv_put_changes_log_level_and_client_deadline_live_while_calls_flow() {
    let infra = Infra::get();
    let agent = infra.agent();
    let (a, b) = (unique("echo-kva"), unique("echo-kvb"));
    let pa = echo_process(&consul_env(&infra, &a));
    let _pb = echo_process(&consul_env(&infra, &b));
    passing_ports(&a, 1, CONSUL_WAIT).await;
    passing_ports(&b, 1, CONSUL_WAIT).await;
    assert!(logged(
        &pa,
        "setting",
        &[("key", "client.default_timeout"), ("source", "default")]
    ));

    // Calls flow through A to B the whole time; B reports the deadline A gave it.
    let factory = ClientFactory::new(&infra.client_settings(), Metrics::disabled());
    let client = EchoClient::new(factory.channel(&a).unwrap());
    let (failed, done) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let last_deadline = Arc::new(AtomicU64::new(u64::MAX));
    let stop = Arc::new(tokio::sync::Notify::new());
    let flow = {
        let (failed, done, last, stop, b) = (
            failed.clone(),
            done.clone(),
            last_deadline.clone(),
            stop.clone(),
            b.clone(),
        );
        let mut client = client.clone();
        tokio::spawn(async move {
            loop {
                let call = client.echo(EchoRequest {
                    message: "flowing".into(),
                    forward_to: b.clone(),
                    ..Default::default()
                });
                tokio::select! {
                    () = stop.notified() => break,
                    r = call => match r {
                        Ok(r) => {
                            let down = r.into_inner().downstream.expect("B answered");
                            last.store(down.deadline_remaining_ms, Ordering::Relaxed);
                            done.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(s) => {
                            eprintln!("call failed: {s:?}");
                            failed.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    eventually("calls flow", Duration::from_secs(20), || async {
        (last_deadline.load(Ordering::Relaxed) > 5_000
            && last_deadline.load(Ordering::Relaxed) != u64::MAX)
            .then_some(())
    })
    .await;

    let key = |k: &str| format!("keel/{a}/{k}");
    let put = Instant::now();
    agent
        .kv_put(&key("client/default_timeout"), "700ms")
        .await
        .unwrap();
    agent.kv_put(&key("log/level"), "debug").await.unwrap();
    eventually(
        "B sees A's new client deadline",
        Duration::from_secs(5),
        || async { (last_deadline.load(Ordering::Relaxed) <= 700).then_some(()) },
    )
    .await;
    eprintln!(
        "client deadline changed live {:?} after the PUT",
        put.elapsed()
    );
    let source = key("client/default_timeout");
    let source = format!("consul-kv {source}");
    assert!(logged(
        &pa,
        "setting changed",
        &[
            ("key", "client.default_timeout"),
            ("value", "700ms"),
            ("source", source.as_str())
        ]
    ));
    // At debug, A logs what it logged at no level before: its health-check call lines.
    eventually("A logs at debug", Duration::from_secs(5), || async {
        pa.lines()
            .iter()
            .any(|l| l["level"] == "DEBUG" && l["target"] == "keel::calls")
            .then_some(())
    })
    .await;

    // A bad value is refused, naming its key; the deadline stays 700 ms.
    agent
        .kv_put(&key("client/default_timeout"), "soon")
        .await
        .unwrap();
    let refused = key("client/default_timeout");
    eventually(
        "the bad value is refused",
        Duration::from_secs(5),
        || async {
            logged(
                &pa,
                "invalid value in consul kv refused; the previous value stays",
                &[
                    ("key", refused.as_str()),
                    ("setting", "client.default_timeout"),
                ],
            )
            .then_some(())
        },
    )
    .await;
    let before = done.load(Ordering::Relaxed);
    eventually("calls go on", Duration::from_secs(5), || async {
        (done.load(Ordering::Relaxed) > before + 5).then_some(())
    })
    .await;
    assert!(
        last_deadline.load(Ordering::Relaxed) <= 700,
        "the previous value stays"
    );

    // A setting that cannot change live is reported once, and the process goes on.
    agent
        .kv_put(&key("grpc/drain_timeout"), "3s")
        .await
        .unwrap();
    eventually(
        "restart required is reported",
        Duration::from_secs(5),
        || async {
            logged(
                &pa,
                "setting changed; restart required for it to take effect",
                &[("key", "grpc.drain_timeout"), ("value", "3s")],
            )
            .then_some(())
        },
    )
    .await;

    stop.notify_one();
    flow.await.unwrap();
    agent.kv_delete(&format!("keel/{a}"), true).await.unwrap();
    assert_eq!(
        failed.load(Ordering::Relaxed),
        0,
        "no call failed while settings changed"
    );
    assert!(done.load(Ordering::Relaxed) > 20);
}

/// envconsul's mode, on request: a restart-only setting changed in KV shuts the process down gracefully (exit
/// 0) for its supervisor to restart it with the new value; `--settings` then lists the value and its source.
#[tokio::test]
async fn with_restart_on_change_a_restart_only_setting_stops_the_process_gracefully() {
    let infra = Infra::get();
    let agent = infra.agent();
    let name = unique("echo-kvr");
    let mut env = consul_env(&infra, &name);
    env.push(("KEEL_CONSUL__KV_RESTART_ON_CHANGE", "true".into()));
    let mut p = echo_process(&env);
    passing_ports(&name, 1, CONSUL_WAIT).await;
    agent
        .kv_put(&format!("keel/{name}/grpc/drain_timeout"), "2s")
        .await
        .unwrap();
    let status = p
        .wait(Duration::from_secs(30))
        .await
        .expect("the process stops");
    assert!(status.success(), "graceful: exit 0\n{}", p.output());

    let listed = run(
        std::process::Command::new(keel_common::testsuite::binary("echo"))
            .arg("--settings")
            .env_clear()
            .envs(env.iter().map(|(k, v)| (*k, v.as_str()))),
    );
    let line = listed
        .lines()
        .find(|l| l.starts_with("grpc.drain_timeout "))
        .unwrap_or_else(|| panic!("{listed}"));
    assert!(
        line.contains("2s")
            && line.contains(&format!("(consul-kv keel/{name}/grpc/drain_timeout)")),
        "{line}"
    );
    assert!(
        listed
            .lines()
            .any(|l| l.starts_with("service.name ") && l.ends_with("(env)")),
        "{listed}"
    );
    agent
        .kv_delete(&format!("keel/{name}"), true)
        .await
        .unwrap();
}

/// `grpc.max_concurrent_requests` follows Consul KV: lowered to 1, a call beside a slow one is shed; raised
/// again, it goes through.
#[tokio::test]
async fn the_concurrency_limit_follows_consul_kv() {
    let infra = Infra::get();
    let agent = infra.agent();
    let name = unique("echo-kvlim");
    let p = echo_process(&consul_env(&infra, &name));
    passing_ports(&name, 1, CONSUL_WAIT).await;
    let client = EchoClient::new(direct(p.addr().await));
    let key = format!("keel/{name}/grpc/max_concurrent_requests");
    let beside_a_slow_call = |text: &'static str| {
        let (client, p) = (client.clone(), &p);
        async move {
            let mut slow = client.clone();
            let holder = tokio::spawn(async move {
                slow.echo(EchoRequest {
                    message: text.into(),
                    delay_ms: 1500,
                    ..Default::default()
                })
                .await
            });
            let needle = format!("\"text\":\"{text}\"");
            eventually(
                "the slow call is in the handler",
                Duration::from_secs(5),
                || async { p.output().contains(&needle).then_some(()) },
            )
            .await;
            let second = client
                .clone()
                .echo(EchoRequest {
                    message: "beside".into(),
                    ..Default::default()
                })
                .await;
            assert!(holder.await.unwrap().is_ok(), "the slow call completes");
            second
        }
    };
    let applied = |value: &'static str| {
        let p = &p;
        move || async move {
            logged(
                p,
                "setting changed",
                &[("key", "grpc.max_concurrent_requests"), ("value", value)],
            )
            .then_some(())
        }
    };

    agent.kv_put(&key, "1").await.unwrap();
    eventually("the limit is lowered", Duration::from_secs(5), applied("1")).await;
    let shed = beside_a_slow_call("slow-1").await.unwrap_err();
    assert_eq!(shed.code(), tonic::Code::ResourceExhausted, "{shed:?}");

    agent.kv_put(&key, "8").await.unwrap();
    eventually("the limit is raised", Duration::from_secs(5), applied("8")).await;
    assert!(beside_a_slow_call("slow-2").await.is_ok());
    agent
        .kv_delete(&format!("keel/{name}"), true)
        .await
        .unwrap();
}
