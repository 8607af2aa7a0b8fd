//! Logging set-up of every orderflow process: `tracing` to stderr, filtered by `RUST_LOG`.

use tracing_subscriber::{EnvFilter, fmt, prelude::*};

/// Installs the global subscriber: human-readable lines on stderr, `RUST_LOG` filtering with `info`
/// as the default. Safe to call more than once (later calls do nothing).
pub fn init_logging() {
    init_logging_with_default("info");
}

/// Like [`init_logging`], with `default` as the filter when `RUST_LOG` is unset.
pub fn init_logging_with_default(default: &str) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    let _ = tracing_subscriber::registry()
        .with(filter)
        .with(fmt::layer().with_writer(std::io::stderr))
        .try_init();
}
