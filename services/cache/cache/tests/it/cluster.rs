//! Three cache instances and one accounts instance as their own processes, registered in the real Consul,
//! accounts on the real PostgreSQL; the client knows only the service names. Each key lives on exactly one
//! instance (rendezvous hashing over the instances Consul DNS reports), the quota holds exactly across the
//! three, and killing one instance loses only its share.

use std::{
    collections::{BTreeSet, HashMap},
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use keel_common::{
    config::Secret,
    consul::{ConsulAgent, Registration},
    routing::{owner, set_routing_key},
    testsuite::{self, ServiceProcess, infra_var, passing_ports},
};
use keel_protos::rpc::{
    CreateAccountReq, DumpReq, GetReq, StoreReq, accounts_client::AccountsClient,
    cache_client::CacheClient,
};
use tokio_stream::StreamExt;
use tonic::{Code, Request};

use crate::support::{Deployment, as_operator, consul_clients, used_cache_keys};

fn keyed<T>(msg: T, key: &str) -> Request<T> {
    let mut r = Request::new(msg);
    set_routing_key(&mut r, key);
    r.set_timeout(Duration::from_secs(5));
    r
}

/// A Store of one byte under `key`, routed to its owner, with `timeout`.
fn one_byte(token: &str, key: &str, timeout: Duration) -> Request<StoreReq> {
    let req = StoreReq {
        key: key.into(),
        val: vec![1],
        account_token: token.into(),
        ttl_ms: 0,
    };
    let mut req = keyed(req, key);
    req.set_timeout(timeout);
    req
}

/// Waits until a Store of `key` goes through: the instance owning it has found accounts through Consul DNS.
async fn warm_up(cache: &CacheClient<keel_common::Channel>, token: &str, key: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let req = StoreReq {
            key: key.into(),
            val: vec![1],
            account_token: token.into(),
            ttl_ms: 0,
        };
        match cache.clone().store(keyed(req, key)).await {
            Ok(_) => return,
            Err(e) => assert!(
                Instant::now() < deadline,
                "the cache never became usable: {e:?}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn dump(port: u16, token: &str) -> BTreeSet<String> {
    let ch = tonic::transport::Channel::from_shared(format!("http://127.0.0.1:{port}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut s = CacheClient::new(ch)
        .dump(DumpReq {
            account_token: token.into(),
        })
        .await
        .unwrap()
        .into_inner();
    let mut keys = BTreeSet::new();
    while let Some(item) = s.next().await {
        keys.insert(item.unwrap().key);
    }
    keys
}

#[tokio::test]
async fn keys_are_sharded_over_instances_and_the_quota_holds_across_them() {
    let d = Deployment::start().await;
    let (accounts_name, cache_name) = (&d.accounts_name, &d.cache_name);
    let mut caches: Vec<ServiceProcess> = (0..3).map(|_| d.cache(&[])).collect();
    let ports = passing_ports(cache_name, 3, Duration::from_secs(60)).await;

    let clients = consul_clients(&[("KEEL_CONSUL__DISCOVERY_INTERVAL", "500ms")]);
    let created = AccountsClient::new(clients.channel(accounts_name).unwrap())
        .create_account(as_operator(CreateAccountReq {
            name: "tenant".into(),
            max_cache_keys: 103,
        }))
        .await
        .unwrap()
        .into_inner();
    let token = created.token;
    let cache = CacheClient::new(clients.keyed_channel(cache_name).unwrap());
    // One warm-up key per instance (each uses one key of the quota: 3 + 100).
    let addrs: Vec<SocketAddr> = ports
        .iter()
        .map(|p| SocketAddr::from(([127, 0, 0, 1], *p)))
        .collect();
    let mut warm = BTreeSet::new();
    for p in &ports {
        let key = (0..)
            .map(|i| format!("warm{i}"))
            .find(|k| owner(k, &addrs).unwrap().port() == *p)
            .unwrap();
        warm_up(&cache, &token, &key).await;
        warm.insert(key);
    }

    // 150 distinct keys, concurrently, spread over the three instances: exactly 100 are stored.
    let results = futures::future::join_all((0..150).map(|i| {
        let mut c = cache.clone();
        let t = token.clone();
        async move {
            let key = format!("key{i:03}");
            let r = c
                .store(keyed(
                    StoreReq {
                        key: key.clone(),
                        val: vec![1; 16],
                        account_token: t,
                        ttl_ms: 0,
                    },
                    &key,
                ))
                .await;
            (key, r)
        }
    }))
    .await;
    for (k, r) in &results {
        if let Err(e) = r {
            assert_eq!(e.code(), Code::FailedPrecondition, "{k}: {e:?}");
        }
    }
    let stored: BTreeSet<String> = results
        .iter()
        .filter(|(_, r)| r.is_ok())
        .map(|(k, _)| k.clone())
        .collect();
    assert_eq!(
        stored.len(),
        100,
        "exactly the quota, across three instances"
    );

    // Each stored key is on exactly one instance: the one rendezvous hashing names.
    let addrs: Vec<SocketAddr> = ports
        .iter()
        .map(|p| SocketAddr::from(([127, 0, 0, 1], *p)))
        .collect();
    let mut on: HashMap<u16, BTreeSet<String>> = HashMap::new();
    for p in &ports {
        on.insert(*p, dump(*p, &token).await);
    }
    let total: usize = on.values().map(BTreeSet::len).sum();
    assert_eq!(total, 103, "no key twice");
    for (p, keys) in &on {
        assert!(!keys.is_empty(), "instance {p} holds a share");
        for k in keys {
            assert!(stored.contains(k) || warm.contains(k), "{k}");
            assert_eq!(owner(k, &addrs).unwrap().port(), *p, "{k} is on its owner");
        }
    }

    // Kill one instance: its keys are gone, every other key is still served.
    let victim_port = ports[0];
    let victim = caches
        .iter()
        .position(|c| c.output().contains(&format!("127.0.0.1:{victim_port}")))
        .expect("the process listening on the victim port");
    caches[victim].kill();
    passing_ports(cache_name, 2, Duration::from_secs(30)).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let mut served = 0;
        for k in &stored {
            let r = cache
                .clone()
                .get(keyed(
                    GetReq {
                        key: k.clone(),
                        account_token: token.clone(),
                    },
                    k,
                ))
                .await;
            if r.is_ok() {
                served += 1;
            }
        }
        let survivors: usize = on
            .iter()
            .filter(|(p, _)| **p != victim_port)
            .map(|(_, keys)| keys.iter().filter(|k| stored.contains(*k)).count())
            .sum();
        if served == survivors {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{served} keys served, {survivors} expected after the kill"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// A 50 ms deadline on Store, while the accounts service is slow (its quota row is locked by another
/// transaction): the client gets DEADLINE_EXCEEDED long before the lock is released, and the accounts service
/// was called with only what was left of the 50 ms.
#[tokio::test]
async fn a_client_deadline_propagates_from_cache_to_accounts() {
    use keel_common::db::sqlx::{self, Connection};
    let d = Deployment::start().await;
    let (accounts_name, cache_name, db, accounts) =
        (&d.accounts_name, &d.cache_name, &d.db, &d.accounts);
    let _cache = d.cache(&[]);
    passing_ports(cache_name, 1, Duration::from_secs(60)).await;
    let clients = consul_clients(&[]);
    let created = AccountsClient::new(clients.channel(accounts_name).unwrap())
        .create_account(as_operator(CreateAccountReq {
            name: "slow".into(),
            max_cache_keys: 10,
        }))
        .await
        .unwrap()
        .into_inner();
    let id = created.account.unwrap().id;
    let mut cache = CacheClient::new(clients.keyed_channel(cache_name).unwrap());
    warm_up(&cache, &created.token, "warm").await;

    let mut lock = sqlx::PgConnection::connect(&db.url).await.unwrap();
    sqlx::query("BEGIN").execute(&mut lock).await.unwrap();
    sqlx::query("SELECT id FROM accounts WHERE id = $1 FOR UPDATE")
        .bind(&id)
        .execute(&mut lock)
        .await
        .unwrap();

    let req = one_byte(&created.token, "slow", Duration::from_millis(50));
    let started = Instant::now();
    let err = cache.store(req).await.unwrap_err();
    let took = started.elapsed();
    sqlx::query("ROLLBACK").execute(&mut lock).await.unwrap();
    assert_eq!(err.code(), Code::DeadlineExceeded, "{err:?}");
    assert!(
        took < Duration::from_secs(2),
        "not held by the 5 s lock wait: {took:?}"
    );

    // The accounts service logged the slow Store's calls (token lookup, then the blocked reservation) with the
    // deadline it was given: the rest of the 50 ms.
    let deadline_seen = {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let found = accounts
                .output()
                .lines()
                .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
                .find_map(|l| {
                    let f = &l["fields"];
                    (l["message"] == "grpc call"
                        && f["method"]
                            .as_str()
                            .is_some_and(|m| m.starts_with("/rpc.Accounts/"))
                        && f["deadline_ms"].as_f64().is_some_and(|d| d < 1000.0))
                    .then(|| f["deadline_ms"].as_f64())
                    .flatten()
                });
            if let Some(ms) = found {
                break ms;
            }
            assert!(
                Instant::now() < deadline,
                "no call of the slow Store in the accounts log:\n{}",
                accounts.output()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    assert!(
        deadline_seen > 0.0 && deadline_seen < 50.0,
        "accounts was given {deadline_seen} ms"
    );
}

/// A bad `[cache]` value is a configuration error like the platform's: reported with them, before the port is
/// bound or anything is registered, with exit status 2 (it used to surface after binding, as exit 1).
#[tokio::test]
async fn bad_cache_settings_are_reported_with_the_platform_ones_before_binding() {
    let name = format!(
        "cache-badcfg-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    );
    let mut p = ServiceProcess::spawn(
        "cache",
        &name,
        &[
            ("KEEL_CACHE__MAX_BYTES", "0".into()),
            ("KEEL_CACHE__ACCOUNTS_SERVICE", " ".into()),
            ("KEEL_GRPC__DRAIN_TIMEOUT", "soon".into()),
        ],
    );
    let status = p
        .wait(Duration::from_secs(30))
        .await
        .expect("exits instead of serving");
    let out = p.output();
    assert_eq!(status.code(), Some(2), "{out}");
    for key in [
        "grpc.drain_timeout",
        "cache.max_bytes",
        "cache.accounts_service",
    ] {
        assert!(out.contains(key), "{key} not reported: {out}");
    }
    assert!(!out.contains("grpc server listening"), "{out}");
}

/// `cache.max_bytes` changes live from Consul KV (the cache declares it in `Service::LIVE`): lowered under
/// what the instance holds, the least recently used keys go at once and their quota is given back, with no
/// restart.
#[tokio::test]
async fn max_bytes_changes_live_from_consul_kv_and_evicted_keys_give_their_quota_back() {
    let d = Deployment::start().await;
    let p = d.cache(&[]);
    passing_ports(&d.cache_name, 1, Duration::from_secs(60)).await;
    let clients = consul_clients(&[("KEEL_CONSUL__DISCOVERY_INTERVAL", "500ms")]);
    let mut accounts = AccountsClient::new(clients.channel(&d.accounts_name).unwrap());
    let token = accounts
        .create_account(as_operator(CreateAccountReq {
            name: "tenant".into(),
            max_cache_keys: 100,
        }))
        .await
        .unwrap()
        .into_inner()
        .token;
    let used = || used_cache_keys(&accounts, &token);
    let cache = CacheClient::new(clients.channel(&d.cache_name).unwrap());
    let keys: Vec<String> = (0..20).map(|i| format!("key{i:02}")).collect();
    for key in &keys {
        keel_common::testsuite::eventually("the cache stores", Duration::from_secs(20), || {
            let mut c = cache.clone();
            let req = StoreReq {
                key: key.clone(),
                val: vec![7; 1000],
                account_token: token.clone(),
                ttl_ms: 0,
            };
            async move { c.store(req).await.ok() }
        })
        .await;
    }
    assert_eq!(used().await, 20);

    let agent = keel_common::consul::ConsulAgent::new(
        &infra_var("CONSUL_HTTP_ADDR"),
        keel_common::config::Secret::default(),
    );
    let kv_key = format!("keel/{}/cache/max_bytes", d.cache_name);
    agent.kv_put(&kv_key, "5000").await.unwrap();
    keel_common::testsuite::eventually(
        "the bound changes live",
        Duration::from_secs(10),
        || async {
            p.lines()
                .iter()
                .any(|l| l["message"] == "memory bound changed; keys evicted")
                .then_some(())
        },
    )
    .await;
    let mut held = 0;
    for key in &keys {
        let got = cache
            .clone()
            .get(GetReq {
                key: key.clone(),
                account_token: token.clone(),
            })
            .await;
        if got.is_ok() {
            held += 1;
        }
    }
    assert!(
        (1..=4).contains(&held),
        "5,000 bytes hold at most four 1 kB values, not {held}"
    );
    assert!(
        cache
            .clone()
            .get(GetReq {
                key: keys[0].clone(),
                account_token: token.clone()
            })
            .await
            .is_err(),
        "the least recently used key went first"
    );
    keel_common::testsuite::eventually("the quota follows", Duration::from_secs(10), || async {
        (used().await == held).then_some(())
    })
    .await;
    assert!(
        p.lines()
            .iter()
            .any(|l| l["message"] == "setting changed" && l["fields"]["key"] == "cache.max_bytes"),
        "a live change, not a restart"
    );
    agent
        .kv_delete(&format!("keel/{}", d.cache_name), true)
        .await
        .unwrap();
}

/// Calls of `method` (`/rpc.Accounts/ReserveKeys`) that `accounts` logged as answered OK.
fn answered(accounts: &ServiceProcess, method: &str) -> usize {
    accounts
        .lines()
        .iter()
        .filter(|l| {
            let f = &l["fields"];
            l["message"] == "grpc call"
                && f["side"] == "server"
                && f["method"] == method
                && f["status"] == "OK"
        })
        .count()
}

/// A reservation applied at accounts whose answer never reached the cache (the link between them loses what
/// accounts sends, as a machine cut off mid-call does) is undone by its idempotency key once the link is back,
/// so the account's count stays the keys the caches hold. Without the undoing it stays one too high for good.
#[tokio::test]
async fn a_reservation_whose_answer_is_lost_is_undone() {
    let d = Deployment::start().await;
    let link = LossyLink::start(d.accounts_port).await;
    // The cache finds accounts through Consul under a name whose only instance is the link.
    let link_name = format!("{}-link", d.accounts_name);
    let agent = ConsulAgent::new(&infra_var("CONSUL_HTTP_ADDR"), Secret::default());
    agent
        .register(&Registration {
            id: link_name.clone(),
            name: link_name.clone(),
            tags: vec![],
            address: "127.0.0.1".into(),
            port: link.port,
            meta: HashMap::new(),
            checks: vec![],
        })
        .await
        .unwrap();
    let _cache = d.cache(&[("KEEL_CACHE__ACCOUNTS_SERVICE", link_name.clone())]);
    passing_ports(&d.cache_name, 1, Duration::from_secs(60)).await;
    let clients = consul_clients(&[]);
    let accounts = AccountsClient::new(clients.channel(&d.accounts_name).unwrap());
    let created = accounts
        .clone()
        .create_account(as_operator(CreateAccountReq {
            name: "lost".into(),
            max_cache_keys: 10,
        }))
        .await
        .unwrap()
        .into_inner();
    let cache = CacheClient::new(clients.keyed_channel(&d.cache_name).unwrap());
    warm_up(&cache, &created.token, "held").await;
    let reserved = answered(&d.accounts, "/rpc.Accounts/ReserveKeys");

    // The token is in the cache's token cache: the Store's one accounts call is its reservation.
    link.cut();
    let req = one_byte(&created.token, "lost", Duration::from_secs(1));
    let err = cache.clone().store(req).await.unwrap_err();
    assert_eq!(err.code(), Code::DeadlineExceeded, "{err:?}");
    let used = || used_cache_keys(&accounts, &created.token);
    testsuite::eventually(
        "accounts applied the reservation and answered into the cut",
        Duration::from_secs(10),
        || async { (answered(&d.accounts, "/rpc.Accounts/ReserveKeys") > reserved).then_some(()) },
    )
    .await;
    // (The undoing may already have reached accounts too: requests cross the cut, answers do not.)

    link.heal();
    testsuite::eventually(
        "the lost reservation undone",
        Duration::from_secs(30),
        || async { (used().await == 1).then_some(()) },
    )
    .await;
    let port = passing_ports(&d.cache_name, 1, Duration::from_secs(30)).await[0];
    assert_eq!(
        dump(port, &created.token).await,
        BTreeSet::from(["held".to_owned()]),
        "the one key counted is the one held"
    );
    agent.deregister(&link_name).await.unwrap();
}

/// A TCP relay to 127.0.0.1:`target` that can lose what the server sends: while cut, requests still arrive but
/// no answer gets back; healing closes every connection made so far (they died with the link) and lets new
/// ones through. A stand-in for the network, not for any server.
struct LossyLink {
    port: u16,
    cut: Arc<AtomicBool>,
    generation: tokio::sync::watch::Sender<u64>,
}

impl LossyLink {
    async fn start(target: u16) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let cut = Arc::new(AtomicBool::new(false));
        let (generation, _) = tokio::sync::watch::channel(0u64);
        let (lossy, gen_tx) = (cut.clone(), generation.clone());
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = tokio::net::TcpStream::connect(("127.0.0.1", target)).await else {
                    continue;
                };
                let (mut closed, lossy) = (gen_tx.subscribe(), lossy.clone());
                tokio::spawn(async move {
                    let (mut client_rx, mut client_tx) = client.into_split();
                    let (mut server_rx, mut server_tx) = server.into_split();
                    let requests = tokio::io::copy(&mut client_rx, &mut server_tx);
                    let answers = async {
                        let mut buf = vec![0u8; 16 << 10];
                        loop {
                            let n = server_rx.read(&mut buf).await?;
                            if n == 0 {
                                return Ok::<_, std::io::Error>(());
                            }
                            if !lossy.load(Ordering::SeqCst) {
                                client_tx.write_all(&buf[..n]).await?;
                            }
                        }
                    };
                    tokio::select! {
                        _ = requests => {}
                        _ = answers => {}
                        _ = closed.changed() => {}
                    }
                });
            }
        });
        Self {
            port,
            cut,
            generation,
        }
    }

    fn cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
    }

    fn heal(&self) {
        self.generation.send_modify(|g| *g += 1);
        self.cut.store(false, Ordering::SeqCst);
    }
}
