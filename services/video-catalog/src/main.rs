//! The video-catalog service as its own process.

#[tokio::main]
async fn main() -> std::process::ExitCode {
    keel_common::run("video-catalog", video_catalog::build).await
}
