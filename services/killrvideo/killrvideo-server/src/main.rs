//! `killrvideo-server`: every KillrVideo service in one process on 127.0.0.1:50101 (override with
//! `KEEL_GRPC__LISTEN_ADDR`), SQLite files under `var/`, no Consul, Kafka or StatsD needed.

#[tokio::main]
async fn main() -> std::process::ExitCode {
    killrvideo_server::app().run().await
}
