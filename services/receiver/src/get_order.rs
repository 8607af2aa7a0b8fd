//! `GetOrder`: the order as the receiver accepted it.

use orderflow_proto::v1::{GetOrderRequest, GetOrderResponse, Order};
use orderflow_runtime::{FieldViolations, Store, StoreError};
use prost::Message;
use tonic::Status;

use crate::intake::ORDERS;

pub(crate) async fn get_order(
    store: &Store,
    request: GetOrderRequest,
) -> Result<GetOrderResponse, Status> {
    let mut violations = FieldViolations::new();
    if request.order_id.is_empty() {
        violations.add("order_id", "required");
    }
    violations.check()?;
    let store = store.clone();
    let id = request.order_id.clone();
    let bytes = tokio::task::spawn_blocking(move || {
        store.read(|read| {
            let orders = match read.open_table(ORDERS) {
                Ok(orders) => orders,
                // No order was ever written.
                Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
                Err(e) => return Err(StoreError::Storage(e.into())),
            };
            let row = orders
                .get(id.as_str())
                .map_err(|e| StoreError::Storage(e.into()))?;
            Ok::<_, StoreError>(row.map(|v| v.value().to_vec()))
        })
    })
    .await
    .map_err(|_| Status::internal("internal error"))??;
    let Some(bytes) = bytes else {
        return Err(Status::not_found(format!(
            "no order with id {}",
            request.order_id
        )));
    };
    let order = Order::decode(bytes.as_slice()).map_err(|e| {
        tracing::error!(order_id = %request.order_id, error = %e, "stored order cannot be decoded");
        Status::internal("internal storage error")
    })?;
    Ok(GetOrderResponse { order: Some(order) })
}
