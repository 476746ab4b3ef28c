//! `keel`, the operator's command, run as operators run it (the built binary) against real echo processes and
//! the real Consul, Kafka, StatsD and graphite-web started by `scripts/infra.sh`: each verb's output carries the
//! services, calls and values the test caused (issue 12).

use std::{
    io::{BufRead, BufReader},
    process::{Command, Output, Stdio},
    time::Duration,
};

use crate::support::*;
use keel_common::{ClientFactory, Metrics};
use keel_protos::keel::example::v1::{EchoRequest, echo_client::EchoClient};
use serde_json::Value;

/// `keel ARGS` with the servers' addresses in its environment, as `eval "$(scripts/infra.sh env)"` leaves it.
fn keel(infra: &Infra, args: &[&str]) -> Output {
    Command::new(keel_common::testsuite::binary("keel"))
        .args(args)
        .env("CONSUL_HTTP_ADDR", &infra.consul_http)
        .env("KEEL_CONSUL__DNS_ADDR", &infra.consul_dns)
        .env("KEEL_KAFKA_BROKERS", &infra.kafka)
        .env("KEEL_GRAPHITE_URL", &infra.graphite_url)
        .env("NO_COLOR", "1")
        .output()
        .expect("keel")
}

/// `keel ARGS --json`'s document (fails the test when the verb fails).
fn keel_json(infra: &Infra, args: &[&str]) -> Value {
    let out = keel(infra, &[args, &["--json"]].concat());
    assert!(
        out.status.success(),
        "keel {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("one JSON document")
}

/// An echo instance registered in Consul as `name`, shipping logs to Kafka and metrics under `prefix`.
fn echo_instance(infra: &Infra, name: &str, prefix: &str) -> ServiceProcess {
    let mut env = consul_env(infra, name);
    env.push(("KEEL_KAFKA__BROKERS", infra.kafka.clone()));
    env.push(("KEEL_STATSD__ADDR", infra.statsd.clone()));
    env.push(("KEEL_STATSD__PREFIX", prefix.to_owned()));
    echo_process(&env)
}

/// One request through two services: `keel call` finds A through Consul DNS and learns the method through
/// reflection, A forwards to B; `keel logs --trace-id` then shows the request's path through both services'
/// topics in time order, and `keel tap` showed A serving it.
#[tokio::test]
async fn keel_call_logs_and_tap_follow_one_request_through_the_fleet() {
    let infra = Infra::get();
    let prefix = unique("op").replace('-', "");
    let (a, b) = (unique("echo-opa"), unique("echo-opb"));
    let _pa = echo_instance(&infra, &a, &prefix);
    let _pb = echo_instance(&infra, &b, &prefix);
    passing_ports(&a, 1, CONSUL_WAIT).await;
    passing_ports(&b, 1, CONSUL_WAIT).await;

    // What A offers, through reflection.
    let listed = keel(&infra, &["call", &a]);
    assert!(
        listed.status.success(),
        "{}",
        String::from_utf8_lossy(&listed.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&listed.stdout).trim(),
        "keel.example.v1.Echo/Echo"
    );

    let trace_id = unique("trace").replace('-', "");
    let data = format!(r#"{{"message": "hop", "forwardTo": "{b}"}}"#);
    let called = keel(
        &infra,
        &[
            "call",
            &a,
            "keel.example.v1.Echo/Echo",
            "-d",
            &data,
            "--trace-id",
            &trace_id,
        ],
    );
    assert!(
        called.status.success(),
        "{}",
        String::from_utf8_lossy(&called.stderr)
    );
    let reply: Value = serde_json::from_slice(&called.stdout).expect("the reply as JSON");
    assert_eq!(reply["message"], "hop");
    assert_eq!(reply["traceId"], trace_id.as_str());
    assert!(reply["instanceId"].as_str().unwrap().starts_with(&a));
    assert!(
        reply["downstream"]["instanceId"]
            .as_str()
            .unwrap()
            .starts_with(&b)
    );

    // Errors: a status is printed with its code and exit code 1; a request that does not fit its type is
    // refused before anything is sent, naming the field.
    let failed = keel(
        &infra,
        &[
            "call",
            &a,
            "keel.example.v1.Echo/Echo",
            "-d",
            r#"{"failWithCode": 5}"#,
        ],
    );
    assert_eq!(failed.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&failed.stderr).contains("NotFound"));
    let misfit = keel(
        &infra,
        &[
            "call",
            &a,
            "keel.example.v1.Echo/Echo",
            "-d",
            r#"{"mesage": 1}"#,
        ],
    );
    assert_eq!(misfit.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&misfit.stderr).contains("mesage"));

    // The request's path: A's server line, A's call to B, B's server line, each with the trace id.
    let lines = eventually(
        "the request's call-log lines in both topics",
        Duration::from_secs(40),
        || async {
            let doc = keel(
                &infra,
                &["logs", "--trace-id", &trace_id, "--since", "5m", "--json"],
            );
            let lines: Vec<Value> = String::from_utf8_lossy(&doc.stdout)
                .lines()
                .filter_map(|l| serde_json::from_str(l).ok())
                .collect();
            let calls = lines
                .iter()
                .filter(|l| l["target"] == "keel::calls")
                .count();
            (calls >= 3).then_some(lines)
        },
    )
    .await;
    assert!(lines.iter().all(|l| l["trace_id"] == trace_id.as_str()));
    let call = |service: &str, side: &str| {
        lines.iter().any(|l| {
            l["service"] == service && l["target"] == "keel::calls" && l["fields"]["side"] == side
        })
    };
    assert!(
        call(&a, "server") && call(&a, "client") && call(&b, "server"),
        "{lines:#?}"
    );
    let times: Vec<&str> = lines
        .iter()
        .map(|l| l["timestamp"].as_str().unwrap())
        .collect();
    assert!(
        times.windows(2).all(|w| w[0] <= w[1]),
        "time order: {times:?}"
    );

    // Filters on one service's topic: level and text.
    let readable = keel(
        &infra,
        &["logs", &b, "--trace-id", &trace_id, "--grep", "hop"],
    );
    let text = String::from_utf8_lossy(&readable.stdout);
    assert!(
        text.contains(" INFO ") && text.contains("text=hop") && !text.contains(&a),
        "{text}"
    );
    let warnings = keel(
        &infra,
        &[
            "logs",
            &b,
            "--trace-id",
            &trace_id,
            "--level",
            "warn",
            "--json",
        ],
    );
    assert!(warnings.status.success());
    assert!(warnings.stdout.is_empty(), "every line of the call is INFO");

    // tap: A's served calls of Echo/Echo (from a minute back, so the call above is among them).
    let mut tap = Command::new(keel_common::testsuite::binary("keel"))
        .args([
            "tap",
            &a,
            "--method",
            "Echo/Echo",
            "--since",
            "1m",
            "--max",
            "2",
            "--json",
        ])
        .env("KEEL_KAFKA_BROKERS", &infra.kafka)
        .stdout(Stdio::piped())
        .spawn()
        .expect("keel tap");
    let stdout = tap.stdout.take().unwrap();
    let taps = tokio::task::spawn_blocking(move || {
        BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
            .filter_map(|l| serde_json::from_str::<Value>(&l).ok())
            .collect::<Vec<_>>()
    });
    let taps = tokio::time::timeout(Duration::from_secs(30), taps)
        .await
        .expect("keel tap stops after --max calls")
        .unwrap();
    assert_eq!(taps.len(), 2, "{taps:#?}");
    assert!(taps.iter().all(|t| t["fields"]["side"] == "server"
        && t["fields"]["method"] == "/keel.example.v1.Echo/Echo"
        && t["service"] == a.as_str()));
    let statuses: Vec<&str> = taps
        .iter()
        .map(|t| t["fields"]["status"].as_str().unwrap())
        .collect();
    assert_eq!(statuses, ["OK", "NOT_FOUND"]);
    assert_eq!(taps[0]["trace_id"], trace_id.as_str());
    assert!(tap.wait().unwrap().success());
}

/// `keel services` and `keel stat` read what the service served from Graphite (24 calls OK, 6 INTERNAL) and
/// its instances from Consul; a SIGKILLed instance is listed critical and turns the service from passing to
/// warning.
#[tokio::test]
async fn keel_services_and_stat_show_rates_error_ratios_and_a_killed_instance() {
    let infra = Infra::get();
    let prefix = unique("op").replace('-', "");
    let name = unique("echo-stat");
    let one = echo_instance(&infra, &name, &prefix);
    let _two = echo_instance(&infra, &name, &prefix);
    passing_ports(&name, 2, CONSUL_WAIT).await;

    let factory = ClientFactory::new(&infra.client_settings(), Metrics::disabled());
    let mut client = EchoClient::new(factory.channel(&name).unwrap());
    for i in 0..30 {
        let req = EchoRequest {
            message: "counted".into(),
            fail_with_code: if i % 5 == 0 {
                tonic::Code::Internal as i32
            } else {
                0
            },
            ..Default::default()
        };
        let _ = client.echo(req).await;
    }

    let stat = eventually(
        "keel stat counts every call",
        Duration::from_secs(60),
        || async {
            let doc = keel_json(
                &infra,
                &["stat", &name, "--prefix", &prefix, "--window", "10m"],
            );
            let rpc = doc["rpcs"]
                .as_array()?
                .iter()
                .find(|r| r["rpc"] == "Echo/Echo")?
                .clone();
            // Every counter of the 30 calls has reached Graphite (each metric is its own whisper file).
            let answered = rpc["success_rate"].as_f64()? * 30.0
                + rpc["errors"]
                    .as_object()?
                    .values()
                    .filter_map(Value::as_f64)
                    .sum::<f64>();
            (rpc["requests"] == 30.0 && (answered - 30.0).abs() < 1e-9).then_some(rpc)
        },
    )
    .await;
    assert_eq!(stat["success_rate"], 0.8);
    assert_eq!(stat["errors"], serde_json::json!({"INTERNAL": 6.0}));
    assert!(stat["latency_ms"]["p99"].is_number(), "{stat}");
    let table = keel(
        &infra,
        &["stat", &name, "--prefix", &prefix, "--window", "10m"],
    );
    let text = String::from_utf8_lossy(&table.stdout);
    assert!(
        text.contains("Echo/Echo") && text.contains("80.00%") && text.contains("INTERNAL 6"),
        "{text}"
    );

    let service = |doc: &Value| {
        doc["services"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|s| s["service"] == name.as_str())
            .cloned()
            .unwrap_or_default()
    };
    let seen = eventually(
        "keel services shows the calls",
        Duration::from_secs(60),
        || async {
            let doc = keel_json(
                &infra,
                &["services", "--prefix", &prefix, "--window", "10m"],
            );
            let s = service(&doc);
            (s["error_ratio"]
                .as_f64()
                .is_some_and(|e| (e - 0.2).abs() < 1e-9))
            .then_some(s)
        },
    )
    .await;
    assert_eq!(
        (seen["passing"].as_u64(), seen["instances"].as_u64()),
        (Some(2), Some(2))
    );
    assert_eq!(seen["state"], "passing");
    assert_eq!(
        seen["versions"],
        serde_json::json!([env!("CARGO_PKG_VERSION")])
    );

    let killed_port = format!("-{}-", one.addr().await.port());
    one.signal("KILL");
    let after = eventually(
        "the killed instance fails its check",
        Duration::from_secs(30),
        || async {
            let s = service(&keel_json(&infra, &["services", "--prefix", &prefix]));
            (s["passing"] == 1).then_some(s)
        },
    )
    .await;
    assert_eq!(after["instances"], 2);
    assert_eq!(after["state"], "warning");
    let critical = after["critical_instances"].as_array().unwrap();
    assert_eq!(critical.len(), 1, "{after}");
    assert!(
        critical[0].as_str().unwrap().contains(&killed_port),
        "{after}"
    );
}

/// `keel health`, as cron runs it: exit 0 with a passing instance and its telemetry gauges listed; after a SIGKILL, the instance shows
/// critical and the exit code is 1.
#[tokio::test]
async fn keel_health_reports_a_killed_instance_as_critical_with_a_failing_exit_code() {
    let infra = Infra::get();
    let prefix = unique("op").replace('-', "");
    let name = unique("echo-health");
    let p = echo_instance(&infra, &name, &prefix);
    passing_ports(&name, 1, CONSUL_WAIT).await;
    let health = || {
        keel(
            &infra,
            &["health", "--json", "--service", &name, "--prefix", &prefix],
        )
    };
    let state = |out: &Output, kind: &str| {
        let v: Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        v["checks"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|c| c["kind"] == kind && c["name"] == name.as_str())
            .map(|c| c["state"].as_str().unwrap_or_default().to_owned())
    };
    // Once its gauges reached Graphite, the process's telemetry shows too: nothing dropped.
    let ok = eventually(
        "the instance and its telemetry gauges",
        Duration::from_secs(40),
        || async {
            let out = health();
            state(&out, "telemetry").is_some().then_some(out)
        },
    )
    .await;
    assert_eq!(
        ok.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&ok.stdout)
    );
    assert_eq!(state(&ok, "service").as_deref(), Some("passing"));
    assert_eq!(state(&ok, "telemetry").as_deref(), Some("passing"));

    p.signal("KILL");
    let failing = eventually(
        "the killed instance is critical",
        Duration::from_secs(30),
        || async {
            let out = health();
            (state(&out, "service").as_deref() == Some("critical")).then_some(out)
        },
    )
    .await;
    assert_eq!(failing.status.code(), Some(1));
}
