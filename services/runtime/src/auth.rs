//! Protection of admin RPCs: with `--admin-token` set, `SetStock`, `SetFaults` and
//! `ReplayDeadLetters` need `authorization: Bearer <token>`, else `UNAUTHENTICATED`. Order and query
//! RPCs stay open.

use std::{str::FromStr, sync::Arc};

use tonic::{Status, metadata::MetadataMap};

/// The shared secret of admin RPCs. Its `Debug` never shows it.
#[derive(Clone, PartialEq, Eq)]
pub struct AdminToken(Arc<str>);

impl std::fmt::Debug for AdminToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AdminToken(<redacted>)")
    }
}

impl FromStr for AdminToken {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.len() < 8 {
            return Err("an admin token needs at least 8 characters".into());
        }
        if !s.bytes().all(|b| b.is_ascii_graphic()) {
            return Err("an admin token may only contain visible ASCII characters".into());
        }
        Ok(AdminToken(s.into()))
    }
}

impl AdminToken {
    /// The `authorization` header value that carries it.
    pub fn bearer(&self) -> String {
        format!("Bearer {}", self.0)
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
        let Some(header) = metadata.get("authorization") else {
            return Err(Status::unauthenticated(format!(
                "{rpc} is an admin RPC: send `authorization: Bearer <token>` with the stage's admin token"
            )));
        };
        let presented = header
            .to_str()
            .ok()
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or_default();
        if constant_time_eq(presented.as_bytes(), token.0.as_bytes()) {
            Ok(())
        } else {
            tracing::warn!(rpc, "admin RPC refused: wrong token");
            Err(Status::unauthenticated(format!(
                "{rpc}: the admin token does not match"
            )))
        }
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
            "AdminGuard { token: Some(AdminToken(<redacted>)) }"
        );
    }
}
