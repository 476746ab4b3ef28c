//! The video-lab service as its own process.

#[tokio::main]
async fn main() -> std::process::ExitCode {
    keel_common::App::of::<video_lab::VideoLab>().run().await
}
