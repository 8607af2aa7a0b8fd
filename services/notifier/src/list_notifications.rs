//! `ListNotifications` in one partition: every delivered notification by id, or those of one order.

use orderflow_proto::v1::Notification;
use orderflow_runtime::{NumericPage, Store, StoreError, decode_record, paging};
use tonic::Status;

use crate::tables::{BY_ORDER, NOTIFICATIONS, NOTIFICATIONS_NAME};

/// A page of the notifications of `store`'s partition by id, and the id the next page starts at
/// (`None` after the last).
pub(crate) async fn read_page(
    store: &Store,
    page: NumericPage,
) -> Result<(Vec<Notification>, Option<u64>), Status> {
    let partition = store.partition().index;
    let (mut notifications, next) = store
        .call(move |store| {
            store.read(|read| {
                paging::read_numeric_page::<Notification>(
                    read,
                    NOTIFICATIONS,
                    NOTIFICATIONS_NAME,
                    page,
                )
            })
        })
        .await?;
    for notification in &mut notifications {
        notification.partition = partition;
    }
    Ok((notifications, paging::next_start(&next)?))
}

/// The notification of `order_id` (a valid id) in `store`'s partition, if it was delivered.
pub(crate) async fn of_order(store: &Store, order_id: String) -> Result<Vec<Notification>, Status> {
    let partition = store.partition().index;
    store
        .call(move |store| {
            store.read(|read| {
                let mut notifications = Vec::new();
                if let Some(id) = read.open_table(BY_ORDER)?.get(order_id.as_str())? {
                    let id = id.value();
                    if let Some(bytes) = read.open_table(NOTIFICATIONS)?.get(id)? {
                        let mut notification: Notification =
                            decode_record(NOTIFICATIONS_NAME, id, bytes.value())?;
                        notification.partition = partition;
                        notifications.push(notification);
                    }
                }
                Ok::<_, StoreError>(notifications)
            })
        })
        .await
}
