//! The four stages in one process, wired to each other over loopback gRPC exactly as separate
//! processes would be: stock reads the receiver's and the invoice stage's logs, invoice reads stock's,
//! the notifier reads invoice's, and the receiver follows all three for order progress.

use std::{
    net::{IpAddr, SocketAddr},
    path::PathBuf,
};

use anyhow::Context;
use orderflow_invoice::{GatewayArgs, PaymentRetryArgs};
use orderflow_notifier::{DeliveryRetryArgs, SinkArgs};
use orderflow_runtime::{
    ConsumerNames, OptionalAddr, ServeError, ServerArgs, UpstreamArgs, UpstreamUrl,
};
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
    pub gateway: GatewayArgs,
    pub payment_retry: PaymentRetryArgs,
    pub sink: SinkArgs,
    pub delivery_retry: DeliveryRetryArgs,
    /// Metrics of all four stages on one address.
    pub metrics: Option<SocketAddr>,
    /// The receiver's HTTP/JSON door.
    pub http: Option<SocketAddr>,
    /// Consumers every stage's log is kept for besides the stages that read it (the demo's
    /// watchers).
    pub also_retain_for: Vec<String>,
}

/// A running in-process pipeline.
pub struct Pipeline {
    pub receiver: SocketAddr,
    pub stock: SocketAddr,
    pub invoice: SocketAddr,
    pub notifier: SocketAddr,
    /// Other addresses served (metrics, HTTP door), as `(what, address)`.
    pub announced: Vec<(&'static str, String)>,
    shutdown: CancellationToken,
    stages: Vec<(&'static str, JoinHandle<Result<(), ServeError>>)>,
}

fn url(addr: SocketAddr) -> anyhow::Result<UpstreamUrl> {
    format!("http://{addr}")
        .parse()
        .map_err(|e: String| anyhow::anyhow!(e))
}

/// The four stages' addresses: the given ports, or free ones found by binding and releasing them.
fn addresses(host: IpAddr, ports: [u16; 4]) -> anyhow::Result<[SocketAddr; 4]> {
    let mut held = Vec::new();
    let mut out = [SocketAddr::new(host, 0); 4];
    for (addr, port) in out.iter_mut().zip(ports) {
        *addr = if port == 0 {
            let probe = std::net::TcpListener::bind((host, 0)).context("finding a free port")?;
            let found = probe.local_addr()?;
            held.push(probe);
            found
        } else {
            SocketAddr::new(host, port)
        };
    }
    Ok(out)
}

impl Pipeline {
    /// Binds all four stages and starts serving; returns once every socket is bound and every store
    /// open.
    pub async fn start(config: PipelineConfig) -> anyhow::Result<Self> {
        let shutdown = CancellationToken::new();
        let [receiver_addr, stock_addr, invoice_addr, notifier_addr] =
            addresses(config.host, config.ports)?;
        let server = |addr: SocketAddr, stage: &str, consumers: &[&str]| {
            let mut args = ServerArgs::new(addr, config.data_dir.join(stage));
            if !config.also_retain_for.is_empty() {
                let mut names: Vec<String> = consumers.iter().map(|c| (*c).to_owned()).collect();
                names.extend(config.also_retain_for.iter().cloned());
                args.retain_for = Some(ConsumerNames(names));
            }
            args
        };
        let mut receiver_args = server(
            receiver_addr,
            orderflow_receiver::STAGE,
            orderflow_receiver::CONSUMERS,
        );
        receiver_args.metrics_listen = OptionalAddr(config.metrics);
        let mut receiver_config = orderflow_receiver::Config::new(receiver_args).following(
            url(stock_addr)?,
            url(invoice_addr)?,
            url(notifier_addr)?,
        );
        receiver_config.http_listen = OptionalAddr(config.http);
        let receiver = orderflow_receiver::bind(receiver_config)
            .await
            .context("starting the receiver")?;
        let stock = orderflow_stock::bind(orderflow_stock::Config::new(
            server(
                stock_addr,
                orderflow_stock::STAGE,
                orderflow_stock::CONSUMERS,
            ),
            UpstreamArgs {
                upstream: url(receiver_addr)?,
            },
            config.catalog.clone(),
            url(invoice_addr)?,
        ))
        .await
        .context("starting the stock checker")?;
        let mut invoice_config = orderflow_invoice::Config::new(
            server(
                invoice_addr,
                orderflow_invoice::STAGE,
                orderflow_invoice::CONSUMERS,
            ),
            UpstreamArgs {
                upstream: url(stock_addr)?,
            },
            config.tax_rate_bps,
        );
        invoice_config.gateway = config.gateway.clone();
        invoice_config.retry = config.payment_retry.clone();
        let invoice = orderflow_invoice::bind(invoice_config)
            .await
            .context("starting the invoice creator")?;
        let mut notifier_config = orderflow_notifier::Config::new(
            server(
                notifier_addr,
                orderflow_notifier::STAGE,
                orderflow_notifier::CONSUMERS,
            ),
            UpstreamArgs {
                upstream: url(invoice_addr)?,
            },
        );
        notifier_config.sink = config.sink.clone();
        notifier_config.retry = config.delivery_retry.clone();
        let notifier = orderflow_notifier::bind(notifier_config)
            .await
            .context("starting the notifier")?;
        let announced = receiver.announced().to_vec();
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
            announced,
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
