//! The loader end to end against the embedded server: the real data sets go in through the gRPC APIs, the
//! summary says so, and a second run creates nothing twice.

use std::process::Command;

use keel_common::testsuite::binary;
use keel_protos::killrvideo::search::{
    SearchVideosRequest, search_service_client::SearchServiceClient,
};

fn load(addr: &str) -> String {
    let data = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../../shared/data");
    let out = Command::new(binary("killrvideo-loader"))
        .env_remove("CONSUL_HTTP_ADDR")
        .env("RUST_BACKTRACE", "0")
        .args([
            "--addr",
            addr,
            "--max-users",
            "20",
            "--max-plays-per-video",
            "2",
        ])
        .arg("--data")
        .arg(&data)
        .output()
        .expect("run the loader");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "loader failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// `kind ok existed failed` of the summary table.
fn row(summary: &str, kind: &str) -> (u64, u64, u64) {
    let cols: Vec<u64> = summary
        .lines()
        .find(|l| l.starts_with(kind))
        .unwrap_or_else(|| panic!("no {kind} row in:\n{summary}"))
        .split_whitespace()
        .skip(1)
        .map(|c| c.parse().unwrap())
        .collect();
    (cols[0], cols[1], cols[2])
}

// The loader runs as a blocking child process: the server needs threads of its own meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_real_data_loads_once_and_a_rerun_duplicates_nothing() {
    let (addr, ch) = crate::support::start_embedded().await;
    let addr = addr.to_string();
    let first = load(&addr);
    let (users, _, _) = row(&first, "users");
    assert_eq!(
        users,
        20 + 3 + 150 + 135,
        "20 movie-data users + 3 uploaders, 150 + 135 YouTube users:\n{first}"
    );
    assert_eq!(row(&first, "videos"), (1511, 0, 0), "{first}");
    assert_eq!(row(&first, "comments"), (771, 0, 0), "{first}");
    assert_eq!(row(&first, "ratings"), (884, 0, 0), "{first}");

    let second = load(&addr);
    assert_eq!(row(&second, "users"), (0, users, 0), "{second}");
    assert_eq!(row(&second, "videos"), (0, 1511, 0), "{second}");
    assert_eq!(
        row(&second, "plays"),
        (0, 0, 0),
        "plays are recorded only for videos a run created:\n{second}"
    );

    // The trailers are searchable (events flowed through the in-process bus).
    let mut search = SearchServiceClient::new(ch);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let r = search
            .search_videos(SearchVideosRequest {
                query: "star wars".into(),
                page_size: 3,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        if r.videos.first().is_some_and(|v| v.name == "Episode 7") {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the Star Wars trailer never ranked first: {r:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}
