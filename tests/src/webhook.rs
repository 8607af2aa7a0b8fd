//! A real HTTP server standing in for a customer-notification webhook, whose answers the test can
//! change while it runs: fail the first N calls (alternating 503 with `Retry-After`, 429 and 500),
//! refuse everything (400), or accept everything. It records every call's `Idempotency-Key` and
//! whether it was accepted.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
};

use axum::{
    Router,
    extract::State,
    http::{HeaderMap, StatusCode},
    response::{IntoResponse, Response},
    routing::post,
};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// How the webhook answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Fail this many calls in total (transiently), then accept.
    FailFirst(usize),
    /// 400 to everything: a permanent refusal.
    Refuse,
    Accept,
}

#[derive(Default)]
struct Calls {
    mode: Option<Mode>,
    failed: usize,
    /// (idempotency key, accepted)
    log: Vec<(String, bool)>,
}

/// A running webhook.
pub struct Webhook {
    pub addr: SocketAddr,
    calls: Arc<Mutex<Calls>>,
    shutdown: CancellationToken,
}

impl Webhook {
    pub async fn start(mode: Mode) -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let calls = Arc::new(Mutex::new(Calls {
            mode: Some(mode),
            ..Calls::default()
        }));
        let shutdown = CancellationToken::new();
        let app = Router::new()
            .route("/notify", post(receive))
            .with_state(calls.clone());
        let stop = shutdown.clone();
        tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(stop.cancelled_owned())
                .await
        });
        Ok(Webhook {
            addr,
            calls,
            shutdown,
        })
    }

    pub fn url(&self) -> String {
        format!("http://{}/notify", self.addr)
    }

    pub fn set_mode(&self, mode: Mode) {
        if let Ok(mut calls) = self.calls.lock() {
            calls.mode = Some(mode);
        }
    }

    /// Every call so far: (idempotency key, accepted).
    pub fn calls(&self) -> Vec<(String, bool)> {
        self.calls.lock().map(|c| c.log.clone()).unwrap_or_default()
    }

    /// How many times each key was accepted.
    pub fn accepted_per_key(&self) -> HashMap<String, usize> {
        let mut out = HashMap::new();
        for (key, accepted) in self.calls() {
            if accepted {
                *out.entry(key).or_default() += 1;
            }
        }
        out
    }
}

impl Drop for Webhook {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

async fn receive(
    State(calls): State<Arc<Mutex<Calls>>>,
    headers: HeaderMap,
    body: String,
) -> Response {
    let key = headers
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let valid = serde_json::from_str::<serde_json::Value>(&body)
        .ok()
        .is_some_and(|v| v["order_id"].is_string() && v["message"].is_string());
    let Ok(mut calls) = calls.lock() else {
        return StatusCode::INTERNAL_SERVER_ERROR.into_response();
    };
    let answer = match calls.mode {
        _ if !valid || key.is_empty() => StatusCode::UNPROCESSABLE_ENTITY.into_response(),
        Some(Mode::FailFirst(n)) if calls.failed < n => {
            calls.failed += 1;
            match calls.failed % 3 {
                0 => (StatusCode::SERVICE_UNAVAILABLE, [("retry-after", "0")]).into_response(),
                1 => StatusCode::TOO_MANY_REQUESTS.into_response(),
                _ => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
            }
        }
        Some(Mode::Refuse) => StatusCode::BAD_REQUEST.into_response(),
        _ => StatusCode::NO_CONTENT.into_response(),
    };
    let accepted = answer.status().is_success();
    calls.log.push((key, accepted));
    answer
}
