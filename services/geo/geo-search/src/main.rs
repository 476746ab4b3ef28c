//! The geo-search service as its own process.

#[tokio::main]
async fn main() -> std::process::ExitCode {
    keel_common::App::of::<geo_search::GeoSearch>().run().await
}
