//! TLS (rustls, through tonic) from [`TlsSettings`]: the server's identity and optional client-certificate
//! requirement (mutual TLS between services), and the client side's trusted CA and own certificate.
//!
//! Instances are dialled by IP address (from Consul DNS), so certificates are checked against one shared name,
//! `tls.server_name` (default `localhost`). Consul's GRPC health check dials with TLS (`GRPCUseTLS`) and
//! `TLSSkipVerify`, since the agent does not hold the services' CA; with `tls.require_client_cert` the agent's
//! check would also need a client certificate, which this platform does not configure (the check then fails).

use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};

use crate::config::TlsSettings;

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
