//! Where notifications go: the structured log (default), a webhook, or a JSON-lines file.
//!
//! Every sink receives the same JSON body:
//! `{"order_id", "customer_id", "kind", "message", "invoice_number", "idempotency_key"}`.
//!
//! The webhook is an HTTP POST of that body with an `Idempotency-Key` header. 2xx is delivered;
//! timeouts, connection errors, 408, 429 and 5xx are retried (honouring `Retry-After`, in seconds or
//! as an HTTP date); any other answer is final and dead-letters the notification at once. A file
//! sink appends one line per notification and syncs it before reporting it delivered; a write error
//! (disk full, say) is retried.
//!
//! Delivery is at least once: a crash between delivering and recording repeats the delivery after
//! restart with the same idempotency key, which a webhook can use to drop the repeat.

use std::{
    io::Write,
    path::PathBuf,
    time::{Duration, SystemTime},
};

use orderflow_proto::v1::Notification;
use orderflow_runtime::{Attempt, error_chain, telemetry};
use reqwest::StatusCode;
use serde_json::json;
use tokio::sync::Mutex;

/// Which sink, as the `--sink` flag names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SinkKind {
    /// One structured log line per notification (target `orderflow::notification`).
    Log,
    /// HTTP POST to --webhook-url.
    Webhook,
    /// A JSON line appended to --sink-file.
    File,
}

/// A configured sink.
pub(crate) enum Sink {
    Log,
    Webhook {
        client: reqwest::Client,
        url: reqwest::Url,
    },
    File {
        path: PathBuf,
        /// One writer at a time, so lines never interleave.
        lock: Mutex<()>,
    },
}

impl Sink {
    /// The sink `kind`, with its settings checked now rather than at the first delivery.
    pub(crate) fn new(
        kind: SinkKind,
        webhook_url: Option<&str>,
        webhook_timeout: Duration,
        file: Option<&std::path::Path>,
    ) -> Result<Sink, String> {
        match kind {
            SinkKind::Log => Ok(Sink::Log),
            SinkKind::Webhook => {
                let url = webhook_url
                    .ok_or("--sink webhook needs --webhook-url (ORDERFLOW_WEBHOOK_URL)")?;
                let url = reqwest::Url::parse(url)
                    .ok()
                    .filter(|u| matches!(u.scheme(), "http" | "https"))
                    .ok_or_else(|| {
                        format!(
                            "--webhook-url / ORDERFLOW_WEBHOOK_URL {url:?} is not an http(s) URL"
                        )
                    })?;
                let client = reqwest::Client::builder()
                    .timeout(webhook_timeout)
                    .connect_timeout(webhook_timeout.min(Duration::from_secs(5)))
                    .user_agent(concat!("orderflow-notifier/", env!("CARGO_PKG_VERSION")))
                    .build()
                    .map_err(|e| format!("cannot set up the webhook client: {e}"))?;
                Ok(Sink::Webhook { client, url })
            }
            SinkKind::File => {
                let path = file
                    .ok_or("--sink file needs --sink-file (ORDERFLOW_SINK_FILE)")?
                    .to_owned();
                // Fail at start if the file cannot be opened for appending.
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&path)
                    .map_err(|e| {
                        format!(
                            "cannot open --sink-file / ORDERFLOW_SINK_FILE {}: {e}",
                            path.display()
                        )
                    })?;
                Ok(Sink::File {
                    path,
                    lock: Mutex::new(()),
                })
            }
        }
    }

    pub(crate) fn name(&self) -> &'static str {
        match self {
            Sink::Log => "log",
            Sink::Webhook { .. } => "webhook",
            Sink::File { .. } => "file",
        }
    }

    /// Makes the attempts so far final: the `log` sink's lines are held by the logger and written
    /// here, one `write` for many lines, before the notifications they deliver are recorded.
    pub(crate) fn attempts_made(&self) {
        if let Sink::Log = self {
            telemetry::write_held_lines();
        }
    }

    /// One delivery attempt.
    pub(crate) async fn deliver(&self, notification: &Notification) -> Attempt<()> {
        match self {
            Sink::Log => {
                // Held by the logger until `attempts_made`.
                tracing::info!(
                    target: telemetry::HELD_TARGET,
                    order_id = %notification.order_id,
                    customer_id = %notification.customer_id,
                    kind = notification.kind().as_str_name(),
                    text = %notification.message,
                    "customer notified"
                );
                Attempt::Done(())
            }
            Sink::Webhook { client, url } => post(client, url, notification).await,
            Sink::File { path, lock } => {
                let _one_writer = lock.lock().await;
                let path = path.clone();
                let mut line = body(notification).to_string();
                line.push('\n');
                let written = tokio::task::spawn_blocking(move || {
                    let mut file = std::fs::OpenOptions::new()
                        .create(true)
                        .append(true)
                        .open(&path)?;
                    file.write_all(line.as_bytes())?;
                    file.sync_data()
                })
                .await;
                match written {
                    Ok(Ok(())) => Attempt::Done(()),
                    Ok(Err(e)) => Attempt::Retry {
                        error: format!("cannot write the sink file: {e}"),
                        after: None,
                    },
                    Err(e) => Attempt::Retry {
                        error: format!("file sink task failed: {e}"),
                        after: None,
                    },
                }
            }
        }
    }
}

fn body(notification: &Notification) -> serde_json::Value {
    json!({
        "order_id": notification.order_id,
        "customer_id": notification.customer_id,
        "kind": notification.kind().as_str_name().strip_prefix("NOTIFICATION_KIND_").unwrap_or("UNSPECIFIED"),
        "message": notification.message,
        "invoice_number": notification.invoice_number,
        "idempotency_key": notification.idempotency_key,
    })
}

async fn post(
    client: &reqwest::Client,
    url: &reqwest::Url,
    notification: &Notification,
) -> Attempt<()> {
    let sent = client
        .post(url.clone())
        .header("Idempotency-Key", &notification.idempotency_key)
        .json(&body(notification))
        .send()
        .await;
    let response = match sent {
        Ok(response) => response,
        Err(e) => {
            return Attempt::Retry {
                error: format!("webhook unreachable: {}", error_chain(&e)),
                after: None,
            };
        }
    };
    let status = response.status();
    if status.is_success() {
        return Attempt::Done(());
    }
    let retryable = status == StatusCode::REQUEST_TIMEOUT
        || status == StatusCode::TOO_MANY_REQUESTS
        || status.is_server_error();
    if retryable {
        let after = response
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(parse_retry_after);
        Attempt::Retry {
            error: format!("webhook answered HTTP {}", status.as_u16()),
            after,
        }
    } else {
        Attempt::Fail {
            error: format!("rejected by the webhook (HTTP {})", status.as_u16()),
        }
    }
}

/// `Retry-After` as delay-seconds or an HTTP date.
fn parse_retry_after(value: &str) -> Option<Duration> {
    let value = value.trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(
        at.duration_since(SystemTime::now())
            .unwrap_or(Duration::ZERO),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_in_both_forms() {
        assert_eq!(parse_retry_after("7"), Some(Duration::from_secs(7)));
        let later = SystemTime::now() + Duration::from_secs(120);
        let header = httpdate::fmt_http_date(later);
        let parsed = parse_retry_after(&header).unwrap_or_default();
        assert!(parsed > Duration::from_secs(100) && parsed <= Duration::from_secs(120));
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT"),
            Some(Duration::ZERO)
        );
        assert_eq!(parse_retry_after("soon"), None);
    }
}
