//! Configuration shared by every stage binary: flags with `ORDERFLOW_*` environment equivalents,
//! per-stage defaults, and errors that name both the flag and the variable.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    str::FromStr,
    time::Duration,
};

use clap::{
    Args, Parser,
    error::{ContextKind, ContextValue},
};
use tonic::transport::Endpoint;

use crate::eventlog::Retention;

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
        }
    }

    pub fn retention(&self) -> Retention {
        Retention {
            max_entries: self.retention_max_entries,
            interval: Duration::from_secs(1),
        }
    }
}

/// Where a downstream stage reads its input from.
#[derive(Args, Debug, Clone)]
pub struct UpstreamArgs {
    /// URL of the upstream stage's gRPC server (http:// or https://)
    #[arg(long, env = "ORDERFLOW_UPSTREAM", value_name = "URL", value_parser = UpstreamUrl::from_str)]
    pub upstream: UpstreamUrl,
}

/// A validated `http://` or `https://` URL of another stage.
#[derive(Debug, Clone)]
pub struct UpstreamUrl(String);

impl UpstreamUrl {
    /// A tonic endpoint for it, with connect timeout and keep-alives set.
    pub fn endpoint(&self) -> Endpoint {
        // Validated in `from_str`, so building the endpoint again cannot fail.
        Endpoint::from_shared(self.0.clone())
            .unwrap_or_else(|_| Endpoint::from_static("http://invalid.invalid"))
            .connect_timeout(Duration::from_secs(5))
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(20))
            .keep_alive_timeout(Duration::from_secs(10))
            .keep_alive_while_idle(true)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for UpstreamUrl {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if !(s.starts_with("http://") || s.starts_with("https://")) {
            return Err("expected a URL starting with http:// or https://".into());
        }
        let endpoint =
            Endpoint::from_shared(s.to_owned()).map_err(|e| format!("not a valid URL: {e}"))?;
        if endpoint.uri().host().is_none_or(str::is_empty) {
            return Err("the URL has no host".into());
        }
        Ok(UpstreamUrl(s.to_owned()))
    }
}

impl std::fmt::Display for UpstreamUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
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
    fn upstream_urls_are_checked() {
        assert!(UpstreamUrl::from_str("http://127.0.0.1:50051").is_ok());
        assert!(UpstreamUrl::from_str("https://stock:50052").is_ok());
        for bad in ["127.0.0.1:50051", "ftp://x", "http://", ""] {
            assert!(UpstreamUrl::from_str(bad).is_err(), "{bad} accepted");
        }
    }
}
