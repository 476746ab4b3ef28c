//! The video-catalog service as its own process.

#[tokio::main]
async fn main() -> std::process::ExitCode {
    keel_common::App::of::<video_catalog::VideoCatalog>()
        .run()
        .await
}
