//! `PlaceOrder`: validate, stamp, make durable, answer.

use orderflow_proto::v1::{
    Event, Order, OrderPlaced, OrderStatus, PlaceOrderRequest, PlaceOrderResponse, event,
};
use tonic::Status;

use crate::{intake::Intake, validate::validate};

pub(crate) async fn place_order(
    intake: &Intake,
    request: PlaceOrderRequest,
) -> Result<PlaceOrderResponse, Status> {
    validate(&request)?;
    let order_id = uuid::Uuid::now_v7().to_string();
    let placed_at = orderflow_runtime::now_timestamp();
    let customer_id = request.customer_id.trim().to_owned();
    let order = Order {
        order_id: order_id.clone(),
        customer_id: customer_id.clone(),
        lines: request.lines.clone(),
        placed_at: Some(placed_at),
        status: OrderStatus::Accepted.into(),
        offset: 0,
    };
    let event = Event {
        order_id: order_id.clone(),
        customer_id,
        at: Some(placed_at),
        placed_at: Some(placed_at),
        trace_context: Default::default(),
        kind: Some(event::Kind::OrderPlaced(OrderPlaced {
            lines: request.lines,
        })),
    };
    let offset = intake.submit(order, event).await?;
    tracing::debug!(order_id = %order_id, offset, "order accepted");
    Ok(PlaceOrderResponse {
        order_id,
        status: OrderStatus::Accepted.into(),
        offset,
    })
}
