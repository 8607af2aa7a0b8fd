//! `PlaceOrder`: validate, check the backlog, stamp, make durable (or find the order an earlier call
//! with the same idempotency key made), answer.

use std::time::{Duration, Instant};

use orderflow_proto::v1::{
    Event, Order, OrderPlaced, OrderStatus, OrderTransition, PlaceOrderRequest, PlaceOrderResponse,
    event,
};
use orderflow_runtime::{metrics as names, telemetry};
use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

use crate::{
    Home, Receiver, STAGE,
    intake::{NewOrder, request_hash, scoped_key},
    validate::validate,
};

/// How long a caller refused for backlog is told to wait before retrying.
const BACKLOG_RETRY_AFTER: Duration = Duration::from_secs(1);

/// Places `request` in its home partition: here if this replica owns it, else at the replica
/// that does. `forwarded_by`: the replica that forwarded this call, which is never forwarded again.
pub(crate) async fn place_order(
    receiver: &Receiver,
    request: PlaceOrderRequest,
    forwarded_by: Option<&str>,
) -> Result<PlaceOrderResponse, Status> {
    let started = Instant::now();
    let result = match validate(&request) {
        Err(status) => Err(status),
        Ok(()) => {
            let partition = receiver.home_of(request.customer_id.trim());
            match receiver.home(partition) {
                Some(home) => place(receiver, home, request).await,
                // The replica that owns the partition counts the order.
                None => {
                    let peers = orderflow_runtime::forward_to(
                        receiver.peers.as_ref(),
                        partition,
                        forwarded_by,
                    )?;
                    return peers.place(partition, request).await;
                }
            }
        }
    };
    match &result {
        Ok(_) => names::observe(
            names::PLACE_ORDER_SECONDS,
            [("stage", STAGE)],
            started.elapsed().as_secs_f64(),
        ),
        Err(status) => metrics::counter!(
            names::ORDERS_REFUSED,
            "stage" => STAGE,
            "code" => format!("{:?}", status.code())
        )
        .increment(1),
    }
    result
}

async fn place(
    receiver: &Receiver,
    home: &Home,
    request: PlaceOrderRequest,
) -> Result<PlaceOrderResponse, Status> {
    let backlog = home.store.outbox().unconsumed();
    if backlog >= receiver.max_backlog {
        return Err(backlog_full(backlog, receiver.max_backlog));
    }
    if receiver.free_space.is_low() {
        return Err(volume_low(&receiver.free_space));
    }
    let span = telemetry::current_order_span();
    let order_id =
        orderflow_runtime::order_id(uuid::Uuid::now_v7().to_string(), home.store.partition());
    let placed_at = orderflow_runtime::now_timestamp();
    let customer_id = request.customer_id.trim().to_owned();
    span.record("order.id", order_id.as_str());
    span.record("customer.id", customer_id.as_str());
    let idempotency = (!request.idempotency_key.is_empty()).then(|| {
        (
            scoped_key(&customer_id, &request.idempotency_key),
            request_hash(&request),
        )
    });
    let order = Order {
        order_id: order_id.clone(),
        customer_id: customer_id.clone(),
        lines: request.lines.clone(),
        placed_at: Some(placed_at),
        status: OrderStatus::Accepted.into(),
        transitions: vec![OrderTransition {
            status: OrderStatus::Accepted.into(),
            at: Some(placed_at),
            stage: STAGE.into(),
        }],
        ..Default::default()
    };
    let event = Event {
        order_id: order_id.clone(),
        customer_id,
        at: Some(placed_at),
        placed_at: Some(placed_at),
        trace_context: telemetry::current_context(),
        kind: Some(event::Kind::OrderPlaced(OrderPlaced {
            lines: request.lines,
        })),
    };
    let accepted = home
        .intake
        .submit(NewOrder {
            order,
            event,
            idempotency,
        })
        .await?;
    if accepted.replayed {
        span.record("order.id", accepted.order_id.as_str());
        tracing::debug!(order_id = %accepted.order_id, "idempotent retry answered with the first order");
    } else {
        names::count(
            names::EVENTS_PROCESSED,
            [("stage", STAGE), ("outcome", "accepted")],
            1,
        );
        tracing::debug!(order_id = %accepted.order_id, offset = accepted.offset, "order accepted");
    }
    Ok(PlaceOrderResponse {
        order_id: accepted.order_id,
        status: OrderStatus::Accepted.into(),
        offset: accepted.offset,
        replayed: accepted.replayed,
    })
}

/// Why a `RESOURCE_EXHAUSTED` says the data volume is low (`google.rpc.ErrorInfo` reason), so
/// that the HTTP door can answer 507 rather than 429.
pub(crate) const VOLUME_LOW_REASON: &str = "DATA_VOLUME_LOW";

/// How long a caller refused for lack of free space is told to wait.
const VOLUME_LOW_RETRY_AFTER: Duration = Duration::from_secs(5);

/// RESOURCE_EXHAUSTED with a google.rpc.RetryInfo and an ErrorInfo naming the reason.
fn volume_low(space: &orderflow_runtime::FreeSpace) -> Status {
    let mut details = ErrorDetails::new();
    details.set_retry_info(Some(VOLUME_LOW_RETRY_AFTER));
    details.set_error_info(
        VOLUME_LOW_REASON,
        "orderflow",
        [("free_bytes".to_owned(), space.free_bytes().to_string())],
    );
    Status::with_error_details(
        Code::ResourceExhausted,
        format!(
            "the receiver's data volume is low on space ({} bytes free, floor {:?}, --min-free-space): new orders wait so that the pipeline can drain what it accepted; retry in {} s",
            space.free_bytes(),
            space.floor(),
            VOLUME_LOW_RETRY_AFTER.as_secs()
        ),
        details,
    )
}

/// RESOURCE_EXHAUSTED with a google.rpc.RetryInfo.
fn backlog_full(backlog: u64, max: u64) -> Status {
    let mut details = ErrorDetails::new();
    details.set_retry_info(Some(BACKLOG_RETRY_AFTER));
    Status::with_error_details(
        Code::ResourceExhausted,
        format!(
            "the pipeline is behind: {backlog} accepted orders are not consumed yet (limit {max}, --max-backlog); retry in {} s",
            BACKLOG_RETRY_AFTER.as_secs()
        ),
        details,
    )
}
