//! The suggested-videos service as its own process.

#[tokio::main]
async fn main() -> std::process::ExitCode {
    keel_common::App::of::<suggested_videos::SuggestedVideos>()
        .run()
        .await
}
