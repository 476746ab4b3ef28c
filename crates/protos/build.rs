//! Compiles every .proto under `protos/` with `protox` (pure Rust: no system protoc), then generates the
//! prost messages and tonic clients/servers from the resulting descriptor set. The descriptor set is also written
//! to OUT_DIR so the server can offer it through gRPC reflection.

use std::{env, fs, path::PathBuf};

use prost::Message;

/// Include roots: each proto tree keeps its own import paths. KillrVideo's files import
/// `common/common_types.proto`, exactly as in killrvideo-service-protos.
const ROOTS: &[&str] = &["killrvideo", "stack"];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = PathBuf::from(env::var("CARGO_MANIFEST_DIR")?).join("../../protos");
    let out = PathBuf::from(env::var("OUT_DIR")?);
    let includes: Vec<PathBuf> = ROOTS.iter().map(|r| protos.join(r)).collect();

    let mut files = Vec::new();
    for root in &includes {
        collect(root, root, &mut files)?;
    }
    files.sort();
    println!("cargo:rerun-if-changed={}", protos.display());

    let fds = protox::compile(&files, &includes)?;
    fs::write(out.join("descriptor.bin"), fds.encode_to_vec())?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)?;
    Ok(())
}

/// Proto file names relative to their include root, as `import` statements name them.
fn collect(root: &PathBuf, dir: &PathBuf, out: &mut Vec<String>) -> std::io::Result<()> {
    for entry in fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            collect(root, &path, out)?;
        } else if path.extension().is_some_and(|e| e == "proto") {
            let rel = path.strip_prefix(root).expect("walked from root");
            out.push(rel.to_string_lossy().replace('\\', "/"));
        }
    }
    Ok(())
}
