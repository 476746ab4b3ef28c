//! TLS between services (rustls): a server configured with `tls.*` speaks only TLS; with
//! `tls.require_client_cert` it accepts only clients presenting a certificate of the configured CA (mutual TLS);
//! the platform's client channels dial with TLS when `tls.ca_file` is set.

mod support;

use std::path::Path;

use keel_common::{
    ClientFactory, Metrics,
    config::{Env, Settings},
};
use keel_protos::keel::example::v1::{EchoRequest, echo_client::EchoClient};
use rcgen::{BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, KeyPair};
use support::*;
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
    let p = EchoProcess::spawn(&[
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
    let p = EchoProcess::spawn(&[
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
