//! `make chaos`'s scenarios, shortened, on the fleet of network namespaces (`scripts/fleet.sh`, root needed):
//! the fleet is brought up when it is not (and down again after), every instance must announce its machine's
//! address in Consul, then every scenario runs under load and the test fails on any target missed.

use std::{path::PathBuf, process::Command};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn fleet(args: &[&str]) -> (bool, String) {
    let out = Command::new(root().join("scripts/fleet.sh"))
        .args(args)
        .output()
        .expect("scripts/fleet.sh");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// Takes the fleet down on drop if this test brought it up.
struct Up(bool);

impl Drop for Up {
    fn drop(&mut self) {
        // A failure's evidence: every machine's process logs, kept beside the other tests' before the fleet goes.
        if std::thread::panicking() {
            let dir =
                std::env::var("KEEL_FLEET_DIR").unwrap_or_else(|_| "/var/tmp/keel-fleet".into());
            let keep = std::env::temp_dir().join("keel-fleet-logs");
            let _ = Command::new("cp").args(["-r", &dir]).arg(&keep).status();
        }
        if self.0 {
            fleet(&["down"]);
        }
    }
}

#[test]
fn every_scenario_meets_its_targets_on_a_fleet_of_machines() {
    let (_, passing) = fleet(&["passing"]);
    let was_up = passing.trim().parse::<usize>().is_ok_and(|n| n > 0);
    let _up = Up(!was_up);
    if !was_up {
        let (ok, out) = fleet(&["up"]);
        assert!(ok, "scripts/fleet.sh up:\n{out}");
    }

    // Every instance registered with its machine's agent announces that machine's address.
    let catalog = Command::new(root().join("scripts/fleet.sh"))
        .args([
            "exec",
            "ops",
            "curl",
            "-sf",
            "http://127.0.0.1:8500/v1/health/state/any",
        ])
        .output()
        .unwrap();
    let (ok, status) = fleet(&["status"]);
    assert!(ok, "{status}");
    let list = fleet(&["list"]).1;
    let names: Vec<&str> = list
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    let checks: serde_json::Value = serde_json::from_slice(&catalog.stdout).unwrap();
    let mut seen = 0;
    for c in checks.as_array().unwrap() {
        let Some(svc) = c["ServiceName"].as_str().filter(|s| names.contains(s)) else {
            continue;
        };
        let node = c["Node"].as_str().unwrap();
        assert!(node.starts_with("app-"), "{svc} runs on {node}");
        seen += 1;
    }
    assert!(seen > 0, "no instance in Consul:\n{status}");
    let nodes = Command::new(root().join("scripts/fleet.sh"))
        .args([
            "exec",
            "ops",
            "curl",
            "-sf",
            "http://127.0.0.1:8500/v1/catalog/service/echo",
        ])
        .output()
        .unwrap();
    let echo: serde_json::Value = serde_json::from_slice(&nodes.stdout).unwrap();
    for e in echo.as_array().unwrap() {
        assert_eq!(
            e["ServiceAddress"], e["Address"],
            "an instance announces its machine's address: {e}"
        );
        assert!(
            e["Address"].as_str().unwrap().starts_with("10.77.0."),
            "{e}"
        );
    }

    // Every call's outcome, kept with the other tests' logs for a closer look at a missed figure.
    let outcomes = std::env::temp_dir().join("keel-chaos-outcomes.jsonl");
    let out = Command::new(env!("CARGO_BIN_EXE_keel-chaos"))
        .args(["run", "--short", "--root"])
        .arg(root())
        .env("KEEL_CHAOS_OUTCOMES", &outcomes)
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&out.stdout);
    let progress = String::from_utf8_lossy(&out.stderr);
    // The failed calls first, each with its message, then the table: a view of the output cut after its
    // first lines (CI's) still shows the cause.
    let failed: Vec<&str> = progress
        .lines()
        .filter(|l| l.contains("failed call at"))
        .collect();
    println!("failed calls:\n{}\n{table}", failed.join("\n"));
    assert!(
        out.status.success(),
        "a target was missed (the failed calls and the table above); progress:\n{progress}"
    );
}
