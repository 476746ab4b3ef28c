//! All eight KillrVideo services in one process, on one port: the way the reference back ends run and the way
//! the KillrVideo web front end and generator expect to find them (`backend:50101`, spec §1).
//!
//! Each service keeps its own database (`database.url` with `{service}`, by default one SQLite file per
//! service under `var/`); events travel on the platform's bus (in-process unless `kafka.brokers` is set).
//! The consumers (search, suggested-videos) are opened first so they are subscribed before any outbox relay
//! publishes.

use keel_common::{Platform, Server};

/// The address the KillrVideo clients expect.
pub const DEFAULT_LISTEN_ADDR: &str = "127.0.0.1:50101";

/// One server with every KillrVideo service.
///
/// # Errors
/// A service's database cannot be opened or migrated.
pub async fn build(platform: &Platform) -> anyhow::Result<Server> {
    let search = search::Search::open(platform).await?;
    let suggested = suggested_videos::SuggestedVideos::open(platform).await?;
    let users = user_management::UserManagement::open(platform).await?;
    let videos = video_catalog::VideoCatalog::open(platform).await?;
    let comments = comments::Comments::open(platform).await?;
    let ratings = ratings::Ratings::open(platform).await?;
    let statistics = statistics::Statistics::open(platform).await?;
    let mut server = Server::builder(platform);
    server = search.add_to(server);
    server = suggested.add_to(server);
    server = users.add_to(server);
    server = videos.add_to(server);
    server = comments.add_to(server);
    server = ratings.add_to(server);
    server = statistics.add_to(server);
    server = uploads::Uploads.add_to(server);
    Ok(server)
}
