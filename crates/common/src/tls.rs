//! TLS (rustls, through tonic) from [`TlsSettings`]: the server's identity and optional client-certificate
//! requirement (mutual TLS between services), and the client side's trusted CA and own certificate.
//!
//! Instances are dialled by IP address (from Consul DNS), so certificates are checked against one shared name,
//! `tls.server_name` (default `localhost`). Consul's GRPC health check dials with TLS (`GRPCUseTLS`) and
//! `TLSSkipVerify`, since the agent does not hold the services' CA; with `tls.require_client_cert` the agent's
//! check would also need a client certificate, which this platform does not configure (the check then fails).

use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};

use crate::config::Reader;

/// TLS (rustls) for the server and for outgoing calls; PEM files, read at start.
#[derive(Clone, Debug, Default)]
pub struct TlsSettings {
    /// This process's certificate chain (`tls.cert_file`). With `tls.key_file`, the server speaks TLS only, and
    /// outgoing calls present it as a client certificate (mutual TLS).
    pub cert_file: Option<String>,
    /// Its private key (`tls.key_file`).
    pub key_file: Option<String>,
    /// CA certificates (`tls.ca_file`): set, outgoing calls use TLS and verify servers against them, and the
    /// server can require client certificates signed by them.
    pub ca_file: Option<String>,
    /// The server refuses clients without a certificate signed by `tls.ca_file` (`tls.require_client_cert`).
    pub require_client_cert: bool,
    /// Name expected in servers' certificates (`tls.server_name`), default `localhost`: instances are dialled by
    /// IP address, so every instance's certificate carries one shared service name.
    pub server_name: String,
}

impl TlsSettings {
    /// Whether the server speaks TLS.
    pub fn server_enabled(&self) -> bool {
        self.cert_file.is_some() && self.key_file.is_some()
    }

    /// Whether outgoing calls use TLS.
    pub fn client_enabled(&self) -> bool {
        self.ca_file.is_some()
    }
}

impl TlsSettings {
    /// Reads the `tls` section; the files must exist, and go together as documented on each field.
    pub fn read(r: &mut Reader) -> Self {
        let tls = Self {
            cert_file: r.opt_string("tls.cert_file"),
            key_file: r.opt_string("tls.key_file"),
            ca_file: r.opt_string("tls.ca_file"),
            require_client_cert: r.bool("tls.require_client_cert", false),
            server_name: r.string("tls.server_name", "localhost"),
        };
        if tls.cert_file.is_some() != tls.key_file.is_some() {
            r.fail("tls.key_file", "tls.cert_file and tls.key_file go together");
        }
        if tls.require_client_cert && (tls.ca_file.is_none() || !tls.server_enabled()) {
            r.fail(
                "tls.require_client_cert",
                "needs tls.cert_file, tls.key_file and tls.ca_file (the CA client certificates are checked against)",
            );
        }
        for (key, file) in [
            ("tls.cert_file", &tls.cert_file),
            ("tls.key_file", &tls.key_file),
            ("tls.ca_file", &tls.ca_file),
        ] {
            if let Some(f) = file
                && !std::path::Path::new(f).is_file()
            {
                r.fail(key, format!("{f:?} is not a readable file"));
            }
        }
        tls
    }
}

fn read(path: &str) -> anyhow::Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| anyhow::anyhow!("cannot read {path}: {e}"))
}

fn identity(s: &TlsSettings) -> anyhow::Result<Option<Identity>> {
    match (&s.cert_file, &s.key_file) {
        (Some(cert), Some(key)) => Ok(Some(Identity::from_pem(read(cert)?, read(key)?))),
        _ => Ok(None),
    }
}

/// The server's TLS configuration; `None` when the server speaks plaintext.
///
/// # Errors
/// A PEM file cannot be read.
pub fn server_config(s: &TlsSettings) -> anyhow::Result<Option<ServerTlsConfig>> {
    let Some(id) = identity(s)? else {
        return Ok(None);
    };
    let mut cfg = ServerTlsConfig::new().identity(id);
    if let Some(ca) = &s.ca_file {
        cfg = cfg
            .client_ca_root(Certificate::from_pem(read(ca)?))
            .client_auth_optional(!s.require_client_cert);
    }
    Ok(Some(cfg))
}

/// The client side's TLS configuration; `None` when outgoing calls are plaintext.
///
/// # Errors
/// A PEM file cannot be read.
pub fn client_config(s: &TlsSettings) -> anyhow::Result<Option<ClientTlsConfig>> {
    let Some(ca) = &s.ca_file else {
        return Ok(None);
    };
    let mut cfg = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(read(ca)?))
        .domain_name(s.server_name.clone());
    if let Some(id) = identity(s)? {
        cfg = cfg.identity(id);
    }
    Ok(Some(cfg))
}

#[cfg(test)]
mod tests {
    use crate::config::{Env, Settings};

    #[test]
    fn tls_settings_are_checked_together() {
        let err = Settings::from_env(
            "x",
            &Env::default()
                .with("KEEL_TLS__CERT_FILE", "/nonexistent.pem")
                .with("KEEL_TLS__REQUIRE_CLIENT_CERT", "true"),
        )
        .unwrap_err();
        let keys: Vec<&str> = err.0.iter().map(|e| e.key.as_str()).collect();
        assert!(
            keys.contains(&"tls.key_file") && keys.contains(&"tls.cert_file"),
            "{keys:?}"
        );
        assert!(keys.contains(&"tls.require_client_cert"), "{keys:?}");
        let s = Settings::from_env("x", &Env::default()).unwrap();
        assert!(!s.tls.server_enabled() && !s.tls.client_enabled());
    }
}
