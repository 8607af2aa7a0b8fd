//! Turning invoice-stage events into deliveries to make.
//!
//! For each `InvoiceCreated`, `OrderRejected` or `PaymentFailed` this renders the customer's message
//! and schedules its delivery (`delivery.pending`, the retry queue's table), in the batch's one
//! transaction with the consumed offset: every order is scheduled exactly once, whatever crashes.
//! Delivering, recording and announcing happen when the delivery settles (see `delivery`).

use orderflow_proto::v1::{LogEntry, Notification, NotificationKind, event::Kind};
use orderflow_runtime::{Apply, RetryQueue, Store, StoreError, Txn, record_processed, telemetry};

use crate::{
    STAGE,
    delivery::{Deliveries, DeliveryTask, idempotency_key},
    render,
    tables::{self, BY_ORDER, DEAD_LETTER_BY_ORDER},
};

/// The stage's delivery queue.
pub(crate) type DeliveryQueue = RetryQueue<Deliveries>;

/// Creates the tables so that queries on a new store find them empty.
pub(crate) fn create_tables(store: &Store, queue: &DeliveryQueue) -> Result<(), StoreError> {
    store.write(|txn| {
        tables::create(txn)?;
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
