//! gzip with another gRPC implementation (Python grpcio, installed by `scripts/infra.sh install tools`): our
//! clients accept gzip answers whatever typed client sits on top and send gzip to targets in `client.gzip`;
//! our servers take grpcio's gzip requests (issue 14).

use std::{
    io::{BufRead, BufReader},
    path::PathBuf,
    process::{Command, Stdio},
    time::Duration,
};

use crate::support::*;
use keel_common::{ClientFactory, Metrics, config::Env};
use keel_protos::keel::example::v1::{EchoRequest, echo_client::EchoClient};

/// The grpcio script and a directory with its generated modules on `PYTHONPATH`.
fn python() -> (PathBuf, PathBuf, PathBuf) {
    let python = PathBuf::from(std::env::var("KEEL_PYTHON").expect("KEEL_PYTHON: run `make test`"));
    let here = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let out = std::env::temp_dir().join(format!("grpcio-{}", unique("gen")));
    std::fs::create_dir_all(&out).unwrap();
    run(Command::new(&python)
        .args(["-m", "grpc_tools.protoc", "-I"])
        .arg(here.join("../../../protos/stack"))
        .arg(format!("--python_out={}", out.display()))
        .arg(format!("--grpc_python_out={}", out.display()))
        .arg("keel/example/v1/echo.proto"));
    (python, here.join("tests/interop/echo_grpcio.py"), out)
}

struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test]
async fn gzip_answers_of_grpcio_are_read_by_our_client_and_our_gzip_requests_by_both_servers() {
    let (python, script, modules) = python();
    let mut server = Command::new(&python)
        .arg(&script)
        .arg("serve")
        .env("PYTHONPATH", &modules)
        .stdout(Stdio::piped())
        .spawn()
        .expect("grpcio server");
    let mut first = String::new();
    BufReader::new(server.stdout.take().unwrap())
        .read_line(&mut first)
        .unwrap();
    let _server = Killed(server);
    let addr: std::net::SocketAddr = format!("127.0.0.1:{}", first.trim()).parse().unwrap();
    let request = || EchoRequest {
        message: "hello grpcio ".repeat(100),
        ..Default::default()
    };

    // grpcio compresses its answer for a client that accepts gzip; a bare tonic client that says so but was
    // not built to decompress fails on it…
    let mut bare = EchoClient::new(direct(addr));
    let mut asks = tonic::Request::new(request());
    asks.metadata_mut()
        .insert("grpc-accept-encoding", "gzip".parse().unwrap());
    let refused = bare.echo(asks).await.unwrap_err();
    assert!(refused.message().contains("gzip"), "{refused:?}");

    // …while a platform channel reads it, with or without compressing its own request (grpcio takes both).
    for gzip in ["", "echo"] {
        let env = Env::default()
            .with("KEEL_CLIENT__STATIC_ENDPOINTS", format!("echo={addr}"))
            .with("KEEL_CLIENT__GZIP", gzip);
        let settings = keel_common::Settings::from_env("interop", &env).unwrap();
        let mut ours = EchoClient::new(
            ClientFactory::new(&settings, Metrics::disabled())
                .channel("echo")
                .unwrap(),
        );
        let reply = ours.echo(request()).await.unwrap().into_inner();
        assert_eq!(reply.instance_id, "grpcio");
        assert_eq!(reply.message, request().message);
    }

    // Our server takes grpcio's gzip request, and our client's when `client.gzip` names it: the call log says
    // each arrived compressed.
    let p = echo_process(&[]);
    let ours_addr = p.addr().await;
    let out = run(Command::new(&python)
        .arg(&script)
        .args(["call", &ours_addr.to_string()])
        .env("PYTHONPATH", &modules));
    assert_eq!(out.trim(), "from grpcio xxxx");
    let env = Env::default()
        .with("KEEL_CLIENT__STATIC_ENDPOINTS", format!("echo={ours_addr}"))
        .with("KEEL_CLIENT__GZIP", "*");
    let settings = keel_common::Settings::from_env("interop", &env).unwrap();
    let mut ours = EchoClient::new(
        ClientFactory::new(&settings, Metrics::disabled())
            .channel("echo")
            .unwrap(),
    );
    assert_eq!(
        ours.echo(request()).await.unwrap().into_inner().message,
        request().message
    );
    let compressed = eventually("both calls logged", Duration::from_secs(5), || async {
        let n = p
            .lines()
            .iter()
            .filter(|l| {
                l["message"] == "grpc call"
                    && l["fields"]["method"] == "/keel.example.v1.Echo/Echo"
                    && l["fields"]["encoding"] == "gzip"
            })
            .count();
        (n >= 2).then_some(n)
    })
    .await;
    assert_eq!(compressed, 2);
    let _ = std::fs::remove_dir_all(&modules);
}
