//! `PlaceOrders`: many orders on one stream, each placed exactly as `PlaceOrder` places it.
//!
//! Each request is its own trace (a root, like a separate `PlaceOrder` call's), with a span only
//! when the sampler keeps it (`OrderSpan::root`), and goes through
//! [`crate::place_order::place_order`]. Up to
//! [`MAX_IN_FLIGHT`] orders of one stream are placed at once, so they share the intake's group
//! commits; answers leave in the order of the requests. Per order, a stream costs the receiver less
//! than a call: no HTTP/2 stream, headers or call span of its own.

use std::{pin::Pin, sync::Arc};

use futures::{StreamExt, stream::FuturesOrdered};
use orderflow_proto::v1::{
    FieldViolation, OrderRefusal, PlaceOrderRequest, PlaceOrdersResponse, place_orders_response,
};
use orderflow_runtime::telemetry;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Status, Streaming};
use tonic_types::StatusExt;

use crate::{Receiver, STAGE, http::code_name, place_order::place_order};

/// Orders of one stream being placed at once at most; beyond it the stream is not read.
pub(crate) const MAX_IN_FLIGHT: usize = 1024;

/// The answers of one `PlaceOrders` call.
pub(crate) type AnswerStream = ReceiverStream<Result<PlaceOrdersResponse, Status>>;

/// Places every order read from `requests`, answering each in turn on the returned stream.
pub(crate) fn place_orders(
    receiver: Arc<Receiver>,
    requests: Streaming<PlaceOrderRequest>,
) -> AnswerStream {
    let (answers, rx) = mpsc::channel(MAX_IN_FLIGHT);
    tokio::spawn(answer_all(receiver, requests, answers));
    ReceiverStream::new(rx)
}

type Placing = Pin<Box<dyn Future<Output = PlaceOrdersResponse> + Send>>;

async fn answer_all(
    receiver: Arc<Receiver>,
    mut requests: Streaming<PlaceOrderRequest>,
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
                ending = Some(Status::unavailable(format!(
                    "the receiver is shutting down: the {index} orders read from this stream are answered; send the rest again"
                )));
            }
            next = requests.message(), if reading && placing.len() < MAX_IN_FLIGHT => match next {
                Ok(Some(request)) => {
                    placing.push_back(Box::pin(place_one(receiver.clone(), index, request)));
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

/// Places request number `index` of a stream in its own order span: a root, decided by the
/// sampler before it is built, so that an unsampled order costs no span at all.
async fn place_one(
    receiver: Arc<Receiver>,
    index: u64,
    request: PlaceOrderRequest,
) -> PlaceOrdersResponse {
    let span = telemetry::OrderSpan::root(|| {
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
    });
    let result = span.run(place_order(&receiver, request, None)).await;
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
    }
}
