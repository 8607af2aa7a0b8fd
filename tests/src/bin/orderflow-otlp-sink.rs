//! An OTLP/gRPC trace receiver that appends every span it gets to a JSON-lines file: Jaeger's
//! stand-in in the container test, where no Jaeger image can be pulled.
//!
//! `orderflow-otlp-sink [LISTEN_ADDR] [SPANS_FILE]` (defaults `0.0.0.0:4317`, `/spans/spans.jsonl`).
//! `orderflow-otlp-sink health [ADDR]` exits 0 once something accepts TCP on ADDR (default
//! `127.0.0.1:4317`): the container's health check, since the image holds no probe binary.

use std::{
    fs::OpenOptions,
    io::Write,
    net::SocketAddr,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::Context;
use orderflow_e2e::otlp::{ReceivedSpan, Sink, serve};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("health") {
        let addr: SocketAddr = args
            .get(1)
            .map_or("127.0.0.1:4317", String::as_str)
            .parse()
            .context("health: not a socket address")?;
        let connect = tokio::net::TcpStream::connect(addr);
        tokio::time::timeout(Duration::from_secs(2), connect)
            .await
            .context("health: timed out")??;
        return Ok(());
    }
    let listen: SocketAddr = args
        .first()
        .map_or("0.0.0.0:4317", String::as_str)
        .parse()
        .context("not a socket address")?;
    let path = PathBuf::from(args.get(1).map_or("/spans/spans.jsonl", String::as_str));
    let file = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    let file = Arc::new(Mutex::new(file));
    let sink: Sink = Arc::new(move |spans: Vec<ReceivedSpan>| {
        let Ok(mut file) = file.lock() else { return };
        let mut lines = Vec::new();
        for span in &spans {
            if let Ok(line) = serde_json::to_vec(span) {
                lines.extend_from_slice(&line);
                lines.push(b'\n');
            }
        }
        if let Err(e) = file.write_all(&lines).and_then(|()| file.flush()) {
            eprintln!("orderflow-otlp-sink: cannot write spans: {e}");
        }
    });
    let listener = TcpListener::bind(listen)
        .await
        .with_context(|| format!("binding {listen}"))?;
    println!(
        "orderflow-otlp-sink listening on {listen}, writing {}",
        path.display()
    );
    let shutdown = CancellationToken::new();
    let stop = shutdown.clone();
    tokio::spawn(async move {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(term) => term,
                Err(_) => return,
            };
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        stop.cancel();
    });
    serve(listener, sink, shutdown).await
}
