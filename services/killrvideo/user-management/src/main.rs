//! The user-management service as its own process.

#[tokio::main]
async fn main() -> std::process::ExitCode {
    keel_common::App::of::<user_management::UserManagement>()
        .run()
        .await
}
