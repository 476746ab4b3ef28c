//! All eight KillrVideo services in one process, on one port: the way the reference back ends run and the way
//! the KillrVideo web front end and generator expect to find them (`backend:50101`, spec §1).
//!
//! Each service keeps its own database (`database.url` with `{service}`, by default one SQLite file per
//! service under `var/`); events travel on the platform's bus (in-process unless `kafka.brokers` is set).
//! The consumers (search, suggested-videos) are opened first so they are subscribed before any outbox relay
//! publishes.

use keel_common::App;

/// The address the KillrVideo clients expect.
pub const DEFAULT_LISTEN_ADDR: &str = "127.0.0.1:50101";

/// Every KillrVideo service on one server, as process `killrvideo` listening on [`DEFAULT_LISTEN_ADDR`] unless
/// `KEEL_GRPC__LISTEN_ADDR` says otherwise. The consumers come first, so they are subscribed before the writers
/// exist (the platform starts the outbox relays only once every service is open).
pub fn app() -> App {
    App::named("killrvideo")
        .default_env("KEEL_GRPC__LISTEN_ADDR", DEFAULT_LISTEN_ADDR)
        .with::<search::Search>()
        .with::<suggested_videos::SuggestedVideos>()
        .with::<user_management::UserManagement>()
        .with::<video_catalog::VideoCatalog>()
        .with::<comments::Comments>()
        .with::<ratings::Ratings>()
        .with::<statistics::Statistics>()
        .with::<uploads::Uploads>()
}
