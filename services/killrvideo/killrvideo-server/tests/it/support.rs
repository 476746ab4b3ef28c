//! Shared by the test binaries: the all-in-one server started in process.

use std::net::SocketAddr;

use keel_common::config::{Env, Settings};
use tonic::transport::Channel;
use uuid::Uuid;

/// Starts the all-in-one server on 127.0.0.1:0 with its SQLite files in a fresh directory.
pub async fn start_embedded() -> (SocketAddr, Channel) {
    let dir = std::env::temp_dir().join(format!("keel-embedded-{}", Uuid::new_v4().simple()));
    let env = Env::default()
        .with("KEEL_DATABASE__DIR", dir.display().to_string())
        .with("KEEL_LOG__STDOUT", "false");
    let settings = Settings::from_env("killrvideo", &env).unwrap();
    let addr = killrvideo_server::app().spawn(settings).await.unwrap();
    let ch = Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    (addr, ch)
}
