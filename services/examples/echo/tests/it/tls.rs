//! TLS between services (rustls): a server configured with `tls.*` speaks only TLS; with
//! `tls.require_client_cert` it accepts only clients presenting a certificate of the configured CA (mutual TLS);
//! the platform's client channels dial with TLS when `tls.ca_file` is set. Consul checks an mTLS instance by
//! the TTL heartbeats the instance sends itself.

use std::{path::Path, time::Duration};

use crate::support::*;
use keel_common::{
    ClientFactory, Idempotent, Metrics,
    config::{Env, Settings},
};
use keel_protos::keel::example::v1::{EchoRequest, echo_client::EchoClient};
use rcgen::{BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, KeyPair};
use tonic::Code;

struct Pki {
    dir: std::path::PathBuf,
}

impl Pki {
    /// A CA, a server certificate for `localhost` and a client certificate signed by it, and a client
    /// certificate signed by another CA; PEM files in a fresh directory.
    fn new() -> Self {
        let dir = std::env::temp_dir().join(format!("keel-tls-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).unwrap();
        let write = |name: &str, pem: String| std::fs::write(dir.join(name), pem).unwrap();
        let ca = |name: &str| {
            let key = KeyPair::generate().unwrap();
            let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
            p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            p.distinguished_name.push(rcgen::DnType::CommonName, name);
            (p.self_signed(&key).unwrap(), key)
        };
        let leaf =
            |san: &str, usage: ExtendedKeyUsagePurpose, issuer: &(rcgen::Certificate, KeyPair)| {
                let key = KeyPair::generate().unwrap();
                let mut p = CertificateParams::new(vec![san.to_owned()]).unwrap();
                p.extended_key_usages = vec![usage];
                (p.signed_by(&key, &issuer.0, &issuer.1).unwrap(), key)
            };
        let trusted = ca("keel test CA");
        let other = ca("someone else's CA");
        write("ca.pem", trusted.0.pem());
        let (server, server_key) = leaf("localhost", ExtendedKeyUsagePurpose::ServerAuth, &trusted);
        write("server.pem", server.pem());
        write("server.key", server_key.serialize_pem());
        let (client, client_key) = leaf("client", ExtendedKeyUsagePurpose::ClientAuth, &trusted);
        write("client.pem", client.pem());
        write("client.key", client_key.serialize_pem());
        let (rogue, rogue_key) = leaf("rogue", ExtendedKeyUsagePurpose::ClientAuth, &other);
        write("rogue.pem", rogue.pem());
        write("rogue.key", rogue_key.serialize_pem());
        Self { dir }
    }

    fn path(&self, name: &str) -> String {
        self.dir.join(name).display().to_string()
    }
}

/// One Echo call through a platform channel configured by `env` (static endpoint `addr`).
async fn call(addr: std::net::SocketAddr, env: Env) -> Result<String, tonic::Status> {
    let env = env.with("KEEL_CLIENT__STATIC_ENDPOINTS", format!("echo={addr}"));
    let clients = ClientFactory::new(
        &Settings::from_env("tls-client", &env).unwrap(),
        Metrics::disabled(),
    );
    let mut c = EchoClient::new(clients.channel("echo").unwrap());
    let mut req = tonic::Request::new(EchoRequest {
        message: "secret".into(),
        ..Default::default()
    });
    req.set_timeout(std::time::Duration::from_secs(3));
    c.echo(req).await.map(|r| r.into_inner().message)
}

#[tokio::test]
async fn mutual_tls_admits_only_clients_with_a_certificate_of_the_ca() {
    let pki = Pki::new();
    assert!(Path::new(&pki.path("ca.pem")).exists());
    let p = echo_process(&[
        ("KEEL_TLS__CERT_FILE", pki.path("server.pem")),
        ("KEEL_TLS__KEY_FILE", pki.path("server.key")),
        ("KEEL_TLS__CA_FILE", pki.path("ca.pem")),
        ("KEEL_TLS__REQUIRE_CLIENT_CERT", "true".into()),
    ]);
    let addr = p.addr().await;
    let with = |cert: &str, key: &str| {
        Env::default()
            .with("KEEL_TLS__CA_FILE", pki.path("ca.pem"))
            .with("KEEL_TLS__CERT_FILE", pki.path(cert))
            .with("KEEL_TLS__KEY_FILE", pki.path(key))
    };

    assert_eq!(
        call(addr, with("client.pem", "client.key")).await.unwrap(),
        "secret",
        "mutual TLS"
    );
    let no_cert = call(
        addr,
        Env::default().with("KEEL_TLS__CA_FILE", pki.path("ca.pem")),
    )
    .await
    .unwrap_err();
    assert_eq!(
        no_cert.code(),
        Code::Unavailable,
        "no client certificate: {no_cert:?}"
    );
    let rogue = call(addr, with("rogue.pem", "rogue.key"))
        .await
        .unwrap_err();
    assert_eq!(
        rogue.code(),
        Code::Unavailable,
        "a certificate of another CA: {rogue:?}"
    );
    let plaintext = call(addr, Env::default()).await.unwrap_err();
    assert_eq!(
        plaintext.code(),
        Code::Unavailable,
        "plaintext: {plaintext:?}"
    );
}

#[tokio::test]
async fn server_tls_without_client_certificates() {
    let pki = Pki::new();
    let p = echo_process(&[
        ("KEEL_TLS__CERT_FILE", pki.path("server.pem")),
        ("KEEL_TLS__KEY_FILE", pki.path("server.key")),
    ]);
    let addr = p.addr().await;
    let ok = call(
        addr,
        Env::default().with("KEEL_TLS__CA_FILE", pki.path("ca.pem")),
    )
    .await;
    assert_eq!(ok.unwrap(), "secret");
    // A client that trusts another CA refuses the server.
    let wrong_ca = call(
        addr,
        Env::default().with("KEEL_TLS__CA_FILE", pki.path("rogue.pem")),
    )
    .await
    .unwrap_err();
    assert_eq!(wrong_ca.code(), Code::Unavailable, "{wrong_ca:?}");
}

/// Mutual TLS in Consul: the agent cannot present a client certificate, so a `GRPC` check could only fail.
/// Instead each instance registers a `TTL` check and reports its own health: both instances pass and a client
/// with a certificate finds them through Consul DNS; a SIGKILLed instance turns critical once its TTL runs
/// out (and drops out of `?passing`), while a SIGTERMed one deregisters.
#[tokio::test]
async fn mutual_tls_instances_report_their_own_health_to_consul() {
    let infra = Infra::get();
    let pki = Pki::new();
    let name = unique("echo-mtls");
    let mut env = consul_env(&infra, &name);
    env.extend([
        ("KEEL_TLS__CERT_FILE", pki.path("server.pem")),
        ("KEEL_TLS__KEY_FILE", pki.path("server.key")),
        ("KEEL_TLS__CA_FILE", pki.path("ca.pem")),
        ("KEEL_TLS__REQUIRE_CLIENT_CERT", "true".into()),
    ]);
    let mut a = echo_process(&env);
    let mut b = echo_process(&env);
    passing_ports(&name, 2, CONSUL_WAIT).await;
    let agent = infra.agent();
    for e in agent.health_service(&name, true).await.unwrap() {
        let ttl = format!("{}:ttl", e.service.id);
        assert!(
            e.checks
                .iter()
                .any(|c| c.check_id == ttl && c.status == "passing"),
            "{ttl} passing: {:?}",
            e.checks
        );
    }

    let client_env = Env::default()
        .with("CONSUL_HTTP_ADDR", &infra.consul_http)
        .with("KEEL_CONSUL__DNS_ADDR", &infra.consul_dns)
        .with("KEEL_TLS__CA_FILE", pki.path("ca.pem"))
        .with("KEEL_TLS__CERT_FILE", pki.path("client.pem"))
        .with("KEEL_TLS__KEY_FILE", pki.path("client.key"));
    let clients = ClientFactory::new(
        &Settings::from_env("tls-client", &client_env).unwrap(),
        Metrics::disabled(),
    );
    let c = EchoClient::new(clients.channel(&name).unwrap());
    let reply = eventually(
        "an mTLS call to an instance found through Consul DNS",
        Duration::from_secs(20),
        || {
            let mut c = c.clone();
            async move {
                let mut req = tonic::Request::new(EchoRequest {
                    message: "found".into(),
                    ..Default::default()
                });
                req.set_timeout(Duration::from_secs(3));
                c.echo(req).await.ok().map(|r| r.into_inner().message)
            }
        },
    )
    .await;
    assert_eq!(reply, "found");

    a.signal("KILL");
    a.wait_exit(Duration::from_secs(5)).await;
    // Check interval 1 s: TTL 3 s.
    passing_ports(&name, 1, CONSUL_WAIT).await;
    let all = agent.health_service(&name, false).await.unwrap();
    assert_eq!(
        all.len(),
        2,
        "the killed instance stays registered, critical"
    );
    assert!(
        all.iter()
            .flat_map(|e| &e.checks)
            .any(|c| c.check_id.ends_with(":ttl") && c.status == "critical"),
        "{:?}",
        all.iter().map(|e| &e.checks).collect::<Vec<_>>()
    );
    // Until the client re-resolves, a call may pick the dead address: the platform's retry of an idempotent
    // call on UNAVAILABLE covers that window.
    let reply = clients
        .retry_policy()
        .call(Idempotent::Yes, || {
            let mut c = c.clone();
            async move {
                let mut req = tonic::Request::new(EchoRequest {
                    message: "still".into(),
                    ..Default::default()
                });
                req.set_timeout(Duration::from_secs(3));
                c.echo(req).await
            }
        })
        .await
        .unwrap();
    assert_eq!(
        reply.into_inner().message,
        "still",
        "the surviving instance serves"
    );

    b.signal("TERM");
    assert!(b.wait_exit(Duration::from_secs(20)).await.success());
    assert_eq!(
        agent.health_service(&name, false).await.unwrap().len(),
        1,
        "the stopped instance deregistered; only the killed one is left until deregister_critical_after"
    );
    for e in agent.health_service(&name, false).await.unwrap() {
        agent.deregister(&e.service.id).await.unwrap();
    }
}
