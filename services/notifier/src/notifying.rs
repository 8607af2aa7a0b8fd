//! Turning invoice-stage events into deliveries to make.
//!
//! For each `InvoiceCreated`, `OrderRejected` or `PaymentFailed` this renders the customer's message
//! and schedules its delivery (`delivery.pending`, the retry queue's table), in the batch's one
//! transaction with the consumed offset: every order is scheduled exactly once, whatever crashes.
//! Delivering, recording and announcing happen when the delivery settles (see `delivery`).

use orderflow_proto::v1::{LogEntry, Notification, NotificationKind, event::Kind};
use orderflow_runtime::{Apply, RetryQueue, Store, StoreError, Txn, record_processed, telemetry};
use redb::TableDefinition;

use crate::{
    STAGE,
    delivery::{Deliveries, DeliveryTask, idempotency_key},
    render,
};

pub(crate) const NOTIFICATIONS: TableDefinition<u64, &[u8]> = TableDefinition::new("notifications");
pub(crate) const NOTIFICATIONS_NAME: &str = "notifications";
pub(crate) const BY_ORDER: TableDefinition<&str, u64> =
    TableDefinition::new("notification_by_order");
/// Dead letter id → encoded `DeliveryTask`, what a replay delivers.
pub(crate) const DEAD_LETTER_TASKS: TableDefinition<u64, &[u8]> =
    TableDefinition::new("dead_letter_tasks");
/// order id → dead letter id.
pub(crate) const DEAD_LETTER_BY_ORDER: TableDefinition<&str, u64> =
    TableDefinition::new("dead_letter_by_order");

/// The stage's delivery queue.
pub(crate) type DeliveryQueue = RetryQueue<Deliveries>;

/// Creates the tables so that queries on a new store find them empty.
pub(crate) fn create_tables(store: &Store, queue: &DeliveryQueue) -> Result<(), StoreError> {
    store.write(|txn| {
        txn.redb().open_table(NOTIFICATIONS)?;
        txn.redb().open_table(BY_ORDER)?;
        orderflow_runtime::dead_letters::create_table(txn)?;
        txn.redb().open_table(DEAD_LETTER_TASKS)?;
        txn.redb().open_table(DEAD_LETTER_BY_ORDER)?;
        queue.create_table(txn)
    })
}

/// Schedules a notification for every order that reached the end of the pipeline.
pub(crate) struct Notifying {
    pub deliveries: DeliveryQueue,
}

impl Apply for Notifying {
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
            Some(Kind::PaymentFailed(failed)) => (
                NotificationKind::PaymentFailed,
                render::payment_failure(&event.order_id, failed),
                0,
            ),
            _ => return Ok(()),
        };
        let known = txn.has_key_in_any(&[BY_ORDER, DEAD_LETTER_BY_ORDER], &event.order_id)?;
        if known {
            tracing::warn!(order_id = %event.order_id, "order already notified; duplicate ignored");
            return Ok(());
        }
        let span = telemetry::order_span(
            STAGE,
            "notify customer",
            &event.order_id,
            &event.customer_id,
            &event.trace_context,
        );
        let notification = Notification {
            id: 0,
            order_id: event.order_id.clone(),
            customer_id: event.customer_id.clone(),
            kind: kind.into(),
            message,
            sink: String::new(),
            sent_at: None,
            attempts: 0,
            invoice_number,
            idempotency_key: idempotency_key(&event.order_id),
        };
        let context = telemetry::inject(&span);
        let task = DeliveryTask {
            upstream: Some(event.clone()),
            notification: Some(notification),
            dead_letter_id: 0,
            trace_context: context.clone(),
        };
        self.deliveries
            .enqueue(txn, &event.order_id, &event.customer_id, &task, context)?;
        span.record("outcome", "delivery scheduled");
        record_processed(STAGE, "delivery scheduled", event);
        Ok(())
    }
}
