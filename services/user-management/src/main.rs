//! The user-management service as its own process.

#[tokio::main]
async fn main() -> std::process::ExitCode {
    keel_common::run("user-management", user_management::build).await
}
