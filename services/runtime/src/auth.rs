//! Who may do what:
//! - **Admin RPCs.** With `--admin-token` set, `SetStock`, `SetFaults` and `ReplayDeadLetters` need
//!   `authorization: Bearer <token>`, else `UNAUTHENTICATED`. Order and query RPCs stay open.
//! - **Stage links.** `orderflow.v1.EventLog` is the pipeline's own plumbing: whoever can `Ack` can
//!   let retention delete entries. With `--link-token` set, every `EventLog` call needs
//!   `authorization: Bearer <link token>`; with `--tls-client-ca` set, it needs a client
//!   certificate that CA signed (mutual TLS). Either or both; the stages send what they are
//!   configured with on their own links ([`LinkAuth`]). The admin token and the link token are
//!   separate: neither opens the other's door.

use std::{str::FromStr, sync::Arc};

use tonic::{Request, Status, metadata::MetadataMap, service::Interceptor};

/// A shared secret: the admin token or the link token. Its `Debug` never shows it.
#[derive(Clone, PartialEq, Eq)]
pub struct Token(Arc<str>);

/// The admin RPCs' token (`--admin-token`).
pub type AdminToken = Token;
/// The stage links' token (`--link-token`).
pub type LinkToken = Token;

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token(<redacted>)")
    }
}

impl FromStr for Token {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.len() < 8 {
            return Err("a token needs at least 8 characters".into());
        }
        if !s.bytes().all(|b| b.is_ascii_graphic()) {
            return Err("a token may only contain visible ASCII characters".into());
        }
        Ok(Token(s.into()))
    }
}

impl Token {
    /// The `authorization` header value that carries it.
    pub fn bearer(&self) -> String {
        format!("Bearer {}", self.0)
    }

    /// Whether `metadata` carries this token as `authorization: Bearer <token>`, compared in
    /// constant time.
    fn presented_in(&self, metadata: &MetadataMap) -> bool {
        let presented = metadata
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or_default();
        constant_time_eq(presented.as_bytes(), self.0.as_bytes())
    }
}

/// Checks admin calls against the stage's token (or lets everything through without one).
#[derive(Clone, Debug, Default)]
pub struct AdminGuard {
    token: Option<AdminToken>,
}

impl AdminGuard {
    pub fn new(token: Option<AdminToken>) -> Self {
        AdminGuard { token }
    }

    /// `Ok` when no token is configured or the request carries it; `UNAUTHENTICATED` otherwise.
    pub fn check(&self, metadata: &MetadataMap, rpc: &str) -> Result<(), Status> {
        let Some(token) = &self.token else {
            return Ok(());
        };
        if metadata.get("authorization").is_none() {
            return Err(Status::unauthenticated(format!(
                "{rpc} is an admin RPC: send `authorization: Bearer <token>` with the stage's admin token"
            )));
        }
        if token.presented_in(metadata) {
            Ok(())
        } else {
            tracing::warn!(rpc, "admin RPC refused: wrong token");
            Err(Status::unauthenticated(format!(
                "{rpc}: the admin token does not match"
            )))
        }
    }
}

/// Checks `EventLog` calls against the stage's link credentials (or lets everything through
/// without any).
#[derive(Clone, Debug, Default)]
pub struct LinkGuard {
    token: Option<LinkToken>,
    /// `--tls-client-ca` is set: a verified client certificate is required.
    client_certificate: bool,
}

impl LinkGuard {
    pub fn new(token: Option<LinkToken>, client_certificate: bool) -> Self {
        LinkGuard {
            token,
            client_certificate,
        }
    }

    /// `Ok` when the call carries every configured credential; `UNAUTHENTICATED` otherwise.
    pub fn check<T>(&self, request: &Request<T>) -> Result<(), Status> {
        if self.client_certificate && request.peer_certs().is_none_or(|certs| certs.is_empty()) {
            return Err(Status::unauthenticated(
                "EventLog is the stages' own link: connect with a client certificate signed by the stage's --tls-client-ca",
            ));
        }
        if let Some(token) = &self.token
            && !token.presented_in(request.metadata())
        {
            tracing::warn!("EventLog call refused: missing or wrong link token");
            return Err(Status::unauthenticated(
                "EventLog is the stages' own link: send `authorization: Bearer <token>` with the pipeline's --link-token",
            ));
        }
        Ok(())
    }
}

/// What a stage (or the CLI) sends on its links to other stages' `EventLog`: the link token, if
/// configured. (A client certificate travels in the TLS settings of the channel.)
#[derive(Clone, Debug, Default)]
pub struct LinkAuth {
    authorization: Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>,
}

impl LinkAuth {
    pub fn new(token: Option<&LinkToken>) -> Self {
        LinkAuth {
            authorization: token.and_then(|t| t.bearer().parse().ok()),
        }
    }
}

impl Interceptor for LinkAuth {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        if let Some(value) = &self.authorization {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        Ok(request)
    }
}

/// Compares without an early exit, so the time taken does not reveal how much of a guess is right.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn metadata(authorization: Option<&str>) -> MetadataMap {
        let mut m = MetadataMap::new();
        if let Some(v) = authorization {
            m.insert("authorization", v.parse().unwrap());
        }
        m
    }

    #[test]
    fn tokens_are_checked_only_when_configured() {
        let open = AdminGuard::new(None);
        assert!(open.check(&metadata(None), "SetStock").is_ok());
        let guard = AdminGuard::new(Some("s3cret-token".parse().unwrap()));
        assert!(
            guard
                .check(&metadata(Some("Bearer s3cret-token")), "SetStock")
                .is_ok()
        );
        for bad in [
            None,
            Some("Bearer nope"),
            Some("s3cret-token"),
            Some("Bearer s3cret-tokenX"),
        ] {
            let status = guard.check(&metadata(bad), "SetStock").unwrap_err();
            assert_eq!(status.code(), tonic::Code::Unauthenticated, "{bad:?}");
        }
        assert!("short".parse::<AdminToken>().is_err());
        assert!("has space in it".parse::<AdminToken>().is_err());
        assert_eq!(
            format!("{:?}", guard),
            "AdminGuard { token: Some(Token(<redacted>)) }"
        );
    }

    #[test]
    fn link_tokens_are_checked_only_when_configured() {
        let request = |authorization: Option<&str>| {
            let mut request = Request::new(());
            if let Some(v) = authorization {
                request
                    .metadata_mut()
                    .insert("authorization", v.parse().unwrap());
            }
            request
        };
        assert!(LinkGuard::default().check(&request(None)).is_ok());
        let token: LinkToken = "link-secret".parse().unwrap();
        let guard = LinkGuard::new(Some(token.clone()), false);
        let mut sent = LinkAuth::new(Some(&token)).call(request(None)).unwrap();
        assert!(guard.check(&sent).is_ok());
        sent.metadata_mut()
            .insert("authorization", "Bearer admin-secret".parse().unwrap());
        for bad in [request(None), sent, request(Some("link-secret"))] {
            let status = guard.check(&bad).unwrap_err();
            assert_eq!(status.code(), tonic::Code::Unauthenticated);
        }
        // Without a TLS connection there is no client certificate.
        let status = LinkGuard::new(None, true)
            .check(&request(None))
            .unwrap_err();
        assert_eq!(status.code(), tonic::Code::Unauthenticated);
    }
}
