//! The suggested-videos service as its own process.

#[tokio::main]
async fn main() -> std::process::ExitCode {
    keel_common::run("suggested-videos", suggested_videos::build).await
}
