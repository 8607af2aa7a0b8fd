//! `ListNotifications`: every notification by id, or those of one order.

use orderflow_proto::v1::{ListNotificationsRequest, ListNotificationsResponse, Notification};
use orderflow_runtime::{NumericPage, PageFill, Store, StoreError, decode_record};
use tonic::Status;

use crate::notifying::{BY_ORDER, NOTIFICATIONS, NOTIFICATIONS_NAME};

pub(crate) async fn list_notifications(
    store: &Store,
    request: ListNotificationsRequest,
) -> Result<ListNotificationsResponse, Status> {
    let page = NumericPage::parse(request.page_size, &request.page_token)?;
    let order_id = request.order_id;
    store
        .call(move |store| {
            store.read(|read| {
                let table = read.open_table(NOTIFICATIONS)?;
                let mut notifications: Vec<Notification> = Vec::new();
                let mut next_page_token = String::new();
                if !order_id.is_empty() {
                    if let Some(id) = read.open_table(BY_ORDER)?.get(order_id.as_str())? {
                        let id = id.value();
                        if let Some(bytes) = table.get(id)? {
                            notifications.push(decode_record(
                                NOTIFICATIONS_NAME,
                                id,
                                bytes.value(),
                            )?);
                        }
                    }
                } else {
                    let mut fill = PageFill::new(page.size);
                    for row in table.range(page.start..)? {
                        let (id, bytes) = row?;
                        if !fill.admit(bytes.value().len()) {
                            next_page_token = id.value().to_string();
                            break;
                        }
                        notifications.push(decode_record(
                            NOTIFICATIONS_NAME,
                            id.value(),
                            bytes.value(),
                        )?);
                    }
                }
                Ok::<_, StoreError>(ListNotificationsResponse {
                    notifications,
                    next_page_token,
                })
            })
        })
        .await
}
