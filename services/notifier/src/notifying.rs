//! Turning invoice-stage events into customer notifications.
//!
//! Tables: `notifications` (id → encoded `Notification`, the id being the offset of its
//! `CustomerNotified` event) and `notification_by_order` (order id → id). Both move in the batch's one
//! transaction with the consumed offset, so each order is recorded and announced exactly once.
//!
//! Delivery to the log sink happens inside the transaction, before the commit: if the process dies
//! between the two, the batch is applied again after restart and the log line is written again —
//! at-least-once for the sink, exactly once for the record and the event.

use orderflow_proto::v1::{
    CustomerNotified, LogEntry, Notification, NotificationKind, event::Kind,
};
use orderflow_runtime::{Apply, Store, StoreError, Txn, follow_up, now_timestamp};
use prost::Message;
use redb::{ReadableTable, TableDefinition};

use crate::render;

pub(crate) const NOTIFICATIONS: TableDefinition<u64, &[u8]> = TableDefinition::new("notifications");
pub(crate) const NOTIFICATIONS_NAME: &str = "notifications";
pub(crate) const BY_ORDER: TableDefinition<&str, u64> =
    TableDefinition::new("notification_by_order");

/// Name of the only sink of this version.
const LOG_SINK: &str = "log";

/// Creates the tables so that queries on a new store find them empty.
pub(crate) fn create_tables(store: &Store) -> Result<(), StoreError> {
    store.write(|txn| {
        txn.redb().open_table(NOTIFICATIONS)?;
        txn.redb().open_table(BY_ORDER)?;
        Ok(())
    })
}

/// Notifies on `InvoiceCreated` and `OrderRejected`; ignores the rest.
pub(crate) struct Notifier;

impl Apply for Notifier {
    fn apply(&self, txn: &mut Txn, entry: &LogEntry) -> Result<(), StoreError> {
        let Some(event) = &entry.event else {
            return Ok(());
        };
        let (kind, message, invoice_number) = match &event.kind {
            Some(Kind::InvoiceCreated(created)) => {
                let Some(invoice) = &created.invoice else {
                    tracing::warn!(order_id = %event.order_id, "invoice event without invoice skipped");
                    return Ok(());
                };
                (
                    NotificationKind::Confirmed,
                    render::confirmation(&event.order_id, invoice),
                    invoice.number,
                )
            }
            Some(Kind::OrderRejected(rejected)) => (
                NotificationKind::Rejected,
                render::rejection(&event.order_id, &rejected.lines),
                0,
            ),
            _ => return Ok(()),
        };
        let mut by_order = txn.redb().open_table(BY_ORDER)?;
        if by_order.get(event.order_id.as_str())?.is_some() {
            tracing::warn!(order_id = %event.order_id, "order already notified; duplicate ignored");
            return Ok(());
        }
        let notification = Notification {
            id: txn.next_offset(),
            order_id: event.order_id.clone(),
            customer_id: event.customer_id.clone(),
            kind: kind.into(),
            message,
            sink: LOG_SINK.to_owned(),
            sent_at: Some(now_timestamp()),
            attempts: 1,
            invoice_number,
        };
        deliver_to_log(&notification);
        by_order.insert(event.order_id.as_str(), notification.id)?;
        drop(by_order);
        txn.redb()
            .open_table(NOTIFICATIONS)?
            .insert(notification.id, notification.encode_to_vec().as_slice())?;
        txn.append(&follow_up(
            event,
            Kind::CustomerNotified(CustomerNotified {
                notification: Some(notification),
            }),
        ));
        Ok(())
    }
}

/// The log sink: one structured line per message, target `orderflow::notification`.
fn deliver_to_log(notification: &Notification) {
    tracing::info!(
        target: "orderflow::notification",
        order_id = %notification.order_id,
        customer_id = %notification.customer_id,
        kind = notification.kind().as_str_name(),
        message = %notification.message,
        "customer notified"
    );
}
