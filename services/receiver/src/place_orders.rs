//! `PlaceOrders`: many orders on one stream, each placed exactly as `PlaceOrder` places it.
//!
//! Each request is its own trace (a root, like a separate `PlaceOrder` call's), with a span only
//! when the sampler keeps it (`OrderSpan::root`), and goes through
//! [`crate::place_order::place_order`]. A stream another replica forwards (`crate::forwarding`)
//! carries orders whose traces it decided not to sample: each is placed unsampled, and none is
//! forwarded again. Up to
//! [`MAX_IN_FLIGHT`] orders of one stream are placed at once, so they share the intake's group
//! commits; answers leave in the order of the requests. Per order, a stream costs the receiver less
//! than a call: no HTTP/2 stream, headers or call span of its own.

use std::{pin::Pin, sync::Arc};

use futures::{StreamExt, stream::FuturesOrdered};
use orderflow_proto::v1::{
    FieldViolation, OrderRefusal, PlaceOrderRequest, PlaceOrdersResponse, place_orders_response,
};
use orderflow_runtime::{status::NOT_STORED_REASON, telemetry};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Status, Streaming};
use tonic_types::StatusExt;

use crate::{Receiver, STAGE, http::code_name, place_order::place_order};

/// Orders of one stream being placed at once at most; beyond it the stream is not read.
pub(crate) const MAX_IN_FLIGHT: usize = 1024;

/// The answers of one `PlaceOrders` call.
pub(crate) type AnswerStream = ReceiverStream<Result<PlaceOrdersResponse, Status>>;

/// How long a caller whose stream the receiver stopped reading while shutting down is told to wait.
const DRAINING_RETRY_AFTER: std::time::Duration = std::time::Duration::from_secs(1);

/// Places every order read from `requests`, answering each in turn on the returned stream.
/// `forwarded_by`: the replica that forwarded the stream, whose orders are never forwarded again.
pub(crate) fn place_orders(
    receiver: Arc<Receiver>,
    requests: Streaming<PlaceOrderRequest>,
    forwarded_by: Option<String>,
) -> AnswerStream {
    let (answers, rx) = mpsc::channel(MAX_IN_FLIGHT);
    tokio::spawn(answer_all(
        receiver,
        requests,
        forwarded_by.map(Arc::from),
        answers,
    ));
    ReceiverStream::new(rx)
}

type Placing = Pin<Box<dyn Future<Output = PlaceOrdersResponse> + Send>>;

async fn answer_all(
    receiver: Arc<Receiver>,
    mut requests: Streaming<PlaceOrderRequest>,
    forwarded_by: Option<Arc<str>>,
    answers: mpsc::Sender<Result<PlaceOrdersResponse, Status>>,
) {
    let mut placing: FuturesOrdered<Placing> = FuturesOrdered::new();
    let mut index = 0u64;
    let mut reading = true;
    let mut ending = None;
    loop {
        tokio::select! {
            biased;
            Some(answer) = placing.next(), if !placing.is_empty() => {
                if answers.send(Ok(answer)).await.is_err() {
                    // The caller is gone; what was placed stays placed.
                    return;
                }
            }
            () = receiver.draining.cancelled(), if reading => {
                reading = false;
                ending = Some(draining(index));
            }
            next = requests.message(), if reading && placing.len() < MAX_IN_FLIGHT => match next {
                Ok(Some(request)) => {
                    placing.push_back(Box::pin(place_one(
                        receiver.clone(),
                        index,
                        request,
                        forwarded_by.clone(),
                    )));
                    index += 1;
                }
                Ok(None) => reading = false,
                Err(status) => {
                    // A malformed message ends the stream; the orders before it are answered.
                    reading = false;
                    ending = Some(status);
                }
            },
            else => break,
        }
    }
    if let Some(status) = ending {
        let _ = answers.send(Err(status)).await;
    }
}

/// `UNAVAILABLE` for a stream the receiver stopped reading after `read` orders, all answered:
/// the rest were not placed (`NOT_STORED`), and may be sent again.
fn draining(read: u64) -> Status {
    let mut details = tonic_types::ErrorDetails::new();
    details.set_retry_info(Some(DRAINING_RETRY_AFTER));
    details.set_error_info(NOT_STORED_REASON, "orderflow", []);
    Status::with_error_details(
        tonic::Code::Unavailable,
        format!(
            "the receiver is shutting down: the {read} orders read from this stream are answered; \
             send the rest again"
        ),
        details,
    )
}

/// Places request number `index` of a stream in its own order span: a root, decided by the
/// sampler before it is built, so that an unsampled order costs no span at all. An order another
/// replica forwarded is one whose trace it decided not to sample.
async fn place_one(
    receiver: Arc<Receiver>,
    index: u64,
    request: PlaceOrderRequest,
    forwarded_by: Option<Arc<str>>,
) -> PlaceOrdersResponse {
    let span = match forwarded_by {
        Some(_) => telemetry::OrderSpan::unsampled(),
        None => telemetry::OrderSpan::root(|| {
            tracing::info_span!(
                parent: None,
                "rpc",
                otel.name = "orderflow.v1.OrderReceiver/PlaceOrders order",
                otel.kind = "server",
                orderflow.stage = STAGE,
                order.id = tracing::field::Empty,
                customer.id = tracing::field::Empty,
                rpc.grpc.status_code = tracing::field::Empty,
            )
        }),
    };
    let result = span
        .run(place_order(&receiver, request, forwarded_by.as_deref()))
        .await;
    let result = match result {
        Ok(accepted) => {
            span.record("rpc.grpc.status_code", 0);
            place_orders_response::Result::Accepted(accepted)
        }
        Err(status) => {
            span.record("rpc.grpc.status_code", status.code() as i32);
            place_orders_response::Result::Refused(refusal(&status))
        }
    };
    PlaceOrdersResponse {
        index,
        result: Some(result),
    }
}

/// What `status` says, as an answer on the stream.
fn refusal(status: &Status) -> OrderRefusal {
    let field_violations = status
        .get_details_bad_request()
        .map(|bad| {
            bad.field_violations
                .into_iter()
                .map(|v| FieldViolation {
                    field: v.field,
                    description: v.description,
                })
                .collect()
        })
        .unwrap_or_default();
    let retry_after = status
        .get_details_retry_info()
        .and_then(|info| info.retry_delay)
        .and_then(|delay| prost_types::Duration::try_from(delay).ok());
    OrderRefusal {
        code: status.code() as i32,
        code_name: code_name(status.code()),
        message: status.message().to_owned(),
        field_violations,
        retry_after,
        reason: status
            .get_details_error_info()
            .map(|info| info.reason)
            .unwrap_or_default(),
    }
}

/// The status `refusal` stands for, its details included: what `PlaceOrder` would have answered.
pub(crate) fn status_of(refusal: OrderRefusal) -> Status {
    let mut details = tonic_types::ErrorDetails::new();
    if !refusal.field_violations.is_empty() {
        details.set_bad_request(
            refusal
                .field_violations
                .into_iter()
                .map(|v| tonic_types::FieldViolation::new(v.field, v.description))
                .collect::<Vec<_>>(),
        );
    }
    if let Some(after) = refusal
        .retry_after
        .and_then(|after| std::time::Duration::try_from(after).ok())
    {
        details.set_retry_info(Some(after));
    }
    if !refusal.reason.is_empty() {
        details.set_error_info(refusal.reason, "orderflow", []);
    }
    Status::with_error_details(
        tonic::Code::from_i32(refusal.code),
        refusal.message,
        details,
    )
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use orderflow_runtime::status::MAYBE_STORED_REASON;

    use super::*;

    /// A refusal on the stream says all that `PlaceOrder`'s status says: its code, message, field
    /// violations, retry hint and reason; and turned back into a status (as a forwarding replica
    /// does), it is that status again.
    #[test]
    fn a_refusal_carries_the_whole_status_and_back() {
        let mut details = tonic_types::ErrorDetails::new();
        details.add_bad_request_violation("lines[0].sku", "unknown");
        details.set_retry_info(Some(std::time::Duration::from_secs(2)));
        details.set_error_info(MAYBE_STORED_REASON, "orderflow", []);
        let status = Status::with_error_details(tonic::Code::Unavailable, "commit failed", details);
        let refused = refusal(&status);
        assert_eq!(refused.code, tonic::Code::Unavailable as i32);
        assert_eq!(refused.code_name, "UNAVAILABLE");
        assert_eq!(refused.reason, MAYBE_STORED_REASON);
        assert_eq!(refused.field_violations[0].field, "lines[0].sku");
        let again = status_of(refused);
        assert_eq!(again.code(), tonic::Code::Unavailable);
        assert_eq!(again.message(), "commit failed");
        assert_eq!(
            again.get_details_error_info().unwrap().reason,
            MAYBE_STORED_REASON
        );
        assert_eq!(
            again.get_details_retry_info().unwrap().retry_delay,
            Some(std::time::Duration::from_secs(2))
        );
        assert_eq!(
            again.get_details_bad_request().unwrap().field_violations[0].description,
            "unknown"
        );
        // A refusal without a reason has none.
        assert_eq!(refusal(&Status::invalid_argument("bad")).reason, "");
        assert!(
            status_of(refusal(&Status::invalid_argument("bad")))
                .get_details_error_info()
                .is_none()
        );
    }
}
