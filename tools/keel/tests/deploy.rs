//! The rendered deployment files, checked by the tools that will read them (installed by `make infra-install`):
//! `consul validate` for the agent configurations, `systemd-analyze verify` for the units, Kafka's own
//! `StorageTool format` for the broker properties.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

fn deploy() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy")
}

/// The one directory under `$KEEL_CACHE` whose name starts with `prefix`.
fn cached(prefix: &str) -> PathBuf {
    let cache = PathBuf::from(std::env::var("KEEL_CACHE").expect("KEEL_CACHE: run `make test`"));
    std::fs::read_dir(&cache)
        .unwrap()
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with(prefix))
        })
        .unwrap_or_else(|| {
            panic!(
                "{prefix}* not under {}: run `make infra-install`",
                cache.display()
            )
        })
}

fn files(dir: &str, ext: &str) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = std::fs::read_dir(deploy().join(dir))
        .unwrap()
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == ext))
        .collect();
    out.sort();
    assert!(!out.is_empty(), "no .{ext} under deploy/{dir}");
    out
}

#[test]
fn consul_accepts_the_agent_configurations() {
    let consul = cached("consul-").join("consul");
    for f in files("consul", "hcl") {
        let out = Command::new(&consul)
            .arg("validate")
            .arg(&f)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}: {}{}",
            f.display(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn systemd_finds_nothing_to_say_about_the_units() {
    let tmp = std::env::temp_dir().join(format!("keel-units-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).unwrap();
    for f in files("systemd", "service") {
        // The binaries are not installed here: point ExecStart at one that exists, the rest stays as rendered.
        let text = std::fs::read_to_string(&f).unwrap();
        let exec = text
            .lines()
            .find(|l| l.starts_with("ExecStart="))
            .expect("ExecStart");
        let unit = tmp.join(f.file_name().unwrap());
        std::fs::write(&unit, text.replace(exec, "ExecStart=/bin/true")).unwrap();
        let out = Command::new("systemd-analyze")
            .arg("verify")
            .arg(&unit)
            .output()
            .unwrap();
        let said: Vec<String> = String::from_utf8_lossy(&out.stderr)
            .lines()
            .chain(String::from_utf8_lossy(&out.stdout).lines())
            .filter(|l| {
                l.contains(&*unit.to_string_lossy())
                    || l.contains(&*f.file_name().unwrap().to_string_lossy())
            })
            .map(str::to_owned)
            .collect();
        assert!(
            out.status.success() && said.is_empty(),
            "{}: {said:#?}",
            f.display()
        );
    }
    let _ = std::fs::remove_dir_all(&tmp);
}

#[test]
fn kafka_formats_storage_with_each_broker_configuration() {
    let classpath = format!("{}/*", cached("kafka-").join("libs").display());
    let tool = |args: &[&str]| {
        Command::new("java")
            .args(["-cp", &classpath, "kafka.tools.StorageTool"])
            .args(args)
            .output()
            .expect("java")
    };
    let id = String::from_utf8(tool(&["random-uuid"]).stdout).unwrap();
    let tmp = std::env::temp_dir().join(format!("keel-brokers-{}", std::process::id()));
    for f in files("kafka", "properties") {
        let data = tmp.join(f.file_stem().unwrap()).join("data");
        let text = std::fs::read_to_string(&f).unwrap();
        assert!(
            text.contains("min.insync.replicas=2\n")
                && text.contains("default.replication.factor=3\n")
        );
        let props = tmp.join(f.file_name().unwrap());
        std::fs::create_dir_all(&tmp).unwrap();
        let dirs = text
            .lines()
            .find(|l| l.starts_with("log.dirs="))
            .expect("log.dirs");
        std::fs::write(
            &props,
            text.replace(dirs, &format!("log.dirs={}", data.display())),
        )
        .unwrap();
        let out = tool(&["format", "-t", id.trim(), "-c", &props.to_string_lossy()]);
        assert!(
            out.status.success(),
            "{}: {}",
            f.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(data.join("meta.properties").exists());
    }
    let _ = std::fs::remove_dir_all(&tmp);
}
