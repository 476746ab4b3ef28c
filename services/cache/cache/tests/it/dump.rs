//! Dump of 100,000 keys (over 100 MB of values) from a cache process, read by a slow client: the process's
//! peak resident memory grows by a small bounded amount while it streams, never by the size of the answer
//! (the talk's "not enough memory" problem, solved by streaming with HTTP/2 flow control).

use std::time::{Duration, Instant};

use futures::StreamExt as _;
use keel_common::testsuite::passing_ports;

use crate::support::{Deployment, as_operator};
use keel_protos::rpc::{
    CreateAccountReq, DumpReq, StoreReq, accounts_client::AccountsClient, cache_client::CacheClient,
};

const KEYS: usize = 100_000;
const VALUE_BYTES: usize = 1024;

/// `VmRSS` or `VmHWM` (peak) of process `pid`, in bytes.
fn memory(pid: u32, field: &str) -> usize {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: usize = status
        .lines()
        .find_map(|l| {
            l.strip_prefix(field)?
                .trim_start_matches(':')
                .trim()
                .strip_suffix(" kB")
        })
        .unwrap_or_else(|| panic!("{field} not in /proc/{pid}/status"))
        .trim()
        .parse()
        .unwrap();
    kb * 1024
}

/// Resets the peak resident size (`VmHWM`) of process `pid` to its current size (proc(5), `clear_refs`).
fn reset_peak(pid: u32) {
    std::fs::write(format!("/proc/{pid}/clear_refs"), "5").unwrap();
}

async fn direct(port: u16) -> tonic::transport::Channel {
    tonic::transport::Channel::from_shared(format!("http://127.0.0.1:{port}"))
        .unwrap()
        .connect()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn dumping_100k_keys_to_a_slow_reader_keeps_the_cache_memory_bounded() {
    let d = Deployment::start().await;
    let cache = d.cache(&[("KEEL_CACHE__MAX_BYTES", (512usize << 20).to_string())]);
    let cache_port = passing_ports(&d.cache_name, 1, Duration::from_secs(60)).await[0];
    let token = AccountsClient::new(direct(d.accounts_port).await)
        .create_account(as_operator(CreateAccountReq {
            name: "big".into(),
            max_cache_keys: KEYS as i64,
        }))
        .await
        .unwrap()
        .into_inner()
        .token;

    let client = CacheClient::new(direct(cache_port).await).max_decoding_message_size(8 << 20);
    let started = Instant::now();
    let stored = futures::stream::iter(0..KEYS)
        .map(|i| {
            let mut c = client.clone();
            let token = token.clone();
            async move {
                let mut val = vec![(i % 251) as u8; VALUE_BYTES];
                val[..8].copy_from_slice(&(i as u64).to_be_bytes());
                c.store(StoreReq {
                    key: format!("key{i:06}"),
                    val,
                    account_token: token,
                    ttl_ms: 0,
                })
                .await
            }
        })
        .buffer_unordered(64)
        .collect::<Vec<_>>()
        .await;
    let failed: Vec<_> = stored.iter().filter_map(|r| r.as_ref().err()).collect();
    assert!(
        failed.is_empty(),
        "{} Stores failed, first: {:?}",
        failed.len(),
        failed.first()
    );
    eprintln!("stored {KEYS} keys in {:?}", started.elapsed());

    let pid = cache.pid();
    let before = memory(pid, "VmRSS");
    reset_peak(pid);
    let mut dump = client
        .clone()
        .dump(DumpReq {
            account_token: token.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    // A reader that stops after the first item: the cache must wait for it, not buffer the rest.
    let first = dump.next().await.unwrap().unwrap();
    assert_eq!(first.key, "key000000");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let stalled = memory(pid, "VmHWM").saturating_sub(before);
    let mut n = 1;
    let mut last = first.key;
    while let Some(item) = dump.next().await {
        let item = item.unwrap();
        assert!(item.key > last, "key order: {} after {last}", item.key);
        let i: usize = item.key[3..].parse().unwrap();
        assert_eq!(item.val.len(), VALUE_BYTES);
        assert_eq!(
            item.val[..8],
            (i as u64).to_be_bytes(),
            "{}'s value",
            item.key
        );
        last = item.key;
        n += 1;
        if n % 10_000 == 0 {
            // Still slow now and then.
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    assert_eq!(n, KEYS, "every pair dumped");
    let peak = memory(pid, "VmHWM").saturating_sub(before);
    eprintln!(
        "cache rss before dump {} MiB; peak growth while stalled {} KiB, over the whole dump {} KiB",
        before >> 20,
        stalled >> 10,
        peak >> 10
    );
    let data = KEYS * VALUE_BYTES;
    assert!(
        before > data,
        "the cache holds the {} MiB of values ({} MiB resident)",
        data >> 20,
        before >> 20
    );
    assert!(
        peak < 16 << 20,
        "dumping {} MiB grew the cache by {} KiB: the answer was buffered",
        data >> 20,
        peak >> 10
    );
}
