//! `echo`: serves `keel.example.v1.Echo` on the platform. Configuration: see `keel_common::config`.

#[tokio::main]
async fn main() -> std::process::ExitCode {
    keel_common::App::of::<echo::EchoService>().run().await
}
