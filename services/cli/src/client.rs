//! Reaching the stages from the command line: their URLs, TLS trust, the admin token, and errors
//! that say what went wrong in the words of the server.

use std::{path::PathBuf, str::FromStr};

use anyhow::{Context, anyhow};
use clap::Args;
use orderflow_proto::v1::event_log_client::EventLogClient;
use orderflow_runtime::{AdminToken, LinkAuth, LinkToken, UpstreamUrl, tls};
use tonic::{Request, Status, service::interceptor::InterceptedService, transport::Channel};
use tonic_types::StatusExt;

/// Where the stages are and how to talk to them (every subcommand accepts these). A stage that runs
/// replicas may be named by any one of them, which forwards or gathers what the others hold, or by
/// all of them as its links name them (`load` follows the notifier's log at each replica).
#[derive(Args, Debug, Clone)]
pub struct Connect {
    /// Receiver URL (http:// or https://)
    #[arg(
        long,
        global = true,
        env = "ORDERFLOW_RECEIVER_URL",
        default_value = "http://127.0.0.1:50051",
        value_name = "URL"
    )]
    pub receiver: String,
    /// Stock checker URL
    #[arg(
        long,
        global = true,
        env = "ORDERFLOW_STOCK_URL",
        default_value = "http://127.0.0.1:50052",
        value_name = "URL"
    )]
    pub stock: String,
    /// Invoice creator URL
    #[arg(
        long,
        global = true,
        env = "ORDERFLOW_INVOICE_URL",
        default_value = "http://127.0.0.1:50053",
        value_name = "URL"
    )]
    pub invoice: String,
    /// Notifier URL; with replicas, `load` needs every replica's URL in replica order
    /// (comma-separated, or one URL with `{replica}` or `{slot}`) to follow each one's log
    #[arg(
        long,
        global = true,
        env = "ORDERFLOW_NOTIFIER_URL",
        default_value = "http://127.0.0.1:50054",
        value_name = "URL"
    )]
    pub notifier: String,
    /// PEM CA certificate to trust for https:// URLs (default: the public web roots)
    #[arg(long, global = true, env = "ORDERFLOW_TLS_CA", value_name = "PEM")]
    pub tls_ca: Option<PathBuf>,
    /// Token for admin RPCs (stock set, faults set, dlq replay), sent as `authorization: Bearer`
    #[arg(
        long,
        global = true,
        env = "ORDERFLOW_ADMIN_TOKEN",
        hide_env_values = true,
        value_name = "TOKEN"
    )]
    pub admin_token: Option<AdminToken>,
    /// The stages' link token, for reading a stage's log (`load` follows the notifier's), sent as
    /// `authorization: Bearer` on EventLog calls
    #[arg(
        long,
        global = true,
        env = "ORDERFLOW_LINK_TOKEN",
        hide_env_values = true,
        value_name = "TOKEN"
    )]
    pub link_token: Option<LinkToken>,
    /// PEM client certificate to present to https:// stages that ask for one (--tls-client-ca on
    /// the stage; needs --tls-client-key)
    #[arg(
        long,
        global = true,
        env = "ORDERFLOW_TLS_CLIENT_CERT",
        value_name = "PEM",
        requires = "tls_client_key"
    )]
    pub tls_client_cert: Option<PathBuf>,
    /// PEM private key of --tls-client-cert
    #[arg(
        long,
        global = true,
        env = "ORDERFLOW_TLS_CLIENT_KEY",
        value_name = "PEM",
        requires = "tls_client_cert"
    )]
    pub tls_client_key: Option<PathBuf>,
}

/// A client of a stage's `EventLog`, with the link token on every call.
pub type LogClient = EventLogClient<InterceptedService<Channel, LinkAuth>>;

/// Which stage a command talks to, for URLs and messages.
#[derive(Debug, Clone, Copy)]
pub enum Stage {
    Receiver,
    Stock,
    Invoice,
    Notifier,
}

impl Connect {
    fn url(&self, stage: Stage) -> (&str, &'static str) {
        match stage {
            Stage::Receiver => (&self.receiver, "--receiver"),
            Stage::Stock => (&self.stock, "--stock"),
            Stage::Invoice => (&self.invoice, "--invoice"),
            Stage::Notifier => (&self.notifier, "--notifier"),
        }
    }

    /// A connected channel to `stage` (its first replica, when its URL names several).
    pub async fn channel(&self, stage: Stage) -> anyhow::Result<Channel> {
        self.channel_to(stage, 0).await
    }

    /// The replicas `stage`'s URL names: one URL, a comma-separated list, or one URL with
    /// `{replica}` or `{slot}`.
    pub fn replicas(&self, stage: Stage) -> anyhow::Result<UpstreamUrl> {
        let (url, flag) = self.url(stage);
        UpstreamUrl::from_str(url).map_err(|e| anyhow!("{flag}: {e}"))
    }

    /// A connected channel to replica `replica` (counted from 0) of `stage`.
    pub async fn channel_to(&self, stage: Stage, replica: u32) -> anyhow::Result<Channel> {
        let (_, flag) = self.url(stage);
        let url = self.replicas(stage)?.replica(replica).ok_or_else(|| {
            anyhow!("{flag} names no replica {replica}: list every replica's URL, in replica order")
        })?;
        let identity = self
            .tls_client_cert
            .as_deref()
            .zip(self.tls_client_key.as_deref())
            .map(|(cert, key)| tls::ClientIdentity {
                cert,
                key,
                cert_flag: "--tls-client-cert / ORDERFLOW_TLS_CLIENT_CERT",
                key_flag: "--tls-client-key / ORDERFLOW_TLS_CLIENT_KEY",
            });
        let tls = tls::client_config(self.tls_ca.as_deref(), identity).map_err(|e| anyhow!(e))?;
        let endpoint = tls::endpoint(&url, &tls).map_err(|e| anyhow!("{flag}: {e}"))?;
        endpoint
            .connect()
            .await
            .with_context(|| format!("cannot reach {url} ({flag})"))
    }

    /// A client of the log of replica `replica` of `stage`, carrying the link token when one is
    /// given.
    pub async fn log(&self, stage: Stage, replica: u32) -> anyhow::Result<LogClient> {
        let channel = self.channel_to(stage, replica).await?;
        Ok(EventLogClient::with_interceptor(
            channel,
            LinkAuth::new(self.link_token.as_ref()),
        ))
    }

    /// `message` as an admin request: with the admin token, when one is given.
    pub fn admin<T>(&self, message: T) -> anyhow::Result<Request<T>> {
        let mut request = Request::new(message);
        if let Some(token) = &self.admin_token {
            let value = token
                .bearer()
                .parse()
                .map_err(|_| anyhow!("the admin token cannot be sent as a header"))?;
            request.metadata_mut().insert("authorization", value);
        }
        Ok(request)
    }
}

/// Every row of a paged list RPC: `fetch(page_token)` returns a page and the next token (empty
/// after the last page).
pub async fn all_pages<T, F, Fut>(what: &str, mut fetch: F) -> anyhow::Result<Vec<T>>
where
    F: FnMut(String) -> Fut,
    Fut: std::future::Future<Output = Result<(Vec<T>, String), Status>>,
{
    let mut rows = Vec::new();
    let mut token = String::new();
    loop {
        let (page, next) = fetch(token).await.map_err(|status| refused(what, status))?;
        rows.extend(page);
        if next.is_empty() {
            return Ok(rows);
        }
        token = next;
    }
}

/// The server's answer as an error: the code, the message and each bad field.
pub fn refused(what: &str, status: Status) -> anyhow::Error {
    let mut text = format!("{what} failed ({:?}): {}", status.code(), status.message());
    if let Some(bad) = status.get_details_bad_request() {
        for violation in bad.field_violations {
            text.push_str(&format!(
                "\n  {}: {}",
                violation.field, violation.description
            ));
        }
    }
    if status.code() == tonic::Code::Unauthenticated {
        text.push_str(if what.starts_with("EventLog") {
            "\n  (give the stages' link token with --link-token or ORDERFLOW_LINK_TOKEN)"
        } else {
            "\n  (give the stage's admin token with --admin-token or ORDERFLOW_ADMIN_TOKEN)"
        });
    }
    anyhow!(text)
}
