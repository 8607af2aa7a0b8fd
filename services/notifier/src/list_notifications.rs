//! `ListNotifications`: every delivered notification by id, or those of one order.

use orderflow_proto::v1::{ListNotificationsRequest, ListNotificationsResponse};
use orderflow_runtime::{NumericPage, Store, StoreError, decode_record, paging, status};
use tonic::Status;

use crate::tables::{BY_ORDER, NOTIFICATIONS, NOTIFICATIONS_NAME};

pub(crate) async fn list_notifications(
    store: &Store,
    request: ListNotificationsRequest,
) -> Result<ListNotificationsResponse, Status> {
    let page = NumericPage::parse(request.page_size, &request.page_token)?;
    let order_id = request.order_id;
    if !order_id.is_empty() {
        let mut violations = orderflow_runtime::FieldViolations::new();
        violations.check_identifier("order_id", &order_id, status::MAX_ORDER_ID_CHARS);
        violations.check()?;
    }
    store
        .call(move |store| {
            store.read(|read| {
                if order_id.is_empty() {
                    let (notifications, next_page_token) =
                        paging::read_numeric_page(read, NOTIFICATIONS, NOTIFICATIONS_NAME, page)?;
                    return Ok(ListNotificationsResponse {
                        notifications,
                        next_page_token,
                    });
                }
                let mut notifications = Vec::new();
                if let Some(id) = read.open_table(BY_ORDER)?.get(order_id.as_str())? {
                    let id = id.value();
                    if let Some(bytes) = read.open_table(NOTIFICATIONS)?.get(id)? {
                        notifications.push(decode_record(NOTIFICATIONS_NAME, id, bytes.value())?);
                    }
                }
                Ok::<_, StoreError>(ListNotificationsResponse {
                    notifications,
                    next_page_token: String::new(),
                })
            })
        })
        .await
}
