//! geo-search as its own process on the real PostgreSQL + PostGIS, registered in the real Consul: the post's
//! client flow (find the service through Consul DNS, search by point, monitor), and a client that knows only
//! the post's own search.proto (grpcurl `-proto`), so the wire stays compatible.

use std::time::Duration;

use keel_common::{
    ClientFactory, Metrics,
    config::{Env, Settings},
    testsuite::{self, ServiceProcess, infra_var, passing_ports},
};
use keel_protos::geo::{AddThingRequest, SearchRequest, search_client::SearchClient};

/// The post's search.proto, verbatim.
const SEED_PROTO: &str = r#"syntax = "proto3";

import "google/protobuf/empty.proto";

message SearchRequest {
  string query = 1;
  float lat = 4;
  float lng = 5;
  int32 page_number = 2;
  int32 result_per_page = 3;
}

message SearchResponses {
    repeated SearchResponse responses = 1;
}

message SearchResponse {
    string response = 1;
}

message MonitorResponse {
    int32 n_things = 1;
}

service Search {
    rpc monitor(google.protobuf.Empty) returns (MonitorResponse) {}
    rpc search(SearchRequest) returns (SearchResponses) {}
}
"#;

fn grpcurl(port: u16, dir: &std::path::Path, method: &str, data: &str) -> serde_json::Value {
    let out = std::process::Command::new(infra_var("KEEL_GRPCURL"))
        .args(["-plaintext", "-import-path"])
        .arg(dir)
        .args(["-proto", "search.proto", "-d", data])
        .arg(format!("127.0.0.1:{port}"))
        .arg(method)
        .output()
        .expect("run grpcurl");
    assert!(
        out.status.success(),
        "grpcurl {method}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("grpcurl prints JSON")
}

/// A geo-search process on a fresh PostgreSQL database, registered under a name of its own: (name, database,
/// process, port), once it passes in Consul.
async fn started() -> (String, testsuite::TestDatabase, ServiceProcess, u16) {
    let name = testsuite::unique("geo-search");
    let db = testsuite::postgres().await;
    let p = ServiceProcess::spawn(
        "geo-search",
        &name,
        &[("KEEL_DATABASE__URL", db.url.clone())],
    );
    let port = passing_ports(&name, 1, Duration::from_secs(60)).await[0];
    (name, db, p, port)
}

/// A client of the geo-search registered as `name`, found through Consul DNS.
fn searcher(name: &str) -> SearchClient<keel_common::Channel> {
    let env = Env::default()
        .with("CONSUL_HTTP_ADDR", infra_var("CONSUL_HTTP_ADDR"))
        .with("KEEL_CONSUL__DNS_ADDR", infra_var("KEEL_CONSUL_DNS_ADDR"));
    let clients = ClientFactory::new(
        &Settings::from_env("geo-client", &env).unwrap(),
        Metrics::disabled(),
    );
    SearchClient::new(clients.channel(name).unwrap())
}

#[tokio::test(flavor = "multi_thread")]
async fn the_posts_client_finds_the_service_in_consul_and_searches() {
    let (name, _db, _p, port) = started().await;
    let mut client = searcher(&name);
    client
        .add_thing(AddThingRequest {
            name: "Central Park".into(),
            wkt: "POLYGON((-73.981 40.768, -73.958 40.800, -73.949 40.797, -73.973 40.764, -73.981 40.768))"
                .into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let found = client
        .search(SearchRequest {
            lat: 40.782,
            lng: -73.965,
            result_per_page: 10,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(found.responses[0].response, "Central Park");
    assert_eq!(client.monitor(()).await.unwrap().into_inner().n_things, 1);

    let dir = std::env::temp_dir().join(format!("seed-proto-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("search.proto"), SEED_PROTO).unwrap();
    let seed = grpcurl(
        port,
        &dir,
        "Search/search",
        r#"{"query": "park", "lat": 40.782, "lng": -73.965, "result_per_page": 10}"#,
    );
    assert_eq!(seed["responses"][0]["response"], "Central Park", "{seed}");
    let monitor = grpcurl(port, &dir, "Search/monitor", "{}");
    assert_eq!(monitor["nThings"], 1, "{monitor}");
}

#[tokio::test(flavor = "multi_thread")]
async fn without_postgresql_the_service_refuses_to_start_and_says_why() {
    let mut p = ServiceProcess::spawn(
        "geo-search",
        "geo-search-sqlite",
        &[("KEEL_DATABASE__URL", "sqlite::memory:".into())],
    );
    let status = p
        .wait(Duration::from_secs(30))
        .await
        .expect("exits instead of serving");
    assert!(!status.success());
    assert!(
        p.output().contains("needs PostgreSQL with PostGIS"),
        "{}",
        p.output()
    );
}

/// Natural Earth's countries (world-atlas, fetched by `make infra-install`) loaded by `geo-loader` through the
/// API of a geo-search found in Consul: every one of the 177 accepted, found by a point inside it and by name,
/// and a second run creates nothing.
#[tokio::test(flavor = "multi_thread")]
async fn natural_earths_countries_load_through_the_api() {
    let (name, _db, _p, _) = started().await;
    let load = || {
        let out = std::process::Command::new(testsuite::binary("geo-loader"))
            .args([
                "--service",
                &name,
                "--atlas",
                &infra_var("KEEL_WORLD_ATLAS"),
            ])
            .env("CONSUL_HTTP_ADDR", infra_var("CONSUL_HTTP_ADDR"))
            .env("KEEL_CONSUL__DNS_ADDR", infra_var("KEEL_CONSUL_DNS_ADDR"))
            .output()
            .expect("run geo-loader");
        let said = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(out.status.success(), "geo-loader:\n{said}");
        said
    };
    let first = load();
    assert!(
        first.contains("177 created, 0 already there, 0 refused, 0 failed"),
        "{first}"
    );

    let search = searcher(&name);
    let at = |lat: f32, lng: f32, query: &str, any_location: bool| {
        let mut search = search.clone();
        let req = SearchRequest {
            lat,
            lng,
            query: query.into(),
            any_location,
            result_per_page: 100,
            ..Default::default()
        };
        async move {
            let found = search.search(req).await.unwrap().into_inner();
            found
                .responses
                .into_iter()
                .map(|r| r.response)
                .collect::<Vec<_>>()
        }
    };
    assert_eq!(at(48.8566, 2.3522, "", false).await, ["France"], "Paris");
    assert_eq!(
        at(-34.60, -58.38, "", false).await,
        ["Argentina"],
        "Buenos Aires"
    );
    assert_eq!(at(35.68, 139.69, "", false).await, ["Japan"], "Tokyo");
    assert!(
        at(0.0, 0.0, "", false).await.is_empty(),
        "the Gulf of Guinea"
    );
    assert_eq!(
        at(0.0, 0.0, "zealand", true).await,
        ["New Zealand"],
        "by name, any case"
    );
    let lands = at(0.0, 0.0, "land", true).await;
    assert!(
        lands.contains(&"Finland".to_owned()) && lands.contains(&"Thailand".to_owned()),
        "{lands:?}"
    );
    let again = load();
    assert!(
        again.contains("0 created, 177 already there, 0 refused, 0 failed"),
        "{again}"
    );
}
