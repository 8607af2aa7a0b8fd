//! `SetFaults`, `GetFaults` and `ListCaptures`: the simulated gateway's controls and ledger.

use std::time::Duration;

use futures::FutureExt;
use orderflow_proto::v1::{
    Capture, GatewayFaults, GatewayStats, ListCapturesRequest, ListCapturesResponse,
    SetFaultsRequest, invoice_creator_client::InvoiceCreatorClient,
};
use orderflow_runtime::{FieldViolations, NumericPage, PartitionedPage, Peers, paging};
use tonic::Status;

use crate::{
    STAGE,
    gateway::{CAPTURES, CAPTURES_NAME, Faults, MAX_LATENCY, SimulatedGateway},
};

pub(crate) fn get_faults(gateway: &SimulatedGateway) -> GatewayFaults {
    let faults = gateway.faults();
    GatewayFaults {
        gateway: "simulated".into(),
        latency: prost_types::Duration::try_from(faults.latency).ok(),
        transient_failure_rate: faults.transient_failure_rate,
        decline_rate: faults.decline_rate,
        stats: Some(gateway.stats()),
    }
}

/// Changes the fields that are set, all or nothing.
pub(crate) fn set_faults(
    gateway: &SimulatedGateway,
    request: SetFaultsRequest,
) -> Result<GatewayFaults, Status> {
    let mut faults = gateway.faults();
    let mut violations = FieldViolations::new();
    if let Some(latency) = request.latency {
        match Duration::try_from(latency) {
            Ok(latency) if latency <= MAX_LATENCY => faults.latency = latency,
            _ => violations.add(
                "latency",
                format!("must be 0 to {} s", MAX_LATENCY.as_secs()),
            ),
        }
    }
    for (field, value, target) in [
        (
            "transient_failure_rate",
            request.transient_failure_rate,
            &mut faults.transient_failure_rate,
        ),
        (
            "decline_rate",
            request.decline_rate,
            &mut faults.decline_rate,
        ),
    ] {
        if let Some(rate) = value {
            if (0.0..=1.0).contains(&rate) {
                *target = rate;
            } else {
                violations.add(field, "must be 0.0 to 1.0");
            }
        }
    }
    violations.check()?;
    gateway.set_faults(faults);
    tracing::info!(
        latency_ms = faults.latency.as_millis() as u64,
        transient_failure_rate = faults.transient_failure_rate,
        decline_rate = faults.decline_rate,
        "gateway faults changed"
    );
    Ok(get_faults(gateway))
}

/// Flag value of a probability (a failure or decline rate): a number from 0.0 to 1.0.
pub fn parse_probability(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(rate) if (0.0..=1.0).contains(&rate) => Ok(rate),
        _ => Err("expected a number from 0.0 to 1.0".into()),
    }
}

/// Flag value of the latency: a duration up to a minute.
pub fn parse_latency(s: &str) -> Result<Duration, String> {
    let latency = humantime::parse_duration(s).map_err(|e| e.to_string())?;
    if latency > MAX_LATENCY {
        return Err(format!("must be at most {} s", MAX_LATENCY.as_secs()));
    }
    Ok(latency)
}

pub(crate) fn faults_from_flags(latency: Duration, transient: f64, decline: f64) -> Faults {
    Faults {
        latency,
        transient_failure_rate: transient,
        decline_rate: decline,
    }
}

/// Adds another replica's gateway counters to `faults`.
pub(crate) fn add_stats(faults: &mut GatewayFaults, theirs: GatewayStats) {
    let ours = faults.stats.get_or_insert_default();
    ours.requests += theirs.requests;
    ours.captures += theirs.captures;
    ours.declines += theirs.declines;
    ours.unreachable += theirs.unreachable;
    ours.timeouts_after_capture += theirs.timeouts_after_capture;
    ours.idempotent_replays += theirs.idempotent_replays;
    ours.voids += theirs.voids;
}

/// `ListCaptures`: this replica's ledger, then (unless the call was `forwarded` here) every other
/// replica's, in replica order; a page token names the replica and the sequence it starts at.
pub(crate) async fn list_captures(
    gateway: &SimulatedGateway,
    peers: Option<&Peers>,
    forwarded: bool,
    request: ListCapturesRequest,
) -> Result<ListCapturesResponse, Status> {
    let (replicas, me) = peers.map_or((1, 0), |peers| (peers.replicas(), peers.me()));
    let page = PartitionedPage::parse(request.page_size, &request.page_token, replicas)?;
    let end = if forwarded {
        page.partition.saturating_add(1)
    } else {
        replicas
    };
    let (captures, next_page_token) = paging::gather(
        page,
        replicas,
        end,
        |replica, within: NumericPage| match peers.filter(|_| replica != me) {
            None if replica == me => read_captures(gateway, within).boxed(),
            None => futures::future::ready(Err(Status::failed_precondition(format!(
                "this call was forwarded here for the ledger of replica {replica}, and this \
                     is replica {me}: check that --peers lists every replica in replica order"
            ))))
            .boxed(),
            Some(peers) => async move {
                let channel = peers.channel(replica).ok_or_else(|| {
                    Status::failed_precondition(format!("--peers names no replica {replica}"))
                })?;
                let theirs = InvoiceCreatorClient::new(channel)
                    .list_captures(peers.forwarded(
                        ListCapturesRequest {
                            page_size: u32::try_from(within.size).unwrap_or(paging::MAX_PAGE_SIZE),
                            page_token: paging::partitioned_token(replicas, replica, within.start),
                        },
                        None,
                    ))
                    .await
                    .map_err(|status| peers.failed(STAGE, replica, "a ledger", status))?
                    .into_inner();
                let next = match theirs.next_page_token.as_str() {
                    "" => None,
                    token => Some(PartitionedPage::parse(0, token, replicas)?.start),
                };
                Ok((theirs.captures, next))
            }
            .boxed(),
        },
    )
    .await?;
    Ok(ListCapturesResponse {
        captures,
        next_page_token,
    })
}

/// A page of this replica's ledger, and the sequence the next one starts at.
async fn read_captures(
    gateway: &SimulatedGateway,
    page: NumericPage,
) -> Result<(Vec<Capture>, Option<u64>), Status> {
    let (captures, next) = gateway
        .ledger_store()
        .call(move |store| {
            store.read(|read| paging::read_numeric_page(read, CAPTURES, CAPTURES_NAME, page))
        })
        .await?;
    Ok((captures, paging::next_start(&next)?))
}
