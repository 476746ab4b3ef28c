//! The cache against a real accounts service (its own gRPC server, on the real PostgreSQL): namespacing,
//! authentication, the quota with its QuotaFailure detail, TTLs, the memory bound, dry runs, dumps.

use std::time::Duration;

use cache::{Cache, CacheSettings};
use keel_common::{
    App, ClientFactory, Metrics,
    config::{Env, Settings},
    error::Failure,
    testsuite,
};
use keel_protos::rpc::{
    Account, CreateAccountReq, DumpReq, GetReq, StoreReq, accounts_client::AccountsClient,
    cache_server::Cache as _,
};
use tokio_stream::StreamExt;
use tonic::{Code, Request};
use tonic_types::StatusExt;

use crate::support::{ADMIN_TOKEN, as_operator};

/// An accounts server on 127.0.0.1:0 over a fresh PostgreSQL database, and a client factory that reaches it.
async fn accounts_server() -> ClientFactory {
    accounts_at().await.1
}

/// [`accounts_server`], with its address.
async fn accounts_at() -> (std::net::SocketAddr, ClientFactory) {
    let db = testsuite::postgres().await;
    let env = Env::default()
        .with("KEEL_DATABASE__URL", &db.url)
        .with("KEEL_ACCOUNTS__ADMIN_TOKEN", ADMIN_TOKEN)
        .with("KEEL_LOG__STDOUT", "false");
    let app = App::of::<accounts::Accounts>();
    let addr = app.spawn(app.settings(&env).unwrap()).await.unwrap();
    let client_env =
        Env::default().with("KEEL_CLIENT__STATIC_ENDPOINTS", format!("accounts={addr}"));
    let clients = ClientFactory::new(
        &Settings::from_env("cache", &client_env).unwrap(),
        Metrics::disabled(),
    );
    (addr, clients)
}

async fn account(clients: &ClientFactory, name: &str, max: i64) -> (Account, String) {
    let mut c = AccountsClient::new(clients.channel("accounts").unwrap());
    let r = c
        .create_account(as_operator(CreateAccountReq {
            name: name.into(),
            max_cache_keys: max,
        }))
        .await
        .unwrap()
        .into_inner();
    (r.account.unwrap(), r.token)
}

async fn used(clients: &ClientFactory, token: &str) -> i64 {
    let accounts = AccountsClient::new(clients.channel("accounts").unwrap());
    crate::support::used_cache_keys(&accounts, token).await
}

fn store(token: &str, key: &str, val: &[u8]) -> Request<StoreReq> {
    Request::new(StoreReq {
        key: key.into(),
        val: val.to_vec(),
        account_token: token.into(),
        ttl_ms: 0,
    })
}

fn get(token: &str, key: &str) -> Request<GetReq> {
    Request::new(GetReq {
        key: key.into(),
        account_token: token.into(),
    })
}

fn cache(clients: &ClientFactory, max_bytes: usize) -> Cache {
    Cache::new(
        &CacheSettings {
            max_bytes,
            accounts_token: keel_common::config::Secret::new(ADMIN_TOKEN),
            ..Default::default()
        },
        AccountsClient::new(clients.channel("accounts").unwrap()),
        clients.retry_policy(),
    )
}

async fn eventually_used(clients: &ClientFactory, token: &str, want: i64) {
    for _ in 0..100 {
        if used(clients, token).await == want {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!(
        "used_cache_keys never became {want} (is {})",
        used(clients, token).await
    );
}

#[tokio::test]
async fn accounts_are_isolated_authenticated_and_held_to_their_quota() {
    let clients = accounts_server().await;
    let c = cache(&clients, 1 << 20);
    let (_, alice) = account(&clients, "alice", 5).await;
    let (_, bob) = account(&clients, "bob", 100).await;

    c.store(store(&alice, "k", b"alice's")).await.unwrap();
    assert_eq!(
        c.get(get(&alice, "k")).await.unwrap().into_inner().val,
        b"alice's"
    );
    let err = c.get(get(&bob, "k")).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "bob cannot see alice's key");
    c.store(store(&bob, "k", b"bob's")).await.unwrap();
    assert_eq!(
        c.get(get(&alice, "k")).await.unwrap().into_inner().val,
        b"alice's"
    );

    // The token may come in metadata instead.
    let mut by_header = get("", "k");
    by_header
        .metadata_mut()
        .insert("authorization", format!("Bearer {bob}").parse().unwrap());
    assert_eq!(c.get(by_header).await.unwrap().into_inner().val, b"bob's");
    for bad in ["", "kc_forged"] {
        let err = c.store(store(bad, "x", b"v")).await.unwrap_err();
        assert_eq!(err.code(), Code::Unauthenticated, "{bad:?}");
    }

    // Quota 5: the 6th distinct key fails with a QuotaFailure; overwriting a key costs nothing.
    for i in 1..5 {
        c.store(store(&alice, &format!("k{i}"), b"v"))
            .await
            .unwrap();
    }
    c.store(store(&alice, "k1", b"again")).await.unwrap();
    let err = c.store(store(&alice, "k5", b"v")).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(
        err.get_details_quota_failure().is_some(),
        "QuotaFailure detail reaches the caller: {err:?}"
    );
    assert_eq!(used(&clients, &alice).await, 5);

    // A dry run checks and stores nothing.
    let mut dry = store(&bob, "dry", b"v");
    dry.metadata_mut()
        .insert("dry-run", "true".parse().unwrap());
    c.store(dry).await.unwrap();
    assert_eq!(
        c.get(get(&bob, "dry")).await.unwrap_err().code(),
        Code::NotFound
    );
    assert_eq!(used(&clients, &bob).await, 1);
    let mut dry_over = store(&alice, "k6", b"v");
    dry_over
        .metadata_mut()
        .insert("dry-run", "true".parse().unwrap());
    assert_eq!(
        c.store(dry_over).await.unwrap_err().code(),
        Code::FailedPrecondition
    );
}

/// 200 concurrent Stores of new keys against a quota of 150: Stores waiting behind a reservation in flight
/// share the next one, so a handful of ReserveKeys calls serve them all; exactly 150 succeed, the others get
/// FAILED_PRECONDITION with a QuotaFailure, and accounts counts exactly the keys held.
#[tokio::test]
async fn concurrent_stores_share_reservations_and_the_quota_stays_exact() {
    let clients = accounts_server().await;
    let (acct, t) = account(&clients, "burst", 150).await;
    let c = cache(&clients, 1 << 20);
    let results =
        futures::future::join_all((0..200).map(|i| c.store(store(&t, &format!("k{i:03}"), b"v"))))
            .await;
    assert_eq!(results.iter().filter(|r| r.is_ok()).count(), 150);
    for err in results.iter().filter_map(|r| r.as_ref().err()) {
        assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
        let failure = Failure::from(err);
        assert_eq!(failure.reason.as_deref(), Some("QUOTA_EXCEEDED"));
        assert_eq!(
            failure.quota_violations[0].0,
            format!("account:{}", acct.id)
        );
        assert!(!failure.temporary, "retrying will not help");
    }
    assert_eq!(used(&clients, &t).await, 150);
    let calls = c.quota().reservation_calls();
    eprintln!("{calls} ReserveKeys calls for 200 Stores");
    assert!(
        calls <= 10,
        "{calls} ReserveKeys calls for 200 Stores: reservations were not shared"
    );
    let mut stored = 0;
    for i in 0..200 {
        stored += usize::from(c.get(get(&t, &format!("k{i:03}"))).await.is_ok());
    }
    assert_eq!(stored, 150, "exactly the Stores that succeeded hold a key");
}

#[tokio::test]
async fn expired_and_evicted_keys_give_their_quota_back_and_memory_stays_bounded() {
    let clients = accounts_server().await;
    let (_, t) = account(&clients, "ttl", 1000).await;
    let c = cache(&clients, 1 << 20);
    let mut short = store(&t, "short", b"v");
    short.get_mut().ttl_ms = 30;
    c.store(short).await.unwrap();
    tokio::time::sleep(Duration::from_millis(60)).await;
    assert_eq!(
        c.get(get(&t, "short")).await.unwrap_err().code(),
        Code::NotFound
    );
    eventually_used(&clients, &t, 0).await;

    // Room for about 10 entries of 1 KiB: 50 stores leave at most that, and the quota matches what is held.
    let per = 1024 + 36 + 3 + cache::ENTRY_OVERHEAD;
    let small = cache(&clients, per * 10);
    for i in 0..50 {
        small
            .store(store(&t, &format!("k{i:02}"), &[7; 1024]))
            .await
            .unwrap();
    }
    assert!(small.bytes() <= per * 10, "{} bytes held", small.bytes());
    eventually_used(&clients, &t, 10).await;
    assert_eq!(
        small
            .get(get(&t, "k49"))
            .await
            .unwrap()
            .into_inner()
            .val
            .len(),
        1024,
        "newest kept"
    );
    assert_eq!(
        small.get(get(&t, "k00")).await.unwrap_err().code(),
        Code::NotFound,
        "oldest evicted"
    );
    let err = small
        .store(store(&t, "huge", &vec![0; per * 11]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
}

#[tokio::test]
async fn dump_streams_every_pair_of_the_account_in_key_order() {
    let clients = accounts_server().await;
    let (_, t) = account(&clients, "dump", 10_000).await;
    let (_, other) = account(&clients, "other", 10).await;
    let c = cache(&clients, 64 << 20);
    for i in 0..1000 {
        c.store(store(&t, &format!("key{i:04}"), format!("v{i}").as_bytes()))
            .await
            .unwrap();
    }
    c.store(store(&other, "secret", b"s")).await.unwrap();
    let mut stream = c
        .dump(Request::new(DumpReq {
            account_token: t.clone(),
        }))
        .await
        .unwrap()
        .into_inner();
    let mut n = 0;
    while let Some(item) = stream.next().await {
        let item = item.unwrap();
        assert_eq!(item.key, format!("key{n:04}"));
        assert_eq!(item.val, format!("v{n}").into_bytes());
        n += 1;
    }
    assert_eq!(n, 1000, "every pair of the account, none of another's");
}

/// A TTL past the documented maximum is INVALID_ARGUMENT naming `ttl_ms` (an `i64::MAX` one used to overflow
/// the expiry instant and panic the handler); the maximum itself is accepted.
#[tokio::test]
async fn ttls_are_range_checked() {
    let clients = accounts_server().await;
    let c = cache(&clients, 1 << 20);
    let (_, token) = account(&clients, "ttl", 10).await;
    for ttl in [i64::MAX, cache::MAX_TTL_MS + 1, -1] {
        let mut req = store(&token, "k", b"v");
        req.get_mut().ttl_ms = ttl;
        let err = c.store(req).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{ttl}");
        assert!(err.message().starts_with("ttl_ms"), "{}", err.message());
    }
    let mut req = store(&token, "k", b"v");
    req.get_mut().ttl_ms = cache::MAX_TTL_MS;
    c.store(req).await.unwrap();
}

/// A response stream holds its call's slot of `grpc.max_concurrent_requests` until it ends, and ends at its
/// deadline even when its reader has stalled (with a DEADLINE_EXCEEDED status after what was sent), which gives
/// the slot back. (A stream used to free its slot with its headers and to outlive its deadline.)
#[tokio::test]
async fn a_stream_holds_its_slot_for_its_life_and_ends_at_its_deadline() {
    use keel_protos::rpc::cache_client::CacheClient;
    let (accounts, clients) = accounts_at().await;
    let (_, token) = account(&clients, "streamer", 10_000).await;
    let env = Env::default()
        .with(
            "KEEL_CLIENT__STATIC_ENDPOINTS",
            format!("accounts={accounts}"),
        )
        .with("KEEL_CACHE__ACCOUNTS_TOKEN", ADMIN_TOKEN)
        .with("KEEL_GRPC__MAX_CONCURRENT_REQUESTS", "1")
        .with("KEEL_LOG__STDOUT", "false");
    let app = App::of::<Cache>();
    let addr = app.spawn(app.settings(&env).unwrap()).await.unwrap();
    let mut cache = CacheClient::new(
        tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect()
            .await
            .unwrap(),
    );
    // 8 MB, far more than the HTTP/2 windows: the server blocks on flow control while nobody reads.
    for i in 0..1000 {
        cache
            .store(store(&token, &format!("k{i:04}"), &[7u8; 8192]))
            .await
            .unwrap();
    }
    let mut dump = Request::new(DumpReq {
        account_token: token.clone(),
    });
    dump.set_timeout(Duration::from_millis(800));
    let mut stream = cache.dump(dump).await.unwrap().into_inner();
    stream.next().await.unwrap().unwrap();

    let busy = cache.get(get(&token, "k0000")).await.unwrap_err();
    assert_eq!(
        busy.code(),
        Code::ResourceExhausted,
        "the open stream holds the only slot: {}",
        busy.message()
    );
    testsuite::eventually(
        "the stream's deadline gives its slot back",
        Duration::from_secs(10),
        || {
            let mut cache = cache.clone();
            let token = token.clone();
            async move { cache.get(get(&token, "k0000")).await.ok() }
        },
    )
    .await;
    let mut last = None;
    while let Some(item) = stream.next().await {
        if let Err(status) = item {
            last = Some(status);
            break;
        }
    }
    let last = last.expect("the stream ends with a status, not with every key");
    assert_eq!(last.code(), Code::DeadlineExceeded, "{}", last.message());
}

/// A key over 1 KiB is INVALID_ARGUMENT on `key`, for Store and Get alike.
#[tokio::test]
async fn keys_are_bounded() {
    let clients = accounts_server().await;
    let c = cache(&clients, 1 << 20);
    let (_, token) = account(&clients, "keys", 10).await;
    let long = "k".repeat(cache::MAX_KEY_BYTES + 1);
    let err = c.store(store(&token, &long, b"v")).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().starts_with("key"), "{}", err.message());
    let err = c.get(get(&token, &long)).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    c.store(store(&token, &"k".repeat(cache::MAX_KEY_BYTES), b"v"))
        .await
        .unwrap();
}
