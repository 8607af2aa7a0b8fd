//! `orderflow faults show|set`: the simulated payment gateway's faults, changed without a restart.

use std::time::Duration;

use clap::Subcommand;
use orderflow_proto::v1::{
    GatewayFaults, GetFaultsRequest, SetFaultsRequest, invoice_creator_client::InvoiceCreatorClient,
};

use crate::client::{Connect, Stage, refused};

#[derive(Subcommand, Debug)]
pub enum FaultsCommand {
    /// The gateway's faults and what it has seen
    Show,
    /// Change faults now (admin); flags left out keep their value
    Set {
        /// Latency added to every capture, e.g. 50ms
        #[arg(long, value_parser = orderflow_invoice::parse_latency)]
        latency: Option<Duration>,
        /// Share of captures failing transiently, 0.0 to 1.0
        #[arg(long, value_parser = orderflow_invoice::parse_probability)]
        transient_failure_rate: Option<f64>,
        /// Share of captures declined, 0.0 to 1.0
        #[arg(long, value_parser = orderflow_invoice::parse_probability)]
        decline_rate: Option<f64>,
    },
}

pub async fn run(connect: &Connect, command: FaultsCommand) -> anyhow::Result<()> {
    let mut client = InvoiceCreatorClient::new(connect.channel(Stage::Invoice).await?);
    let faults = match command {
        FaultsCommand::Show => client
            .get_faults(GetFaultsRequest {})
            .await
            .map_err(|s| refused("GetFaults", s))?
            .into_inner(),
        FaultsCommand::Set {
            latency,
            transient_failure_rate,
            decline_rate,
        } => {
            let request = connect.admin(SetFaultsRequest {
                latency: latency.and_then(|l| prost_types::Duration::try_from(l).ok()),
                transient_failure_rate,
                decline_rate,
            })?;
            client
                .set_faults(request)
                .await
                .map_err(|s| refused("SetFaults", s))?
                .into_inner()
        }
    };
    print(&faults);
    Ok(())
}

fn print(faults: &GatewayFaults) {
    let latency = faults
        .latency
        .and_then(|d| Duration::try_from(d).ok())
        .unwrap_or_default();
    println!("gateway                 {}", faults.gateway);
    println!(
        "latency                 {}",
        humantime::format_duration(latency)
    );
    println!("transient failure rate  {}", faults.transient_failure_rate);
    println!("decline rate            {}", faults.decline_rate);
    if let Some(s) = &faults.stats {
        println!(
            "seen                    {} requests: {} captures, {} declines, {} unreachable, {} timeouts after capture, {} idempotent replays",
            s.requests,
            s.captures,
            s.declines,
            s.unreachable,
            s.timeouts_after_capture,
            s.idempotent_replays
        );
    }
}
