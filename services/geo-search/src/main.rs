//! The geo-search service as its own process.

#[tokio::main]
async fn main() -> std::process::ExitCode {
    keel_common::run(geo_search::SERVICE, geo_search::build).await
}
