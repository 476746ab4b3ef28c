//! The accounts service as its own process.

#[tokio::main]
async fn main() -> std::process::ExitCode {
    keel_common::App::of::<accounts::Accounts>().run().await
}
