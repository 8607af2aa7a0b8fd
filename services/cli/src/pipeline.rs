//! The four stages in one process, wired to each other over loopback gRPC exactly as separate
//! processes would be.

use std::{
    net::{IpAddr, SocketAddr},
    path::PathBuf,
};

use anyhow::Context;
use orderflow_runtime::{ServeError, ServerArgs, UpstreamArgs, UpstreamUrl};
use orderflow_stock::CatalogSource;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Where and how to run the in-process pipeline.
#[derive(Debug, Clone)]
pub struct PipelineConfig {
    pub data_dir: PathBuf,
    pub host: IpAddr,
    /// Ports of receiver, stock, invoice and notifier; 0 = any free port.
    pub ports: [u16; 4],
    pub catalog: CatalogSource,
    pub tax_rate_bps: u32,
}

/// A running in-process pipeline.
pub struct Pipeline {
    pub receiver: SocketAddr,
    pub stock: SocketAddr,
    pub invoice: SocketAddr,
    pub notifier: SocketAddr,
    shutdown: CancellationToken,
    stages: Vec<(&'static str, JoinHandle<Result<(), ServeError>>)>,
}

fn url(addr: SocketAddr) -> anyhow::Result<UpstreamArgs> {
    let upstream: UpstreamUrl = format!("http://{addr}")
        .parse()
        .map_err(|e: String| anyhow::anyhow!(e))?;
    Ok(UpstreamArgs { upstream })
}

impl Pipeline {
    /// Binds all four stages (upstream first, so each downstream knows its upstream's address) and
    /// starts serving; returns once every socket is bound and every store open.
    pub async fn start(config: PipelineConfig) -> anyhow::Result<Self> {
        let shutdown = CancellationToken::new();
        let server = |port: u16, stage: &str| {
            ServerArgs::new(
                SocketAddr::new(config.host, port),
                config.data_dir.join(stage),
            )
        };
        let receiver = orderflow_receiver::bind(orderflow_receiver::Config::new(server(
            config.ports[0],
            orderflow_receiver::STAGE,
        )))
        .await
        .context("starting the receiver")?;
        let receiver_addr = receiver.local_addr();
        let stock = orderflow_stock::bind(orderflow_stock::Config::new(
            server(config.ports[1], orderflow_stock::STAGE),
            url(receiver_addr)?,
            config.catalog.clone(),
        ))
        .await
        .context("starting the stock checker")?;
        let stock_addr = stock.local_addr();
        let invoice = orderflow_invoice::bind(orderflow_invoice::Config::new(
            server(config.ports[2], orderflow_invoice::STAGE),
            url(stock_addr)?,
            config.tax_rate_bps,
        ))
        .await
        .context("starting the invoice creator")?;
        let invoice_addr = invoice.local_addr();
        let notifier = orderflow_notifier::bind(orderflow_notifier::Config::new(
            server(config.ports[3], orderflow_notifier::STAGE),
            url(invoice_addr)?,
        ))
        .await
        .context("starting the notifier")?;
        let notifier_addr = notifier.local_addr();
        let stages = [
            ("receiver", receiver),
            ("stock", stock),
            ("invoice", invoice),
            ("notifier", notifier),
        ]
        .into_iter()
        .map(|(name, stage)| (name, tokio::spawn(stage.serve(shutdown.clone()))))
        .collect();
        Ok(Pipeline {
            receiver: receiver_addr,
            stock: stock_addr,
            invoice: invoice_addr,
            notifier: notifier_addr,
            shutdown,
            stages,
        })
    }

    /// Drains every stage and waits for them to stop.
    pub async fn stop(self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        for (name, stage) in self.stages {
            stage
                .await
                .with_context(|| format!("the {name} stage panicked"))?
                .with_context(|| format!("the {name} stage failed"))?;
        }
        Ok(())
    }

    /// Resolves when any stage stops on its own (which only a failure makes it do).
    pub async fn any_stopped(&mut self) -> &'static str {
        loop {
            for (name, stage) in &self.stages {
                if stage.is_finished() {
                    return name;
                }
            }
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
    }
}
