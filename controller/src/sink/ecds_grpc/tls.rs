//! The ecdsGrpc server's optional TLS: every response carries the filter configuration with
//! its `secret`, so a server reachable beyond the host should present a certificate and, with
//! `clientCaFile`, admit only proxies holding a certificate from that CA (mutual TLS).

use std::fmt;
use std::net::SocketAddr;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use serde::{Deserialize, Serialize};
use tonic::transport::{Certificate, Identity, ServerTlsConfig};

/// The `tls` block of an ecdsGrpc sink: PEM files, read when the server starts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct TlsSpec {
    /// The server's certificate chain (leaf first).
    pub cert_file: String,
    /// The private key of the leaf certificate.
    pub key_file: String,
    /// CA certificates; when given, every client must present a certificate they signed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_ca_file: Option<String>,
}

impl fmt::Display for TlsSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{{certFile: {}, keyFile: {}",
            self.cert_file, self.key_file
        )?;
        match &self.client_ca_file {
            Some(ca) => write!(f, ", clientCaFile: {ca}}}"),
            None => write!(f, "}}"),
        }
    }
}

/// What is wrong with a `tls` block: the field (`certFile`, `keyFile`, `clientCaFile`, or
/// empty for the block as a whole) and why, naming the file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("tls{}: {why}", if .field.is_empty() { String::new() } else { format!(".{}", .field) })]
pub struct TlsProblem {
    pub field: &'static str,
    pub why: String,
}

fn problem(field: &'static str, why: String) -> TlsProblem {
    TlsProblem { field, why }
}

fn read(field: &'static str, path: &str) -> Result<Vec<u8>, TlsProblem> {
    std::fs::read(path).map_err(|e| problem(field, format!("cannot read {path}: {e}")))
}

fn certificates(field: &'static str, path: &str) -> Result<Vec<u8>, TlsProblem> {
    let pem = read(field, path)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| problem(field, format!("{path}: not PEM certificates: {e}")))?;
    if certs.is_empty() {
        return Err(problem(
            field,
            format!("{path}: no PEM certificate (-----BEGIN CERTIFICATE-----) in it"),
        ));
    }
    Ok(pem)
}

impl TlsSpec {
    /// Reads and checks the files; the server configuration they make.
    pub fn load(&self) -> Result<ServerTlsConfig, TlsProblem> {
        let cert = certificates("certFile", &self.cert_file)?;
        let key = read("keyFile", &self.key_file)?;
        PrivateKeyDer::from_pem_slice(&key).map_err(|e| {
            problem(
                "keyFile",
                format!(
                    "{}: no PEM private key (PKCS#8, PKCS#1 or SEC1): {e}",
                    self.key_file
                ),
            )
        })?;
        let mut config = ServerTlsConfig::new()
            .identity(Identity::from_pem(cert, key))
            // A peer that opens a connection and never finishes the handshake is dropped.
            .timeout(std::time::Duration::from_secs(10));
        if let Some(ca) = &self.client_ca_file {
            config =
                config.client_ca_root(Certificate::from_pem(certificates("clientCaFile", ca)?));
        }
        // Builds rustls' configuration now, so a key that does not belong to the certificate,
        // or a CA file with no usable certificate, is reported here and not when serving.
        tonic::transport::Server::builder()
            .tls_config(config.clone())
            .map_err(|e| {
                problem(
                    "",
                    format!(
                        "{} and {} do not make a TLS server configuration: {}",
                        self.cert_file,
                        self.key_file,
                        source_chain(&e)
                    ),
                )
            })?;
        Ok(config)
    }
}

fn source_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut next = e.source();
    while let Some(inner) = next {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        next = inner.source();
    }
    s
}

/// The warning due when a server without TLS listens beyond the host.
pub fn in_clear(listen: SocketAddr, tls: Option<&TlsSpec>) -> Option<String> {
    if tls.is_some() || listen.ip().is_loopback() {
        return None;
    }
    Some(format!(
        "the ecdsGrpc server on {listen} has no tls block: anyone who can reach it reads the filter configuration, its secret included, in clear; give tls (with clientCaFile for mutual TLS) or restrict who can connect"
    ))
}

#[cfg(test)]
mod tests;
