//! `orderflow`: the whole pipeline in one process for local use (`demo`, `up`), and a small client
//! (`place`).

mod demo;
mod pipeline;
mod place;

use std::{net::IpAddr, path::PathBuf, time::Duration};

use clap::{Parser, Subcommand};
use orderflow_proto::v1::OrderLine;
use orderflow_stock::CatalogSource;

use crate::pipeline::{Pipeline, PipelineConfig};

#[derive(Parser, Debug)]
#[command(
    name = "orderflow",
    version,
    about = "orderflow: an order pipeline of four gRPC stages"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the four stages in this process and let simulated customers order; prints every step and
    /// a report
    Demo {
        /// Data directory (default: a fresh temporary directory, removed at the end)
        #[arg(long, env = "ORDERFLOW_DATA_DIR")]
        data_dir: Option<PathBuf>,
        /// Simulated customers ordering concurrently
        #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u64).range(1..=10_000))]
        customers: u64,
        /// Stop after this many orders (instead of --duration)
        #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
        orders: Option<u64>,
        /// How long customers keep ordering
        #[arg(long, default_value = "18s", value_parser = humantime::parse_duration)]
        duration: Duration,
        /// Orders per second, all customers together
        #[arg(long, default_value_t = 8.0, value_parser = parse_rate)]
        rate: f64,
        /// Tax rate in basis points on every invoice
        #[arg(long, default_value_t = 2000, value_parser = clap::value_parser!(u32).range(0..=10_000))]
        tax_rate_bps: u32,
    },
    /// Run the four stages in this process on their default ports and wait (for grpcurl)
    Up {
        /// Data directory, kept between runs
        #[arg(long, env = "ORDERFLOW_DATA_DIR", default_value = "orderflow-data")]
        data_dir: PathBuf,
        /// Address the four stages listen on
        #[arg(long, default_value = "127.0.0.1")]
        host: IpAddr,
        /// Initial catalog: a TOML or JSON file, `demo` or `none`
        #[arg(long, env = "ORDERFLOW_CATALOG", default_value = "demo")]
        catalog: CatalogSource,
        /// Tax rate in basis points on every invoice
        #[arg(long, env = "ORDERFLOW_TAX_RATE_BPS", default_value_t = 0, value_parser = clap::value_parser!(u32).range(0..=10_000))]
        tax_rate_bps: u32,
    },
    /// Place one order and print its id
    Place {
        /// Receiver URL
        #[arg(
            long,
            env = "ORDERFLOW_RECEIVER",
            default_value = "http://127.0.0.1:50051"
        )]
        receiver: String,
        /// Customer id
        #[arg(long)]
        customer: String,
        /// An order line, SKU=QTY; repeat for more lines
        #[arg(long = "line", required = true, value_parser = place::parse_line)]
        lines: Vec<OrderLine>,
    },
}

fn parse_rate(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(rate) if rate > 0.0 && rate.is_finite() => Ok(rate),
        _ => Err("expected a positive number of orders per second".into()),
    }
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    match run(Cli::parse()).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // The cause chain, one line: users want the reason, not a backtrace.
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Demo {
            data_dir,
            customers,
            orders,
            duration,
            rate,
            tax_rate_bps,
        } => {
            // Stage logs would drown the demo's own lines: warnings only unless RUST_LOG says more.
            orderflow_runtime::telemetry::init_logging_with_default("warn");
            let temp = tempfile::tempdir()?;
            let data_dir = data_dir.unwrap_or_else(|| temp.path().to_owned());
            demo::run(demo::DemoConfig {
                pipeline: PipelineConfig {
                    data_dir,
                    host: IpAddr::from([127, 0, 0, 1]),
                    ports: [0; 4],
                    catalog: CatalogSource::Demo,
                    tax_rate_bps,
                },
                customers: customers as usize,
                orders,
                duration,
                rate,
            })
            .await
        }
        Command::Up {
            data_dir,
            host,
            catalog,
            tax_rate_bps,
        } => {
            orderflow_runtime::telemetry::init_logging();
            let shutdown = orderflow_runtime::shutdown_on_signal();
            let mut pipeline = Pipeline::start(PipelineConfig {
                data_dir: data_dir.clone(),
                host,
                ports: [
                    orderflow_receiver::DEFAULT_PORT,
                    orderflow_stock::DEFAULT_PORT,
                    orderflow_invoice::DEFAULT_PORT,
                    orderflow_notifier::DEFAULT_PORT,
                ],
                catalog,
                tax_rate_bps,
            })
            .await?;
            println!(
                "orderflow is up (data in {}); Ctrl-C to stop",
                data_dir.display()
            );
            println!("  receiver  {}", pipeline.receiver);
            println!("  stock     {}", pipeline.stock);
            println!("  invoice   {}", pipeline.invoice);
            println!("  notifier  {}", pipeline.notifier);
            println!("try: orderflow place --customer alice --line KB-01=1");
            tokio::select! {
                () = shutdown.cancelled() => {}
                stage = pipeline.any_stopped() => anyhow::bail!("the {stage} stage stopped unexpectedly"),
            }
            pipeline.stop().await
        }
        Command::Place {
            receiver,
            customer,
            lines,
        } => place::place(receiver, customer, lines).await,
    }
}
