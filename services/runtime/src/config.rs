//! Configuration shared by every stage binary: flags with `ORDERFLOW_*` environment equivalents,
//! per-stage defaults, and errors that name both the flag and the variable.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    str::FromStr,
    time::Duration,
};

use clap::{
    Args, Parser, Subcommand,
    error::{ContextKind, ContextValue},
};
use tonic::transport::{ClientTlsConfig, Endpoint};

use crate::{
    auth::{AdminToken, LinkAuth, LinkGuard, LinkToken},
    retention::Retention,
    telemetry::LogFormat,
    tls,
};

/// Entries an outbox keeps at most, acknowledged or not.
pub const DEFAULT_RETENTION_MAX_ENTRIES: u64 = 10_000_000;
/// How long a draining stage waits for in-flight RPCs and streams before closing them.
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// The part of every stage's configuration that the runtime uses.
#[derive(Args, Debug, Clone)]
pub struct ServerArgs {
    /// Address to serve gRPC on (use port 0 for any free port)
    #[arg(long, env = "ORDERFLOW_LISTEN", value_name = "ADDR")]
    pub listen: SocketAddr,

    /// Directory of this stage's store; created if missing
    #[arg(long, env = "ORDERFLOW_DATA_DIR", value_name = "DIR")]
    pub data_dir: PathBuf,

    /// Outbox entries kept at most, even if a consumer has not acknowledged them yet
    #[arg(long, env = "ORDERFLOW_RETENTION_MAX_ENTRIES", default_value_t = DEFAULT_RETENTION_MAX_ENTRIES, value_name = "N")]
    pub retention_max_entries: u64,

    /// How long to wait for in-flight requests and streams on SIGTERM before closing them
    #[arg(long, env = "ORDERFLOW_SHUTDOWN_GRACE", default_value = "10s", value_parser = humantime::parse_duration, value_name = "DURATION")]
    pub shutdown_grace: Duration,

    /// Consumers the outbox is kept for (comma-separated, or `none`): entries are deleted only once
    /// each of them has acknowledged them, and only they may acknowledge. Default: the stages that
    /// read this stage's log
    #[arg(long, env = "ORDERFLOW_RETAIN_FOR", value_name = "NAMES|none")]
    pub retain_for: Option<ConsumerNames>,

    /// Address to serve Prometheus metrics on (`GET /metrics`), or `none`
    #[arg(
        long,
        env = "ORDERFLOW_METRICS_LISTEN",
        default_value = "none",
        value_name = "ADDR|none"
    )]
    pub metrics_listen: OptionalAddr,

    /// Log line format on stderr
    #[arg(long, env = "ORDERFLOW_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// Token that admin RPCs (SetStock, SetFaults, ReplayDeadLetters) require as
    /// `authorization: Bearer <token>`; unset: admin RPCs are open
    #[arg(
        long,
        env = "ORDERFLOW_ADMIN_TOKEN",
        value_name = "TOKEN",
        hide_env_values = true
    )]
    pub admin_token: Option<AdminToken>,

    /// PEM certificate chain to serve TLS with (needs --tls-key)
    #[arg(
        long,
        env = "ORDERFLOW_TLS_CERT",
        value_name = "PEM",
        requires = "tls_key"
    )]
    pub tls_cert: Option<PathBuf>,

    /// PEM private key of --tls-cert
    #[arg(
        long,
        env = "ORDERFLOW_TLS_KEY",
        value_name = "PEM",
        requires = "tls_cert"
    )]
    pub tls_key: Option<PathBuf>,

    /// PEM CA certificate(s) to trust when connecting to other stages over https:// (default: the
    /// public web roots)
    #[arg(long, env = "ORDERFLOW_TLS_CA", value_name = "PEM")]
    pub tls_ca: Option<PathBuf>,

    /// Shared secret of the stage links: every EventLog call (Subscribe, Ack, Head) must carry
    /// `authorization: Bearer <token>`, and this stage sends it on its own links. Separate from
    /// --admin-token; set the same value on every stage
    #[arg(
        long,
        env = "ORDERFLOW_LINK_TOKEN",
        value_name = "TOKEN",
        hide_env_values = true
    )]
    pub link_token: Option<LinkToken>,

    /// PEM CA certificate(s) of the stage links' client certificates (mutual TLS; needs
    /// --tls-cert): every EventLog call must come with a client certificate this CA signed. This
    /// stage presents its own --tls-cert on its https:// links
    #[arg(
        long,
        env = "ORDERFLOW_TLS_CLIENT_CA",
        value_name = "PEM",
        requires = "tls_cert"
    )]
    pub tls_client_ca: Option<PathBuf>,

    /// Free space the data volume must keep (an amount such as 64MiB or 2GB, or a share such as
    /// 1%): below it the receiver turns new orders away (RESOURCE_EXHAUSTED) so that the stages
    /// after it keep room to drain; every stage reports the free space as a metric
    #[arg(long, env = "ORDERFLOW_MIN_FREE_SPACE", default_value = crate::disk::DEFAULT_MIN_FREE_SPACE, value_name = "SIZE|PERCENT")]
    pub min_free_space: crate::disk::MinFreeSpace,

    /// Which replica of its stage this process is: a number from 0, or a name ending in
    /// `-<number>` such as a StatefulSet pod's (`stock-0`, from the pod's `metadata.name`)
    #[arg(
        long,
        env = "ORDERFLOW_REPLICA",
        default_value = "0",
        value_name = "N|NAME-N"
    )]
    pub replica: Replica,

    /// Which replica of its stage this process is, counted from 1 as Docker Swarm's task slot
    /// (`ORDERFLOW_REPLICA_SLOT={{.Task.Slot}}` in a stack file): slot 1 is replica 0. Instead of
    /// --replica
    #[arg(
        long,
        env = "ORDERFLOW_REPLICA_SLOT",
        value_name = "SLOT",
        value_parser = parse_slot,
        conflicts_with = "replica"
    )]
    pub replica_slot: Option<u32>,

    /// Replicas of this stage, at most one per partition: replica I owns the partitions p with
    /// p mod N = I
    #[arg(long, env = "ORDERFLOW_REPLICAS", default_value = "1", value_parser = parse_replicas, value_name = "N")]
    pub replicas: u32,

    /// Partitions of the pipeline, the same on every stage. Fixed when a store is created: a stage
    /// refuses to open a store made with another count
    #[arg(long, env = "ORDERFLOW_PARTITIONS", default_value = "1", value_parser = parse_partitions, value_name = "P")]
    pub partitions: u32,

    /// The replicas of this stage, itself included, in replica order: one URL per replica
    /// separated by commas, or one URL with `{replica}` for each replica's number (`{slot}` for
    /// that number plus 1, as Swarm counts). A replica forwards there what another replica owns;
    /// needed with more than 1 replica
    #[arg(long, env = "ORDERFLOW_PEERS", value_name = "URLS", value_parser = UpstreamUrl::from_str)]
    pub peers: Option<UpstreamUrl>,

    #[command(subcommand)]
    pub command: Option<StageCommand>,
}

/// This process's index among its stage's replicas, from 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Replica(pub u32);

impl FromStr for Replica {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let ordinal = match s.rsplit_once('-') {
            Some(("", _)) => "",
            Some((_, ordinal)) => ordinal,
            None => s,
        };
        let digits = !ordinal.is_empty() && ordinal.bytes().all(|b| b.is_ascii_digit());
        digits
            .then(|| ordinal.parse().ok())
            .flatten()
            .map(Replica)
            .ok_or_else(|| {
                format!(
                    "expected a replica number from 0, or a name ending in -<number> such as a \
                 StatefulSet pod's (stock-0); got {s:?}"
                )
            })
    }
}

/// A task slot, counted from 1, as the replica it is (counted from 0).
fn parse_slot(s: &str) -> Result<u32, String> {
    match s.parse::<u32>() {
        Ok(0) => Err("slots count from 1 (Docker Swarm's {{.Task.Slot}})".into()),
        Ok(slot) => Ok(slot - 1),
        Err(e) => Err(format!("expected a slot number from 1: {e}")),
    }
}

fn parse_partitions(s: &str) -> Result<u32, String> {
    match s.parse::<u32>() {
        Ok(0) => Err("a pipeline has at least 1 partition".into()),
        Ok(n) if n > crate::partition::MAX_PARTITIONS => Err(format!(
            "at most {} partitions",
            crate::partition::MAX_PARTITIONS
        )),
        Ok(n) => Ok(n),
        Err(e) => Err(format!("expected a number: {e}")),
    }
}

fn parse_replicas(s: &str) -> Result<u32, String> {
    match s.parse::<u32>() {
        Ok(0) => Err("a stage runs at least 1 replica".into()),
        Ok(n) if n > crate::partition::MAX_PARTITIONS => Err(format!(
            "at most {} replicas, one per partition",
            crate::partition::MAX_PARTITIONS
        )),
        Ok(n) => Ok(n),
        Err(e) => Err(format!("expected a number: {e}")),
    }
}

/// What a stage binary can do besides serving.
#[derive(Subcommand, Debug, Clone)]
pub enum StageCommand {
    /// Ask the stage configured by these flags and variables (on its --listen port, over TLS if it
    /// serves TLS) whether it is SERVING; exit 0 if so, 1 otherwise. For container health checks.
    Health {
        /// Give up after this long
        #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
        timeout: Duration,
    },
}

/// The consumers an outbox is kept for: `a,b,c`, or `none` for no one (then only
/// `--retention-max-entries` bounds it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsumerNames(pub Vec<String>);

impl FromStr for ConsumerNames {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.trim() == "none" {
            return Ok(ConsumerNames(Vec::new()));
        }
        let mut names: Vec<String> = Vec::new();
        for name in s.split(',').map(str::trim).filter(|n| !n.is_empty()) {
            crate::status::check_name(name).map_err(|why| format!("consumer {name:?} {why}"))?;
            if !names.iter().any(|n| n == name) {
                names.push(name.to_owned());
            }
        }
        if names.is_empty() {
            return Err("expected comma-separated consumer names, or `none`".into());
        }
        Ok(ConsumerNames(names))
    }
}

/// A socket address, or `none` for "do not serve this".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionalAddr(pub Option<SocketAddr>);

impl FromStr for OptionalAddr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "none" | "off" | "" => Ok(OptionalAddr(None)),
            addr => addr
                .parse()
                .map(|a| OptionalAddr(Some(a)))
                .map_err(|e| format!("expected HOST:PORT or `none`: {e}")),
        }
    }
}

impl ServerArgs {
    /// Settings for a stage started from code (the CLI, tests): `listen` on `data_dir`, defaults
    /// otherwise.
    pub fn new(listen: SocketAddr, data_dir: impl Into<PathBuf>) -> Self {
        ServerArgs {
            listen,
            data_dir: data_dir.into(),
            retention_max_entries: DEFAULT_RETENTION_MAX_ENTRIES,
            shutdown_grace: DEFAULT_SHUTDOWN_GRACE,
            retain_for: None,
            metrics_listen: OptionalAddr(None),
            log_format: LogFormat::Text,
            admin_token: None,
            tls_cert: None,
            tls_key: None,
            tls_ca: None,
            link_token: None,
            tls_client_ca: None,
            min_free_space: crate::disk::MinFreeSpace::Bytes(64 << 20),
            replica: Replica(0),
            replica_slot: None,
            replicas: 1,
            partitions: 1,
            peers: None,
            command: None,
        }
    }

    /// The TLS settings for connections to other stages: trust `--tls-ca`, and present this stage's
    /// `--tls-cert` as client certificate where a server asks for one.
    pub fn client_tls(&self) -> Result<ClientTlsConfig, String> {
        let identity = self
            .tls_cert
            .as_deref()
            .zip(self.tls_key.as_deref())
            .map(|(cert, key)| tls::ClientIdentity {
                cert,
                key,
                cert_flag: "--tls-cert / ORDERFLOW_TLS_CERT",
                key_flag: "--tls-key / ORDERFLOW_TLS_KEY",
            });
        tls::client_config(self.tls_ca.as_deref(), identity)
    }

    /// A link to the stage whose replicas `url` names, with this stage's TLS settings and link
    /// token. Refuses a list of more replicas than the pipeline has partitions.
    pub fn link(&self, url: &UpstreamUrl) -> Result<Link, String> {
        if let Some(listed) = url.listed()
            && listed > self.partitions
        {
            return Err(format!(
                "{url} lists {listed} replicas, but the pipeline has {p} partition{s} \
                 (--partitions / ORDERFLOW_PARTITIONS) and a stage runs at most {p} replica{s}",
                p = self.partitions,
                s = if self.partitions == 1 { "" } else { "s" },
            ));
        }
        let tls = self.client_tls()?;
        // Every replica's URL is checked when it is parsed; make sure TLS applies to them too.
        url.endpoint(0, &tls)?;
        Ok(Link {
            url: url.clone(),
            tls,
            auth: LinkAuth::new(self.link_token.as_ref()),
        })
    }

    /// The link to the other replicas of this stage (`--peers`), checked to name exactly
    /// `--replicas` of them; `None` with one replica and no `--peers`.
    pub fn peers(&self) -> Result<Option<Link>, String> {
        let Some(peers) = &self.peers else {
            if self.replicas > 1 {
                return Err(format!(
                    "this stage runs {} replicas (--replicas / ORDERFLOW_REPLICAS): give every \
                     replica's URL in replica order with --peers / ORDERFLOW_PEERS",
                    self.replicas
                ));
            }
            return Ok(None);
        };
        if let Some(listed) = peers.listed()
            && listed != self.replicas
        {
            return Err(format!(
                "--peers / ORDERFLOW_PEERS lists {listed} replicas, and this stage runs {} \
                 (--replicas / ORDERFLOW_REPLICAS): list every replica, itself included, in \
                 replica order",
                self.replicas
            ));
        }
        self.link(peers).map(Some)
    }

    /// What this stage's own `EventLog` requires of its callers.
    pub fn link_guard(&self) -> LinkGuard {
        LinkGuard::new(self.link_token.clone(), self.tls_client_ca.is_some())
    }

    /// Refuses a replica beyond `--replicas` (say, a StatefulSet scaled past what the stage
    /// supports): it would consume its upstream's log as a second copy of the stage.
    pub fn check_replica(&self) -> Result<(), String> {
        let replica = self.replica_index();
        if self.replicas > self.partitions {
            return Err(format!(
                "{n} replicas (--replicas / ORDERFLOW_REPLICAS) of {p} partitions \
                 (--partitions / ORDERFLOW_PARTITIONS): a replica owns whole partitions, so a stage \
                 runs at most {p}",
                n = self.replicas,
                p = self.partitions
            ));
        }
        if replica < self.replicas {
            return Ok(());
        }
        let told_by = match self.replica_slot {
            Some(slot) => format!(
                "task slot {}, --replica-slot / ORDERFLOW_REPLICA_SLOT",
                slot + 1
            ),
            None => "counting from 0; --replica / ORDERFLOW_REPLICA".to_owned(),
        };
        Err(format!(
            "this is replica {replica} ({told_by}) but the \
             stage runs {n} (--replicas / ORDERFLOW_REPLICAS): not starting, since a second copy of \
             a stage would process every order again; scale the stage back to {n}",
            n = self.replicas
        ))
    }

    /// Which replica of its stage this process is, counted from 0: from `--replica-slot` if given,
    /// else `--replica`.
    pub fn replica_index(&self) -> u32 {
        self.replica_slot.unwrap_or(self.replica.0)
    }

    /// The partitions this replica owns, ascending: replica I of N owns the partitions p with
    /// p mod N = I. With one replica and one partition that is partition 0 of 1; a replica beyond
    /// the partition count owns none (and [`ServerArgs::check_replica`] refuses it).
    pub fn owned_partitions(&self) -> Vec<crate::partition::Partition> {
        let replicas = self.replicas.max(1) as usize;
        (self.replica_index()..self.partitions)
            .step_by(replicas)
            .map(|index| crate::partition::Partition {
                index,
                count: self.partitions,
            })
            .collect()
    }

    pub fn retention(&self) -> Retention {
        Retention {
            max_entries: self.retention_max_entries,
            interval: Duration::from_secs(1),
        }
    }
}

/// A connection to another stage's `EventLog`: its replicas, over which TLS, with which
/// credential.
#[derive(Debug, Clone)]
pub struct Link {
    pub url: UpstreamUrl,
    tls: ClientTlsConfig,
    pub auth: LinkAuth,
}

impl Link {
    /// The endpoint of replica `replica` of the linked stage, with connect timeout and keep-alives
    /// set and TLS applied when its URL is `https://`.
    pub fn endpoint(&self, replica: u32) -> Result<Endpoint, String> {
        self.url.endpoint(replica, &self.tls)
    }
}

/// Where a downstream stage reads its input from.
#[derive(Args, Debug, Clone)]
pub struct UpstreamArgs {
    /// URL of the upstream stage's gRPC server (http:// or https://): its replicas' URLs in replica
    /// order separated by commas, or one URL in which `{replica}` stands for each replica's number
    /// (`{slot}` for that number plus 1)
    #[arg(long, env = "ORDERFLOW_UPSTREAM", value_name = "URL", value_parser = UpstreamUrl::from_str)]
    pub upstream: UpstreamUrl,
}

/// The replicas of another stage, as a flag names them: one URL (its one replica), the replicas'
/// URLs in replica order separated by commas, or one URL containing `{replica}` that each
/// replica's number replaces (a StatefulSet's stable names: `http://stock-{replica}.stock:50052`),
/// or `{slot}` that the number plus 1 replaces (Swarm's task slots, counted from 1:
/// `http://stock-{slot}:50052`); then how many replicas there are is asked of replica 0, which every
/// stage has. Each URL is an `http://` or `https://` URL with a host.
#[derive(Debug, Clone)]
pub struct UpstreamUrl {
    replicas: Replicas,
    /// As given (trimmed), for messages.
    text: String,
}

#[derive(Debug, Clone)]
enum Replicas {
    Listed(Vec<String>),
    Templated(String, Placeholder),
}

/// What stands in a URL for each replica, and what replaces it.
#[derive(Debug, Clone, Copy)]
enum Placeholder {
    /// `{replica}`: the replica's number, counted from 0 (a StatefulSet's pod ordinal).
    Replica,
    /// `{slot}`: the replica's number plus 1 (Docker Swarm's `{{.Task.Slot}}`).
    Slot,
}

impl Placeholder {
    const ALL: [Placeholder; 2] = [Placeholder::Replica, Placeholder::Slot];

    fn text(self) -> &'static str {
        match self {
            Placeholder::Replica => "{replica}",
            Placeholder::Slot => "{slot}",
        }
    }

    /// The URL of replica `replica`, counted from 0.
    fn fill(self, url: &str, replica: u32) -> String {
        let number = match self {
            Placeholder::Replica => replica,
            Placeholder::Slot => replica.saturating_add(1),
        };
        url.replace(self.text(), &number.to_string())
    }
}

impl UpstreamUrl {
    /// The URL of replica `replica`, counted from 0; `None` beyond a list.
    pub fn replica(&self, replica: u32) -> Option<String> {
        match &self.replicas {
            Replicas::Listed(urls) => urls.get(replica as usize).cloned(),
            Replicas::Templated(url, placeholder) => Some(placeholder.fill(url, replica)),
        }
    }

    /// How many replicas a list names; `None` for a `{replica}` or `{slot}` URL, which names any
    /// number.
    pub fn listed(&self) -> Option<u32> {
        match &self.replicas {
            Replicas::Listed(urls) => Some(u32::try_from(urls.len()).unwrap_or(u32::MAX)),
            Replicas::Templated(..) => None,
        }
    }

    /// A tonic endpoint for replica `replica`, with connect timeout and keep-alives set, and `tls`
    /// applied when its URL is `https://`.
    pub fn endpoint(&self, replica: u32, tls: &ClientTlsConfig) -> Result<Endpoint, String> {
        let url = self.replica(replica).ok_or_else(|| {
            format!("{self} names no replica {replica}: list one URL per replica, in replica order")
        })?;
        tls::endpoint(&url, tls)
    }

    /// The URL as given.
    pub fn as_str(&self) -> &str {
        &self.text
    }
}

impl FromStr for UpstreamUrl {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let urls: Vec<&str> = s.split(',').map(str::trim).collect();
        if urls.iter().any(|url| url.is_empty()) {
            return Err(
                "expected a URL, or the replicas' URLs separated by commas; one is empty".into(),
            );
        }
        let placeholders = |url: &str| -> Vec<Placeholder> {
            Placeholder::ALL
                .into_iter()
                .filter(|p| url.contains(p.text()))
                .collect()
        };
        let templated = urls
            .iter()
            .filter(|url| !placeholders(url).is_empty())
            .count();
        let replicas = match (urls.as_slice(), templated) {
            (_, 0) => Replicas::Listed(
                urls.iter()
                    .map(|url| check_url(url).map(|()| (*url).to_owned()))
                    .collect::<Result<_, _>>()?,
            ),
            ([url], _) => {
                let placeholder = match placeholders(url).as_slice() {
                    [one] if url.matches(one.text()).count() == 1 => *one,
                    _ => {
                        return Err(
                            "{replica} or {slot} may appear once, and not both in one URL".into(),
                        );
                    }
                };
                check_url(&placeholder.fill(url, 0))?;
                Replicas::Templated((*url).to_owned(), placeholder)
            }
            _ => {
                return Err(
                    "{replica} (or {slot}) stands for every replica's number: give one URL with \
                     it, or list every replica's URL without it"
                        .into(),
                );
            }
        };
        Ok(UpstreamUrl {
            replicas,
            text: urls.join(","),
        })
    }
}

/// Checks one replica's URL: `http://` or `https://`, valid, with a host.
fn check_url(s: &str) -> Result<(), String> {
    if !(s.starts_with("http://") || s.starts_with("https://")) {
        return Err(format!(
            "expected a URL starting with http:// or https://, got {s:?}"
        ));
    }
    let endpoint = Endpoint::from_shared(s.to_owned())
        .map_err(|e| format!("{s:?} is not a valid URL: {e}"))?;
    if endpoint.uri().host().is_none_or(str::is_empty) {
        return Err(format!("the URL {s:?} has no host"));
    }
    Ok(())
}

impl std::fmt::Display for UpstreamUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.text)
    }
}

/// Parses the process arguments into `C`, giving the named arguments a per-stage default. On a bad
/// value it prints clap's message plus the flag and environment variable to fix, and exits with 2.
pub fn parse_args<C: Parser>(defaults: &[(&'static str, String)]) -> C {
    match try_parse_args(std::env::args_os(), defaults) {
        Ok(config) => config,
        Err((error, command)) => exit_naming_env(error, &command),
    }
}

/// [`parse_args`] without exiting: the error comes back with the command it was checked against.
fn try_parse_args<C: Parser>(
    args: impl IntoIterator<Item = std::ffi::OsString>,
    defaults: &[(&'static str, String)],
) -> Result<C, (clap::Error, Box<clap::Command>)> {
    let mut command = C::command();
    for (id, value) in defaults {
        let value = value.clone();
        command = command.mut_arg(*id, |arg| arg.default_value(value).required(false));
    }
    let matches = command
        .clone()
        .try_get_matches_from(args)
        .map_err(|error| (error, Box::new(command.clone())))?;
    C::from_arg_matches(&matches).map_err(|error| (error, Box::new(command)))
}

fn exit_naming_env(error: clap::Error, command: &clap::Command) -> ! {
    let arg = match error.get(ContextKind::InvalidArg) {
        Some(ContextValue::String(arg)) => Some(arg.clone()),
        _ => None,
    };
    let env = arg.as_deref().and_then(|arg| {
        let long = arg.split_whitespace().next()?.trim_start_matches("--");
        command
            .get_arguments()
            .find(|a| a.get_long() == Some(long))
            .and_then(|a| a.get_env())
            .map(|env| (long.to_owned(), env.to_string_lossy().into_owned()))
    });
    if let Some((long, env)) = env {
        let _ = error.print();
        eprintln!("\nset it with the flag --{long} or the environment variable {env}");
        std::process::exit(2);
    }
    error.exit()
}

/// Creates `dir` if needed, with an error that names the flag and the variable.
pub fn ensure_data_dir(dir: &Path) -> Result<(), String> {
    std::fs::create_dir_all(dir).map_err(|e| {
        format!(
            "cannot create the data directory {} (--data-dir, ORDERFLOW_DATA_DIR): {e}",
            dir.display()
        )
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[derive(Parser, Debug)]
    struct TestConfig {
        #[command(flatten)]
        server: ServerArgs,
        #[command(flatten)]
        upstream: UpstreamArgs,
    }

    fn parse(args: &[&str]) -> Result<TestConfig, clap::Error> {
        let args = std::iter::once("test")
            .chain(args.iter().copied())
            .map(Into::into);
        try_parse_args(
            args,
            &[
                ("listen", "0.0.0.0:50052".to_owned()),
                ("data_dir", "data/stock".to_owned()),
                ("upstream", "http://127.0.0.1:50051".to_owned()),
            ],
        )
        .map_err(|(error, _)| error)
    }

    #[test]
    fn per_stage_defaults_apply_and_flags_override_them() {
        let config = parse(&[])
            .map_err(|e| e.to_string())
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(config.server.listen.to_string(), "0.0.0.0:50052");
        assert_eq!(config.server.data_dir, PathBuf::from("data/stock"));
        assert_eq!(config.upstream.upstream.as_str(), "http://127.0.0.1:50051");
        let config = parse(&["--listen", "127.0.0.1:0", "--upstream", "https://stock:1"])
            .map_err(|e| e.to_string())
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(config.server.listen.port(), 0);
        assert_eq!(config.upstream.upstream.as_str(), "https://stock:1");
        assert!(parse(&["--listen", "nope"]).is_err());
    }

    #[test]
    fn the_command_line_is_well_formed() {
        use clap::CommandFactory;
        TestConfig::command().debug_assert();
    }

    #[test]
    fn consumers_and_link_credentials_parse() {
        let config = parse(&[
            "--retain-for",
            "invoice, receiver,invoice",
            "--link-token",
            "link-secret-1",
            "--admin-token",
            "admin-secret-1",
        ])
        .map_err(|e| e.to_string())
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            config.server.retain_for,
            Some(ConsumerNames(vec!["invoice".into(), "receiver".into()]))
        );
        assert_ne!(config.server.link_token, config.server.admin_token);
        let none = parse(&["--retain-for", "none"])
            .map_err(|e| e.to_string())
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(none.server.retain_for, Some(ConsumerNames(Vec::new())));
        for bad in [",", "a b", "stock,\u{0}"] {
            assert!(parse(&["--retain-for", bad]).is_err(), "{bad:?} accepted");
        }
        assert!(
            parse(&["--tls-client-ca", "ca.pem"]).is_err(),
            "mutual TLS without serving TLS"
        );
    }

    #[test]
    fn upstream_urls_are_checked() {
        assert!(UpstreamUrl::from_str("http://127.0.0.1:50051").is_ok());
        assert!(UpstreamUrl::from_str("https://stock:50052").is_ok());
        for bad in ["127.0.0.1:50051", "ftp://x", "http://", "", "http://a:1,"] {
            assert!(UpstreamUrl::from_str(bad).is_err(), "{bad} accepted");
        }
        // As manifests write the replicas of another stage: a StatefulSet's stable names, or a
        // list in replica order.
        let templated = UpstreamUrl::from_str("http://stock-{replica}.stock:50052").unwrap();
        assert_eq!(templated.listed(), None);
        assert_eq!(
            templated.replica(0).as_deref(),
            Some("http://stock-0.stock:50052")
        );
        assert_eq!(
            templated.replica(12).as_deref(),
            Some("http://stock-12.stock:50052")
        );
        let listed = UpstreamUrl::from_str(" http://stock-a:1 , https://stock-b:2").unwrap();
        assert_eq!(listed.listed(), Some(2));
        assert_eq!(listed.replica(1).as_deref(), Some("https://stock-b:2"));
        assert_eq!(listed.replica(2), None);
        assert_eq!(listed.as_str(), "http://stock-a:1,https://stock-b:2");
        let one = UpstreamUrl::from_str(" http://stock:50052 ").unwrap();
        assert_eq!(
            (one.listed(), one.replica(0).as_deref()),
            (Some(1), Some("http://stock:50052"))
        );
        // As a Swarm stack writes them: task slots count from 1.
        let slots = UpstreamUrl::from_str("http://stock-{slot}:50052").unwrap();
        assert_eq!(slots.listed(), None);
        assert_eq!(slots.replica(0).as_deref(), Some("http://stock-1:50052"));
        assert_eq!(slots.replica(2).as_deref(), Some("http://stock-3:50052"));
        for (bad, why) in [
            ("http://s-{replica}-{replica}:1", "once"),
            ("http://s-{slot}-{slot}:1", "once"),
            ("http://s-{slot}-{replica}:1", "not both"),
            (
                "http://s-{slot}:1,http://t:1",
                "every replica's URL without it",
            ),
            (
                "http://s-{replica}:1,http://t:1",
                "every replica's URL without it",
            ),
            ("http://a:1,,http://b:1", "one is empty"),
            ("http://a:1,b:2", "\"b:2\""),
        ] {
            let refused = UpstreamUrl::from_str(bad).unwrap_err();
            assert!(refused.contains(why), "{bad}: {refused}");
        }
        // A stage runs at most one replica per partition.
        let args = ServerArgs::new("127.0.0.1:0".parse().unwrap(), "data");
        let refused = args.link(&listed).unwrap_err();
        assert!(
            refused.contains("lists 2 replicas") && refused.contains("1 partition "),
            "{refused}"
        );
        assert!(args.link(&one).is_ok() && args.link(&templated).is_ok());
    }

    #[test]
    fn replicas_beyond_the_stage_s_count_are_refused() {
        let config = parse(&[]).unwrap();
        assert_eq!(config.server.replica, Replica(0));
        assert!(config.server.check_replica().is_ok());
        for (given, ordinal) in [
            ("0", 0),
            ("stock-0", 0),
            ("stock-12", 12),
            ("my-stock-3", 3),
        ] {
            assert_eq!(given.parse::<Replica>(), Ok(Replica(ordinal)), "{given}");
        }
        for bad in [
            "",
            "stock",
            "stock-",
            "-1",
            "stock-x",
            "+1",
            "stock-99999999999",
        ] {
            assert!(bad.parse::<Replica>().is_err(), "{bad}");
        }
        let second = parse(&["--replica", "stock-1"]).unwrap();
        let refused = second.server.check_replica().unwrap_err();
        assert!(
            refused.contains("replica 1") && refused.contains("ORDERFLOW_REPLICAS"),
            "{refused}"
        );
        let none = parse(&["--replicas", "0"]).unwrap_err().to_string();
        assert!(none.contains("at least 1 replica"), "{none}");
        assert!(parse(&["--replicas", "1"]).is_ok());
    }

    #[test]
    fn a_swarm_task_slot_counts_from_1() {
        let first = parse(&["--replica-slot", "1"]).unwrap();
        assert_eq!(first.server.replica_index(), 0);
        assert!(first.server.check_replica().is_ok());
        assert_eq!(first.server.owned_partitions(), [crate::Partition::ONLY]);
        let second = parse(&["--replica-slot", "2"]).unwrap();
        let refused = second.server.check_replica().unwrap_err();
        assert!(
            refused.contains("replica 1 (task slot 2, --replica-slot"),
            "{refused}"
        );
        for (bad, why) in [("0", "count from 1"), ("x", "expected a slot number")] {
            let refused = parse(&["--replica-slot", bad]).unwrap_err().to_string();
            assert!(refused.contains(why), "{bad}: {refused}");
        }
        let both = parse(&["--replica-slot", "1", "--replica", "0"]).unwrap_err();
        assert_eq!(both.kind(), clap::error::ErrorKind::ArgumentConflict);
    }

    #[test]
    fn partition_counts_are_checked() {
        let config = parse(&[]).unwrap();
        assert_eq!(config.server.owned_partitions(), [crate::Partition::ONLY]);
        assert!(parse(&["--partitions", "1"]).is_ok());
        assert_eq!(
            parse(&["--partitions", "4"])
                .unwrap()
                .server
                .owned_partitions()
                .len(),
            4
        );
        for (given, why) in [
            ("0", "at least 1 partition"),
            ("2000", "at most 1024"),
            ("x", "expected a number"),
        ] {
            let refused = parse(&["--partitions", given]).unwrap_err().to_string();
            assert!(refused.contains(why), "{given}: {refused}");
        }
    }

    /// Replica I of N owns the partitions p with p mod N = I; a stage runs at most P replicas.
    #[test]
    fn a_replica_owns_every_nth_partition() {
        let layout = |replica: u32, replicas: u32, partitions: u32| {
            let mut args = ServerArgs::new("127.0.0.1:0".parse().unwrap(), "data");
            (args.replica, args.replicas, args.partitions) =
                (Replica(replica), replicas, partitions);
            args
        };
        let owned = |args: &ServerArgs| -> Vec<u32> {
            args.owned_partitions().iter().map(|p| p.index).collect()
        };
        // Three replicas of four partitions, as the scale-out test runs stock.
        assert_eq!(owned(&layout(0, 3, 4)), [0, 3]);
        assert_eq!(owned(&layout(1, 3, 4)), [1]);
        assert_eq!(owned(&layout(2, 3, 4)), [2]);
        assert_eq!(owned(&layout(0, 1, 4)), [0, 1, 2, 3]);
        assert_eq!(owned(&layout(1, 2, 4)), [1, 3]);
        assert!(
            layout(0, 3, 4)
                .owned_partitions()
                .iter()
                .all(|p| p.count == 4)
        );
        for replica in 0..3 {
            assert!(layout(replica, 3, 4).check_replica().is_ok());
        }
        let beyond = layout(3, 3, 4).check_replica().unwrap_err();
        assert!(beyond.contains("replica 3"), "{beyond}");
        let too_many = layout(0, 5, 4).check_replica().unwrap_err();
        assert!(
            too_many.contains("5 replicas") && too_many.contains("at most 4"),
            "{too_many}"
        );
    }

    /// `--peers` names every replica of the stage, itself included, as many as `--replicas`.
    #[test]
    fn peers_name_every_replica() {
        let two = |peers: Option<&str>| {
            let mut args = ServerArgs::new("127.0.0.1:0".parse().unwrap(), "data");
            (args.replicas, args.partitions) = (2, 4);
            args.peers = peers.map(|p| p.parse().unwrap());
            args.peers()
        };
        let missing = two(None).unwrap_err();
        assert!(missing.contains("ORDERFLOW_PEERS"), "{missing}");
        let short = two(Some("http://r-0:1")).unwrap_err();
        assert!(
            short.contains("lists 1 replicas") && short.contains("runs 2"),
            "{short}"
        );
        let link = two(Some("http://r-0:1,http://r-1:1")).unwrap().unwrap();
        assert_eq!(link.url.replica(1).as_deref(), Some("http://r-1:1"));
        assert!(two(Some("http://r-{replica}:1")).unwrap().is_some());
        let alone = ServerArgs::new("127.0.0.1:0".parse().unwrap(), "data");
        assert!(alone.peers().unwrap().is_none());
    }
}
