//! `SetFaults`, `GetFaults` and `ListCaptures`: the simulated gateway's controls and ledger.

use std::time::Duration;

use orderflow_proto::v1::{
    GatewayFaults, ListCapturesRequest, ListCapturesResponse, SetFaultsRequest,
};
use orderflow_runtime::{FieldViolations, NumericPage, StoreError, paging};
use tonic::Status;

use crate::gateway::{CAPTURES, CAPTURES_NAME, Faults, MAX_LATENCY, SimulatedGateway};

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

pub(crate) async fn list_captures(
    gateway: &SimulatedGateway,
    request: ListCapturesRequest,
) -> Result<ListCapturesResponse, Status> {
    let page = NumericPage::parse(request.page_size, &request.page_token)?;
    gateway
        .ledger_store()
        .call(move |store| {
            store.read(|read| {
                let (captures, next_page_token) =
                    paging::read_numeric_page(read, CAPTURES, CAPTURES_NAME, page)?;
                Ok::<_, StoreError>(ListCapturesResponse {
                    captures,
                    next_page_token,
                })
            })
        })
        .await
}
