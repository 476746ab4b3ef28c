//! The platform of `crates/common`, proven end to end with real echo processes against the real Consul, Kafka,
//! StatsD and Graphite started by `scripts/infra.sh` (issue 2, proofs 1–6).

use std::{collections::HashMap, process::Command, time::Duration};

use crate::support::*;
use keel_common::{ClientFactory, Idempotent, Metrics, discovery::SrvResolver};
use keel_protos::keel::example::v1::{EchoRequest, echo_client::EchoClient};
use tonic::Code;
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

fn echo(message: &str) -> EchoRequest {
    EchoRequest {
        message: message.into(),
        ..Default::default()
    }
}

/// Proofs 1 and 6: registered with a passing GRPC check, found by SRV through Consul DNS (our resolver and
/// `dig`), listed and described by grpcurl through reflection, SERVING through grpc.health.v1.
#[tokio::test]
async fn registers_in_consul_resolves_by_srv_and_offers_reflection_and_health() {
    let infra = Infra::get();
    let name = unique("echo-reg");
    let mut p = echo_process(&consul_env(&infra, &name));
    let ports = passing_ports(&name, 1, CONSUL_WAIT).await;
    let port = ports[0];

    let entry = infra
        .agent()
        .health_service(&name, true)
        .await
        .unwrap()
        .remove(0);
    assert!(
        entry.service.id.starts_with(&format!("{name}-")),
        "instance id {}",
        entry.service.id
    );
    assert_eq!(entry.service.meta.as_ref().unwrap()["protocol"], "grpc");
    assert!(
        entry
            .checks
            .iter()
            .any(|c| c.check_id.ends_with(":grpc") && c.status == "passing")
    );

    let resolved = SrvResolver::new(infra.consul_dns.parse().unwrap())
        .resolve(&name)
        .await
        .unwrap();
    assert_eq!(resolved, vec![format!("127.0.0.1:{port}").parse().unwrap()]);
    let (dns_host, dns_port) = infra.consul_dns.split_once(':').unwrap();
    let dig = run(Command::new("dig").args([
        "+short",
        &format!("@{dns_host}"),
        "-p",
        dns_port,
        &format!("{name}.service.consul"),
        "SRV",
    ]));
    assert!(
        dig.split_whitespace().any(|w| w == port.to_string()),
        "dig SRV answer {dig:?} lacks port {port}"
    );

    let addr = format!("127.0.0.1:{port}");
    let list = run(Command::new(&infra.grpcurl).args(["-plaintext", &addr, "list"]));
    let services: Vec<&str> = list.lines().collect();
    assert!(services.contains(&"keel.example.v1.Echo"), "{list}");
    assert!(services.contains(&"grpc.health.v1.Health"), "{list}");
    assert!(
        !services.contains(&"rpc.Cache"),
        "reflection advertises only served services: {list}"
    );
    let describe = run(Command::new(&infra.grpcurl).args([
        "-plaintext",
        &addr,
        "describe",
        "keel.example.v1.Echo",
    ]));
    assert!(
        describe.contains(
            "rpc Echo ( .keel.example.v1.EchoRequest ) returns ( .keel.example.v1.EchoResponse )"
        ),
        "{describe}"
    );
    let called = run(Command::new(&infra.grpcurl).args([
        "-plaintext",
        "-d",
        r#"{"message":"via grpcurl"}"#,
        &addr,
        "keel.example.v1.Echo/Echo",
    ]));
    assert!(called.contains("via grpcurl"), "{called}");

    let mut health = HealthClient::new(direct(addr.parse().unwrap()));
    for service in ["", "keel.example.v1.Echo"] {
        let status = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner()
            .status;
        assert_eq!(
            status,
            ServingStatus::Serving as i32,
            "health of {service:?}"
        );
    }
    p.signal("TERM");
    assert!(p.wait_exit(Duration::from_secs(20)).await.success());
}

/// Proof 2: a client that knows only the service name reaches it through Consul DNS, spreads calls over both
/// instances, and keeps succeeding on the survivor after one is SIGKILLed.
/// A client whose peer is not up yet (no healthy instance: UNAVAILABLE at once, no hang) finds it as soon as
/// it passes in Consul, not a whole discovery interval (here a minute) later.
#[tokio::test]
async fn a_client_finds_a_peer_that_starts_after_it_without_waiting_an_interval() {
    let infra = Infra::get();
    let name = unique("echo-late");
    let env = keel_common::config::Env::default()
        .with("CONSUL_HTTP_ADDR", &infra.consul_http)
        .with("KEEL_CONSUL__DNS_ADDR", &infra.consul_dns)
        .with("KEEL_CONSUL__DISCOVERY_INTERVAL", "60s");
    let settings = keel_common::Settings::from_env("late-client", &env).unwrap();
    let factory = ClientFactory::new(&settings, Metrics::disabled());
    let mut client = EchoClient::new(factory.channel(&name).unwrap());
    let err = client.echo(echo("too early")).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");

    let _late = echo_process(&consul_env(&infra, &name));
    passing_ports(&name, 1, CONSUL_WAIT).await;
    let reply = eventually(
        "the client finds the new instance well within its 60 s discovery interval",
        Duration::from_secs(10),
        || {
            let mut c = client.clone();
            async move { c.echo(echo("found")).await.ok() }
        },
    )
    .await;
    assert_eq!(reply.into_inner().message, "found");
}

/// Wait-for-ready (gRPC's call option): with it, a call to a service with no instance yet waits, within its
/// deadline, for one to pass in Consul instead of failing UNAVAILABLE; set per service
/// (`client.wait_for_ready`) or per call (`WaitForReady` in the request's extensions). Without either, the same
/// call fails at once (the test above), and a wait that outlives the deadline is DEADLINE_EXCEEDED.
#[tokio::test]
async fn wait_for_ready_calls_wait_for_an_instance_within_their_deadline() {
    let infra = Infra::get();
    let name = unique("echo-wfr");
    let env = keel_common::config::Env::default()
        .with("CONSUL_HTTP_ADDR", &infra.consul_http)
        .with("KEEL_CONSUL__DNS_ADDR", &infra.consul_dns)
        .with("KEEL_CONSUL__DISCOVERY_INTERVAL", "500ms")
        .with("KEEL_CLIENT__WAIT_FOR_READY", &name);
    let settings = keel_common::Settings::from_env("wfr-client", &env).unwrap();
    let factory = ClientFactory::new(&settings, Metrics::disabled());
    let mut client = EchoClient::new(factory.channel(&name).unwrap());

    let mut short = tonic::Request::new(echo("too short a wait"));
    short.set_timeout(Duration::from_millis(700));
    let err = client.echo(short).await.unwrap_err();
    assert_eq!(err.code(), Code::DeadlineExceeded, "{err:?}");

    let mut waiting = tonic::Request::new(echo("waited"));
    waiting.set_timeout(Duration::from_secs(30));
    let call = tokio::spawn(async move { client.echo(waiting).await });
    // Per call, on a channel whose settings do not name the service.
    let plain = ClientFactory::new(&infra.client_settings(), Metrics::disabled());
    let mut per_call = EchoClient::new(plain.channel(&name).unwrap());
    let mut asked = tonic::Request::new(echo("asked to wait"));
    asked.set_timeout(Duration::from_secs(30));
    asked.extensions_mut().insert(keel_common::WaitForReady);
    let asked = tokio::spawn(async move { per_call.echo(asked).await });
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(!call.is_finished() && !asked.is_finished(), "both wait");

    let _late = echo_process(&consul_env(&infra, &name));
    let reply = call
        .await
        .unwrap()
        .expect("the call waits for the instance");
    assert_eq!(reply.into_inner().message, "waited");
    let reply = asked.await.unwrap().expect("the call that asked waits too");
    assert_eq!(reply.into_inner().message, "asked to wait");
}

#[tokio::test]
async fn client_balances_over_consul_dns_and_survives_sigkill() {
    let infra = Infra::get();
    let name = unique("echo-lb");
    let mut a = echo_process(&consul_env(&infra, &name));
    let _b = echo_process(&consul_env(&infra, &name));
    passing_ports(&name, 2, CONSUL_WAIT).await;

    let factory = ClientFactory::new(&infra.client_settings(), Metrics::disabled());
    let client = EchoClient::new(factory.channel(&name).unwrap());
    let mut by_instance: HashMap<String, usize> = HashMap::new();
    // Discovery may publish one instance before the other; call until both have answered (bounded).
    let mut client_a = client.clone();
    for _ in 0..100 {
        let r = client_a
            .echo(echo("spread"))
            .await
            .expect("call through consul dns");
        *by_instance.entry(r.into_inner().instance_id).or_default() += 1;
        if by_instance.len() == 2 && by_instance.values().all(|n| *n >= 3) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        by_instance.len(),
        2,
        "calls spread over both instances: {by_instance:?}"
    );

    let a_id = a
        .lines()
        .iter()
        .find_map(|l| l["instance"].as_str().map(str::to_owned))
        .unwrap();
    a.kill(); // SIGKILL: no deregistration, no goodbye

    let policy = factory.retry_policy();
    let mut answered_by = HashMap::<String, usize>::new();
    for i in 0..40 {
        let r = policy
            .call(Idempotent::Yes, || {
                let mut c = client.clone();
                async move { c.echo(echo("after kill")).await }
            })
            .await
            .unwrap_or_else(|s| panic!("call {i} after SIGKILL failed: {s:?}"));
        *answered_by.entry(r.into_inner().instance_id).or_default() += 1;
    }
    assert!(
        !answered_by.contains_key(&a_id),
        "the killed instance cannot answer: {answered_by:?}"
    );
    assert_eq!(answered_by.values().sum::<usize>(), 40);
}

/// Proof 3: SIGTERM → health NOT_SERVING, deregistered from Consul, the in-flight call completes, exit 0.
#[tokio::test]
async fn sigterm_goes_not_serving_deregisters_drains_and_exits_zero() {
    let infra = Infra::get();
    let name = unique("echo-term");
    let mut env = consul_env(&infra, &name);
    env.push(("KEEL_CONSUL__DISCOVERY_INTERVAL", "2s".into()));
    let mut p = echo_process(&env);
    let port = passing_ports(&name, 1, CONSUL_WAIT).await[0];
    let addr = format!("127.0.0.1:{port}").parse().unwrap();

    let mut client = EchoClient::new(direct(addr));
    let in_flight = tokio::spawn(async move {
        client
            .echo(EchoRequest {
                message: "slow".into(),
                delay_ms: 3000,
                ..Default::default()
            })
            .await
    });
    // The call is in the handler once the server logged it.
    eventually(
        "the slow call reached the handler",
        Duration::from_secs(10),
        || async {
            p.lines()
                .iter()
                .any(|l| l["fields"]["text"] == "slow")
                .then_some(())
        },
    )
    .await;
    p.signal("TERM");

    let mut health = HealthClient::new(direct(addr));
    eventually("health turns NOT_SERVING", Duration::from_secs(5), || {
        let mut h = health.clone();
        async move {
            let s = h
                .check(HealthCheckRequest {
                    service: String::new(),
                })
                .await
                .ok()?
                .into_inner()
                .status;
            (s == ServingStatus::NotServing as i32).then_some(())
        }
    })
    .await;
    let agent = infra.agent();
    eventually(
        "instance deregistered from consul",
        Duration::from_secs(10),
        || async {
            agent
                .health_service(&name, false)
                .await
                .ok()?
                .is_empty()
                .then_some(())
        },
    )
    .await;
    let _ = &mut health;

    let answer = in_flight
        .await
        .unwrap()
        .expect("in-flight call completes during shutdown");
    assert_eq!(answer.into_inner().message, "slow");
    let status = p.wait_exit(Duration::from_secs(20)).await;
    assert_eq!(status.code(), Some(0), "output:\n{}", p.output());
    let order: Vec<String> = p
        .lines()
        .iter()
        .filter_map(|l| {
            l["message"]
                .as_str()
                .filter(|m| m.starts_with("shutdown:") || m.starts_with("deregistered"))
                .map(str::to_owned)
        })
        .collect();
    assert_eq!(
        order,
        [
            "shutdown: health NOT_SERVING",
            "deregistered from consul",
            "shutdown: waiting for clients to re-resolve",
            "shutdown: draining in-flight calls",
            "shutdown: done"
        ]
    );
}

/// Sums the last hour of a whisper file, read from its 1-second archive (`whisper-fetch` prints
/// `timestamp\tvalue`, `None` for empty slots).
fn whisper_sum(path: &std::path::Path) -> Option<f64> {
    if !path.exists() {
        return None;
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .ok()?
        .as_secs();
    let out = Command::new("whisper-fetch")
        .arg("--from")
        .arg((now - 3600).to_string())
        .arg(path)
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    Some(
        text.lines()
            .filter_map(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
            .sum(),
    )
}

/// Proof 4: after calls, the RPC's counters and timer are in Graphite's whisper files, via the StatsD daemon.
/// The server keeps 2 latencies per method and second (`statsd.timer_samples`): the 10 calls are sent as a
/// sample with its rate, and StatsD still counts 10.
#[tokio::test]
async fn rpc_metrics_reach_graphite_through_statsd() {
    let infra = Infra::get();
    let prefix = unique("t").replace('-', "");
    let mut p = echo_process(&[
        ("KEEL_STATSD__ADDR", infra.statsd.clone()),
        ("KEEL_STATSD__PREFIX", prefix.clone()),
        ("KEEL_STATSD__TIMER_SAMPLES", "2".into()),
    ]);
    let mut client = EchoClient::new(direct(p.addr().await));
    for _ in 0..5 {
        client.echo(echo("counted")).await.unwrap();
    }
    for _ in 0..2 {
        let err = client
            .echo(EchoRequest {
                fail_with_code: Code::NotFound as i32,
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::NotFound);
    }

    // The same layer on the client side: calls through a factory channel are timed as the caller sees them.
    let addr = p.addr().await;
    let client_settings = keel_common::config::Settings::from_env(
        "metrics-client",
        &keel_common::config::Env::default()
            .with("KEEL_STATSD__ADDR", &infra.statsd)
            .with("KEEL_STATSD__PREFIX", &prefix)
            .with("KEEL_CLIENT__STATIC_ENDPOINTS", format!("echo={addr}")),
    )
    .unwrap();
    let metrics = Metrics::new(&client_settings).unwrap();
    let mut via_factory = EchoClient::new(
        ClientFactory::new(&client_settings, metrics.clone())
            .channel("echo")
            .unwrap(),
    );
    // Flushed every second, as a service process does (a single flush can run before the queue drained).
    metrics.spawn_flusher(Duration::from_secs(1), || 0);
    for _ in 0..3 {
        via_factory.echo(echo("client side")).await.unwrap();
    }
    let client_requests = infra.whisper_dir.join(format!(
        "stats_counts/{prefix}/metrics-client/grpc/client/Echo/Echo/requests.wsp"
    ));

    let base = format!("{prefix}/echo/grpc/server/Echo/Echo");
    let counts = infra.whisper_dir.join("stats_counts");
    let requests = counts.join(format!("{base}/requests.wsp"));
    let not_found = counts.join(format!("{base}/status/NOT_FOUND.wsp"));
    let ok = counts.join(format!("{base}/status/OK.wsp"));
    let latency = infra
        .whisper_dir
        .join(format!("stats/timers/{base}/latency/count.wsp"));
    let inflight = infra.whisper_dir.join(format!(
        "stats/gauges/{prefix}/echo/grpc/server/inflight.wsp"
    ));
    eventually(
        "counters and timer in graphite",
        Duration::from_secs(40),
        || async {
            let r = whisper_sum(&requests)?;
            let nf = whisper_sum(&not_found)?;
            let okc = whisper_sum(&ok)?;
            let lat = whisper_sum(&latency)?;
            let client = whisper_sum(&client_requests)?;
            whisper_sum(&inflight)?;
            let timed = (lat - 10.0).abs() < 0.01;
            (r == 10.0 && nf == 2.0 && okc == 8.0 && timed && client == 3.0).then_some(())
        },
    )
    .await;
    // graphite-web, as ops see it: its render API draws the same counter from the same files.
    let target = format!("stats_counts.{prefix}.echo.grpc.server.Echo.Echo.requests");
    eventually(
        "graphite-web renders the counter",
        Duration::from_secs(30),
        || async {
            let series = render(&infra, &target)?;
            let sum: f64 = series[0]["datapoints"]
                .as_array()?
                .iter()
                .filter_map(|p| p[0].as_f64())
                .sum();
            (sum == 10.0).then_some(())
        },
    )
    .await;
    p.signal("TERM");
    assert!(p.wait_exit(Duration::from_secs(20)).await.success());
}

/// Proof 5 (first half): the call's log lines, with its trace id, can be consumed from the service's topic.
#[tokio::test]
async fn log_lines_with_trace_id_reach_the_service_kafka_topic() {
    let infra = Infra::get();
    let name = unique("echo-logs");
    let mut p = echo_process(&[
        ("KEEL_SERVICE__NAME", name.clone()),
        ("KEEL_KAFKA__BROKERS", infra.kafka.clone()),
        ("KEEL_LOG__TOPIC_PARTITIONS", "2".into()),
        ("KEEL_LOG__RETENTION", "2h".into()),
    ]);
    let trace_id = unique("trace");
    let mut client = EchoClient::new(direct(p.addr().await));
    let mut req = tonic::Request::new(echo("logged"));
    req.metadata_mut()
        .insert("x-trace-id", trace_id.parse().unwrap());
    let answer = client.echo(req).await.unwrap().into_inner();
    assert_eq!(
        answer.trace_id, trace_id,
        "the handler sees the caller's trace id"
    );

    let want = trace_id.clone();
    let (line, _c) = TopicReader::new(&infra.kafka, &format!("logs.{name}"))
        .until(Duration::from_secs(40), move |v| {
            v["trace_id"] == want.as_str()
        })
        .await;
    assert_eq!(line["service"], name.as_str());
    assert_eq!(line["level"], "INFO");
    assert_eq!(line["fields"]["text"], "logged");
    assert_eq!(line["fields"]["method"], "/keel.example.v1.Echo/Echo");
    assert!(line["instance"].as_str().unwrap().starts_with(&name));
    assert!(line["timestamp"].as_str().unwrap().ends_with('Z'));

    // Consumers can filter without parsing: the instance is the key, level and trace id are headers.
    let want = trace_id.clone();
    let (record, _c) = TopicReader::new(&infra.kafka, &format!("logs.{name}"))
        .record_until(Duration::from_secs(40), move |r| {
            r.header("trace_id") == Some(want.as_str())
        })
        .await;
    assert_eq!(record.key.as_deref(), line["instance"].as_str());
    assert_eq!(record.header("level"), Some("INFO"));
    // The topic is the project's: its partitions and retention, not the broker's defaults (3, 7 days).
    assert_eq!(
        keel_common::testsuite::topic_shape(&infra.kafka, &format!("logs.{name}")),
        (2, "7200000".to_owned())
    );
    // Each librdkafka client is a thread `rdk:main` of its own (plus one per broker, buffers, connections):
    // once the log topic exists, the shipper's producer is the only one. The admin client that made the topic
    // is gone, and the event bus makes its producer at its first event, which echo never publishes.
    let pid = p.pid();
    let clients = || {
        std::fs::read_dir(format!("/proc/{pid}/task"))
            .map(|tasks| {
                tasks
                    .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
                    .filter(|comm| comm.trim() == "rdk:main")
                    .count()
            })
            .unwrap_or_default()
    };
    eventually(
        "one librdkafka client in echo",
        Duration::from_secs(10),
        || async { (clients() == 1).then_some(()) },
    )
    .await;
    p.signal("TERM");
    assert!(p.wait_exit(Duration::from_secs(20)).await.success());
}

/// Deadlines and trace ids cross service boundaries: A, called with a 3 s deadline and a trace id, forwards to
/// B (found through Consul DNS); B sees the same trace id and only what is left of the deadline.
#[tokio::test]
async fn deadline_and_trace_id_propagate_to_downstream_services() {
    let infra = Infra::get();
    let (a_name, b_name) = (unique("echo-up"), unique("echo-down"));
    let _a = echo_process(&consul_env(&infra, &a_name));
    let _b = echo_process(&consul_env(&infra, &b_name));
    passing_ports(&a_name, 1, CONSUL_WAIT).await;
    passing_ports(&b_name, 1, CONSUL_WAIT).await;

    let factory = ClientFactory::new(&infra.client_settings(), Metrics::disabled());
    let mut client = EchoClient::new(factory.channel(&a_name).unwrap());
    let trace_id = unique("trace");
    // A waits 300 ms before forwarding, so B must see at least that much less.
    let mut req = tonic::Request::new(EchoRequest {
        forward_to: b_name.clone(),
        delay_ms: 300,
        ..echo("hop")
    });
    req.set_timeout(Duration::from_secs(3));
    req.metadata_mut()
        .insert("x-trace-id", trace_id.parse().unwrap());
    let a = eventually(
        "A reaches B through consul dns",
        Duration::from_secs(20),
        || {
            let mut c = client.clone();
            let mut r = tonic::Request::new(req.get_ref().clone());
            *r.metadata_mut() = req.metadata().clone();
            r.set_timeout(Duration::from_secs(3));
            async move { c.echo(r).await.ok().map(|r| r.into_inner()) }
        },
    )
    .await;
    let b = a.downstream.expect("B's answer");
    assert!(b.instance_id.starts_with(&b_name));
    assert_eq!(a.trace_id, trace_id);
    assert_eq!(b.trace_id, trace_id, "trace id propagated");
    // Every call is logged and timed on both sides: A's outgoing call to B, B's incoming one.
    let call_logged = |p: &ServiceProcess, side: &str| {
        p.lines().iter().any(|l| {
            let f = &l["fields"];
            l["message"] == "grpc call"
                && f["side"] == side
                && f["method"] == "/keel.example.v1.Echo/Echo"
                && f["status"] == "OK"
                && f["duration_ms"].as_f64().is_some_and(|d| d >= 0.0)
                && f["peer"]
                    .as_str()
                    .is_some_and(|p| !p.is_empty() || side == "client")
        })
    };
    let (a_proc, b_proc) = (&_a, &_b);
    eventually(
        "A logs its client call and B its server call",
        Duration::from_secs(5),
        || async { (call_logged(a_proc, "client") && call_logged(b_proc, "server")).then_some(()) },
    )
    .await;
    assert!(
        a.deadline_remaining_ms > 0 && a.deadline_remaining_ms <= 3000,
        "A saw {}",
        a.deadline_remaining_ms
    );
    assert!(b.deadline_remaining_ms > 0, "B saw a deadline");
    assert!(
        b.deadline_remaining_ms + 300 <= a.deadline_remaining_ms,
        "B sees the remaining time: A {} B {}",
        a.deadline_remaining_ms,
        b.deadline_remaining_ms
    );

    // A forwards delay_ms too: with 600 ms spent in A, B is given ~400 ms of the caller's 1 s, cannot sleep
    // 600 ms, and the caller sees DEADLINE_EXCEEDED. B logged the shortened deadline it was given (with the
    // caller's full second it would have finished). Which of A and B times out first is a race (their
    // deadlines are the same instant), so the proof is B's view of the deadline, not who stopped first.
    let mut req = tonic::Request::new(EchoRequest {
        forward_to: b_name.clone(),
        delay_ms: 600,
        ..echo("slow hop")
    });
    req.set_timeout(Duration::from_millis(1000));
    let err = client.echo(req).await.unwrap_err();
    assert_eq!(err.code(), Code::DeadlineExceeded, "{err:?}");
    let b_saw_ms = eventually(
        "B logs the slow hop with the deadline it was given",
        Duration::from_secs(10),
        || async {
            _b.lines().iter().find_map(|l| {
                (l["message"] == "echo" && l["fields"]["text"] == "slow hop")
                    .then(|| l["fields"]["deadline_remaining_ms"].as_u64())
                    .flatten()
            })
        },
    )
    .await;
    assert!(
        b_saw_ms > 0 && b_saw_ms < 600,
        "B was given the remaining ~400 ms, not the caller's full 1000 ms: {b_saw_ms}"
    );
}

/// Deadlines: the caller's deadline reaches the server as the remaining time, and an exceeded one is
/// DEADLINE_EXCEEDED at the client.
#[tokio::test]
async fn deadline_propagates_and_is_enforced() {
    let _infra = Infra::get();
    let p = echo_process(&[]);
    let addr = p.addr().await;
    let settings = keel_common::config::Settings::from_env(
        "test-client",
        &keel_common::config::Env::default()
            .with("KEEL_CLIENT__STATIC_ENDPOINTS", format!("echo={addr}")),
    )
    .unwrap();
    let factory = ClientFactory::new(&settings, Metrics::disabled());
    let mut client = EchoClient::new(factory.channel("echo").unwrap());

    let mut req = tonic::Request::new(echo("timed"));
    req.set_timeout(Duration::from_millis(1500));
    let r = client.echo(req).await.unwrap().into_inner();
    assert!(
        r.deadline_remaining_ms > 0 && r.deadline_remaining_ms <= 1500,
        "{}",
        r.deadline_remaining_ms
    );

    let mut req = tonic::Request::new(EchoRequest {
        delay_ms: 2000,
        ..echo("too slow")
    });
    req.set_timeout(Duration::from_millis(200));
    let err = client.echo(req).await.unwrap_err();
    assert_eq!(err.code(), Code::DeadlineExceeded, "{err:?}");

    let err = client
        .echo(EchoRequest {
            fail_with_code: 99,
            ..echo("bad")
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().contains("fail_with_code"),
        "{}",
        err.message()
    );
}

/// The platform's own gauges reach Graphite from a process with outboxes (the embedded KillrVideo server):
/// each outbox's backlog and dead letters, and the events its consumers dead-lettered.
#[tokio::test]
async fn outbox_and_dead_letter_gauges_reach_graphite() {
    let infra = Infra::get();
    let prefix = unique("g").replace('-', "");
    let dir = std::env::temp_dir().join(unique("keel-gauges"));
    let mut p = ServiceProcess::bare(
        "killrvideo-server",
        &[
            ("KEEL_GRPC__LISTEN_ADDR", "127.0.0.1:0".into()),
            ("KEEL_DATABASE__DIR", dir.display().to_string()),
            ("KEEL_STATSD__ADDR", infra.statsd.clone()),
            ("KEEL_STATSD__PREFIX", prefix.clone()),
        ],
    );
    p.addr().await;
    let gauges = infra
        .whisper_dir
        .join(format!("stats/gauges/{prefix}/killrvideo"));
    let files: Vec<_> = [
        "events/dead_letters.wsp",
        "outbox/video-catalog/backlog.wsp",
        "outbox/video-catalog/dead_letters.wsp",
        "outbox/ratings/backlog.wsp",
        "outbox/comments/backlog.wsp",
        "outbox/user-management/backlog.wsp",
    ]
    .iter()
    .map(|f| gauges.join(f))
    .collect();
    eventually(
        "the gauges in graphite",
        Duration::from_secs(40),
        || async { files.iter().all(|f| whisper_sum(f).is_some()).then_some(()) },
    )
    .await;
    p.signal("TERM");
    assert!(p.wait_exit(Duration::from_secs(20)).await.success());
}

/// The generated dashboards, as ops see them: `keel dashboards --load` saves them into graphite-web, and after
/// calls (some failing) every target of the echo service's dashboard renders a series with data.
#[tokio::test]
async fn generated_dashboards_load_into_graphite_web_and_every_echo_target_has_data() {
    let infra = Infra::get();
    let prefix = unique("d").replace('-', "");
    let mut p = echo_process(&[
        ("KEEL_STATSD__ADDR", infra.statsd.clone()),
        ("KEEL_STATSD__PREFIX", prefix.clone()),
    ]);
    let client = EchoClient::new(direct(p.addr().await));
    load_dashboards(&infra, &prefix, "30minutes");
    let load = |name: &str| {
        let url = format!("{}/dashboard/load/{name}", infra.graphite_url);
        let out = Command::new("curl").args(["-fsS", &url]).output().unwrap();
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap_or_default()
    };
    let board = load(&format!("{prefix}.Echo"));
    let targets: Vec<String> = board["state"]["graphs"]
        .as_array()
        .expect("the echo dashboard is in graphite-web")
        .iter()
        .flat_map(|g| g[1]["target"].as_array().cloned().unwrap_or_default())
        .filter_map(|t| t.as_str().map(str::to_owned))
        .collect();
    assert_eq!(targets.len(), 7, "{targets:?}");
    assert!(load(&format!("{prefix}.fleet"))["state"]["graphs"].is_array());

    let has_data = |target: &str| {
        render(&infra, target)?
            .as_array()?
            .iter()
            .any(|s| {
                s["datapoints"]
                    .as_array()
                    .is_some_and(|d| d.iter().any(|p| p[0].is_number()))
            })
            .then_some(())
    };
    eventually(
        "every target of the echo dashboard renders data",
        Duration::from_secs(60),
        || {
            let mut c = client.clone();
            let targets = targets.clone();
            async move {
                for code in [Code::Ok, Code::NotFound] {
                    let _ = c
                        .echo(EchoRequest {
                            message: "dashboards".into(),
                            fail_with_code: code as i32,
                            ..Default::default()
                        })
                        .await;
                }
                let missing: Vec<&String> =
                    targets.iter().filter(|t| has_data(t).is_none()).collect();
                missing.is_empty().then_some(())
            }
        },
    )
    .await;

    // As a person sees it: headless Chromium opens the dashboard, and the screenshot shows drawn lines (coloured
    // pixels), well beyond the same dashboard for a prefix with no metrics at all ("No Data" graphs).
    let empty = unique("n").replace('-', "");
    // Ten seconds of steady calls, shown by the dashboards loaded again to show the last minute (their own
    // range is 30 minutes, where this test's data would be a sliver).
    let start = std::time::Instant::now();
    let mut c = client.clone();
    while start.elapsed() < Duration::from_secs(10) {
        for code in [Code::Ok, Code::Ok, Code::NotFound] {
            let mut req = echo("steady");
            req.fail_with_code = code as i32;
            let _ = c.echo(req).await;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    for p in [&prefix, &empty] {
        load_dashboards(&infra, p, "1minutes");
    }
    let url = |board: &str| format!("{}/dashboard/{board}", infra.graphite_url);
    let drawn = coloured_pixels(&screenshot(&url(&format!("{prefix}.Echo"))));
    let blank = coloured_pixels(&screenshot(&url(&format!("{empty}.Echo"))));
    // The page around the graphs is the same in both (toolbar icons); the difference is the lines.
    assert!(
        drawn >= blank + 1_000,
        "graphs drawn: {drawn} coloured pixels; with no data: {blank}"
    );
    p.signal("TERM");
    assert!(p.wait_exit(Duration::from_secs(20)).await.success());
}

/// The series graphite-web's render API draws for `target` over the last 15 minutes (JSON), if it answers.
fn render(infra: &Infra, target: &str) -> Option<serde_json::Value> {
    let url = format!("{}/render?format=json&from=-15min", infra.graphite_url);
    let out = Command::new("curl")
        .args([
            "-fsS",
            "--data-urlencode",
            &format!("target={target}"),
            &url,
        ])
        .output()
        .ok()?;
    serde_json::from_slice(&out.stdout).ok()
}

/// `keel dashboards --prefix PREFIX --last LAST --load <graphite-web>`, which must succeed.
fn load_dashboards(infra: &Infra, prefix: &str, last: &str) {
    let out = Command::new(keel_common::testsuite::binary("keel"))
        .args(["dashboards", "--prefix", prefix, "--last", last])
        .args(["--load", &infra.graphite_url])
        .output()
        .expect("keel dashboards");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A 1400×1100 screenshot of `url` by headless Chromium (Debian's, installed by `make infra-install`), with
/// the flags that keep it off the network; returns the PNG file.
fn screenshot(url: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(unique("chromium"));
    let png = dir.with_extension("png");
    let out = Command::new("chromium")
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--window-size=1400,1100",
            "--virtual-time-budget=20000",
        ])
        .arg(format!("--user-data-dir={}", dir.display()))
        .arg(format!("--screenshot={}", png.display()))
        .arg(url)
        .output()
        .expect("chromium (make infra-install installs it)");
    assert!(
        png.exists(),
        "no screenshot: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let _ = std::fs::remove_dir_all(&dir);
    png
}

/// Pixels of a PNG whose colour is strong (max − min channel > 100): graph lines and legend swatches, not the
/// UI's greys and pale blues.
fn coloured_pixels(path: &std::path::Path) -> usize {
    let decoder = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(path).unwrap()));
    let mut reader = decoder.read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size()];
    let info = reader.next_frame(&mut buf).unwrap();
    let channels = info.color_type.samples();
    buf[..info.buffer_size()]
        .chunks(channels)
        .filter(|px| {
            let rgb = &px[..3.min(px.len())];
            rgb.iter().max().unwrap() - rgb.iter().min().unwrap() > 100
        })
        .count()
}
