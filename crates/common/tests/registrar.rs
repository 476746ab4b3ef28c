//! The registrar against the real Consul agent of `scripts/infra.sh` (`CONSUL_HTTP_ADDR`), reached through a
//! relay the test can take away and bring back as an agent restart would: an instance whose agent was
//! unreachable at a resync, and lost its registration meanwhile, is registered again within the registrar's
//! backoff (250 ms doubling) of the agent's return, not a whole resync period later.

use std::{net::SocketAddr, time::Duration};

use keel_common::{
    Settings,
    config::{Env, Secret},
    consul::{ConsulAgent, Instance, Registrar},
    testsuite,
};
use tokio::{net::TcpListener, task::JoinHandle, time::Instant};
use tokio_util::sync::CancellationToken;

/// A TCP relay from a loopback port of its own to `target`: down, its port refuses connections and the
/// connections it relayed are closed (an agent that stopped); up again, on the same port. A stand-in for the
/// agent's process going away, not for the agent.
struct Relay {
    port: u16,
    target: SocketAddr,
    task: Option<JoinHandle<()>>,
}

impl Relay {
    async fn start(target: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let mut relay = Self {
            port,
            target,
            task: None,
        };
        relay.serve(listener);
        relay
    }

    fn serve(&mut self, listener: TcpListener) {
        let target = self.target;
        self.task = Some(tokio::spawn(async move {
            // Owned by this task: aborting it closes every relayed connection too.
            let mut conns = tokio::task::JoinSet::new();
            while let Ok((mut client, _)) = listener.accept().await {
                conns.spawn(async move {
                    if let Ok(mut agent) = tokio::net::TcpStream::connect(target).await {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut agent).await;
                    }
                });
            }
        }));
    }

    async fn down(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
            let _ = task.await;
        }
    }

    async fn up(&mut self) {
        let listener = TcpListener::bind(("127.0.0.1", self.port)).await.unwrap();
        self.serve(listener);
    }
}

/// Polls the agent until it knows `id`; panics after `within`. Returns when it saw it.
async fn until_registered(agent: &ConsulAgent, id: &str, within: Duration) -> Instant {
    testsuite::eventually(&format!("{id} registered"), within, || async {
        agent.is_registered(id).await.unwrap().then(Instant::now)
    })
    .await
}

#[tokio::test]
async fn an_instance_is_registered_again_within_its_backoff_once_an_unreachable_agent_returns() {
    let addr = std::env::var("CONSUL_HTTP_ADDR")
        .expect("CONSUL_HTTP_ADDR: run with `eval \"$(scripts/infra.sh env)\"` (make test does)");
    let consul: SocketAddr = tokio::net::lookup_host(addr.trim_start_matches("http://"))
        .await
        .unwrap()
        .next()
        .unwrap();
    let direct = ConsulAgent::new(&addr, Secret::default());
    let mut relay = Relay::start(consul).await;
    let relayed = format!("127.0.0.1:{}", relay.port);
    let settings = Settings::from_env(
        "registrar-test",
        &Env::default().with("CONSUL_HTTP_ADDR", relayed.as_str()),
    )
    .unwrap();
    let id = format!("registrar-test-{}", std::process::id());
    let instance = Instance {
        name: "registrar-test".into(),
        id: id.clone(),
        address: "127.0.0.1".into(),
        // Nothing serves it: the check is critical, the registration is what counts here.
        port: 9,
        version: "0".into(),
        tags: vec![],
        tls: false,
    };
    let registrar = Registrar::new(
        &settings.consul,
        ConsulAgent::new(&relayed, Secret::default()),
        &instance,
    );
    // Resyncs 10 s apart: the next one after a failed one would come 10 s later without the backoff.
    const RESYNC: Duration = Duration::from_secs(10);
    let stop = CancellationToken::new();
    tokio::spawn(registrar.run(RESYNC, stop.clone()));
    let registered = until_registered(&direct, &id, Duration::from_secs(10)).await;

    // The agent goes away before the first resync, which finds it unreachable; meanwhile it loses the
    // registration (an agent restarted without its services), and comes back 1.5 s after that resync.
    relay.down().await;
    tokio::time::sleep_until(registered + RESYNC + Duration::from_millis(1500)).await;
    direct.deregister(&id).await.unwrap();
    relay.up().await;
    let back = Instant::now();
    let again = until_registered(&direct, &id, Duration::from_secs(20)).await;
    stop.cancel();
    direct.deregister(&id).await.unwrap();
    // The registrar's attempts after the failed resync: 250 ms, 500 ms, 1 s, 2 s apart; the agent is back
    // 1.5 s after the failure, so the one at 1.75 s or at 3.75 s at the latest finds it (and the registration
    // gone): ~2.25 s. A whole resync after the failure would be 8.5 s.
    let took = again - back;
    assert!(
        took <= Duration::from_secs(5),
        "registered again {took:?} after the agent returned (a resync period is {RESYNC:?})"
    );
}
