//! TLS for the stages: servers present a PEM certificate chain and key (`--tls-cert`, `--tls-key`);
//! clients of other stages trust `--tls-ca`, or the public web roots without it. Plain `http://`
//! links stay plain. With `--tls-client-ca` a server also asks its callers for a client certificate
//! (optional on the connection: only `EventLog` calls require one, see `auth`), and a stage presents
//! its own certificate on its `https://` links.

use std::{path::Path, sync::Arc, time::Duration};

use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity, ServerTlsConfig};

/// PEM certificate chain and key of a server, read once at start, and the CA of its callers'
/// client certificates, if it asks for them.
#[derive(Clone)]
pub struct ServerIdentity {
    cert: Vec<u8>,
    key: Vec<u8>,
    client_ca: Option<Vec<u8>>,
}

impl std::fmt::Debug for ServerIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ServerIdentity(..)")
    }
}

impl ServerIdentity {
    /// Reads `--tls-cert`, `--tls-key` and `--tls-client-ca`; `None` when no certificate is set.
    pub fn load(
        cert: Option<&Path>,
        key: Option<&Path>,
        client_ca: Option<&Path>,
    ) -> Result<Option<Self>, String> {
        let (cert, key) =
            match (cert, key) {
                (None, None) => return Ok(None),
                (Some(cert), Some(key)) => (cert, key),
                _ => return Err(
                    "--tls-cert and --tls-key (ORDERFLOW_TLS_CERT, ORDERFLOW_TLS_KEY) go together"
                        .into(),
                ),
            };
        let read = |path: &Path, what: &str| {
            std::fs::read(path).map_err(|e| format!("cannot read {what} {}: {e}", path.display()))
        };
        let identity = ServerIdentity {
            cert: read(cert, "--tls-cert / ORDERFLOW_TLS_CERT")?,
            key: read(key, "--tls-key / ORDERFLOW_TLS_KEY")?,
            client_ca: client_ca
                .map(|ca| read(ca, "--tls-client-ca / ORDERFLOW_TLS_CLIENT_CA"))
                .transpose()?,
        };
        if let Some(ca) = &identity.client_ca {
            let roots = rustls_pemfile::certs(&mut ca.as_slice())
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| format!("--tls-client-ca is not a PEM certificate: {e}"))?;
            if roots.is_empty() {
                return Err("--tls-client-ca holds no certificate".into());
            }
        }
        // Fail at start, not on the first handshake.
        identity.rustls_config()?;
        Ok(Some(identity))
    }

    /// For the gRPC server.
    pub fn grpc(&self) -> ServerTlsConfig {
        let config = ServerTlsConfig::new().identity(Identity::from_pem(&self.cert, &self.key));
        match &self.client_ca {
            Some(ca) => config
                .client_ca_root(Certificate::from_pem(ca))
                .client_auth_optional(true),
            None => config,
        }
    }

    /// For HTTP servers (the receiver's HTTP door), offering HTTP/1.1 and HTTP/2.
    pub fn rustls_config(&self) -> Result<Arc<rustls::ServerConfig>, String> {
        let certs = rustls_pemfile::certs(&mut self.cert.as_slice())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("--tls-cert is not a PEM certificate chain: {e}"))?;
        if certs.is_empty() {
            return Err("--tls-cert holds no certificate".into());
        }
        let key = rustls_pemfile::private_key(&mut self.key.as_slice())
            .map_err(|e| format!("--tls-key is not a PEM private key: {e}"))?
            .ok_or("--tls-key holds no private key")?;
        let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| format!("--tls-cert and --tls-key do not make a usable identity: {e}"))?;
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(Arc::new(config))
    }
}

/// A client certificate and key to present, and the flags that name them (for errors).
#[derive(Debug, Clone, Copy)]
pub struct ClientIdentity<'a> {
    pub cert: &'a Path,
    pub key: &'a Path,
    /// E.g. `--tls-cert / ORDERFLOW_TLS_CERT`.
    pub cert_flag: &'static str,
    pub key_flag: &'static str,
}

/// Client TLS settings: trust the CA in `ca` (`--tls-ca`) only, or the public web roots; present
/// `identity` to servers that ask for a client certificate.
pub fn client_config(
    ca: Option<&Path>,
    identity: Option<ClientIdentity<'_>>,
) -> Result<ClientTlsConfig, String> {
    let config = match ca {
        Some(path) => {
            let pem = std::fs::read(path).map_err(|e| {
                format!(
                    "cannot read --tls-ca / ORDERFLOW_TLS_CA {}: {e}",
                    path.display()
                )
            })?;
            ClientTlsConfig::new().ca_certificate(Certificate::from_pem(pem))
        }
        None => ClientTlsConfig::new().with_webpki_roots(),
    };
    match identity {
        Some(identity) => {
            let read = |path: &Path, flag: &str| {
                std::fs::read(path)
                    .map_err(|e| format!("cannot read {flag} {}: {e}", path.display()))
            };
            let cert = read(identity.cert, identity.cert_flag)?;
            let key = read(identity.key, identity.key_flag)?;
            Ok(config.identity(Identity::from_pem(cert, key)))
        }
        None => Ok(config),
    }
}

/// A tonic endpoint for `url` with connect timeout and keep-alives, and `tls` when it is `https://`.
pub fn endpoint(url: &str, tls: &ClientTlsConfig) -> Result<Endpoint, String> {
    let endpoint = Endpoint::from_shared(url.to_owned())
        .map_err(|e| format!("{url} is not a valid URL: {e}"))?
        .connect_timeout(Duration::from_secs(5))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(20))
        .keep_alive_timeout(Duration::from_secs(10))
        .keep_alive_while_idle(true);
    if url.starts_with("https://") {
        endpoint
            .tls_config(tls.clone())
            .map_err(|e| format!("TLS set-up for {url} failed: {e}"))
    } else {
        Ok(endpoint)
    }
}
