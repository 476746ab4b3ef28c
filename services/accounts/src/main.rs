//! The accounts service as its own process.

#[tokio::main]
async fn main() -> std::process::ExitCode {
    keel_common::run("accounts", accounts::build).await
}
