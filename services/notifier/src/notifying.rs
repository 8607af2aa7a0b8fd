//! Turning invoice-stage events into deliveries to make.
//!
//! For each `InvoiceCreated`, `OrderRejected` or `PaymentFailed` this renders the customer's message
//! and, before the batch's transaction, makes the first delivery attempt (see
//! `orderflow_runtime::retry`). The transaction records it with the consumed offset: a delivery made
//! (or refused for good) at once is settled there (see `delivery`), one that must be retried waits
//! in `delivery.pending`. Every order is notified exactly once in the store, whatever crashes.

use orderflow_proto::{
    v1::{Notification, NotificationKind},
    views::InvoiceCreatedView,
};
use orderflow_runtime::{
    Apply, Entry, FirstAttempt, FirstAttempts, NewTask, Partition, RetryQueue, Store, StoreError,
    Txn, record_processed_since, telemetry,
};

use crate::{
    STAGE,
    delivery::{Deliveries, DeliveryTask, idempotency_key},
    ending::{Ending, How},
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

/// Renders a notification for every order that reached the end of the pipeline and makes its first
/// delivery attempt before the batch's transaction; inside it, settles or schedules each delivery.
pub(crate) struct Notifying {
    pub deliveries: DeliveryQueue,
    /// The partition this store holds.
    pub partition: Partition,
}

impl Notifying {
    /// The delivery that tells the customer how `event` ended their order, in the order's "notify
    /// customer" span; `None` for events that end nothing, and for an `InvoiceCreated` without
    /// its invoice (which [`Notifying::delivery_for`] reports).
    fn delivery(&self, event: &Ending) -> Option<NewTask<DeliveryTask>> {
        let (kind, message, invoice_number) = match &event.how {
            Some(How::Invoiced(InvoiceCreatedView { invoice })) => {
                let invoice = invoice.as_ref()?;
                (
                    NotificationKind::Confirmed,
                    render::confirmation(&event.order_id, invoice, self.partition.count),
                    invoice.number,
                )
            }
            Some(How::Rejected(rejected)) => (
                NotificationKind::Rejected,
                render::rejection(&event.order_id, &rejected.lines),
                0,
            ),
            Some(How::PaymentFailed(failed)) => (
                NotificationKind::PaymentFailed,
                render::payment_failure(&event.order_id, failed),
                0,
            ),
            None => return None,
        };
        let span = telemetry::order_span(
            STAGE,
            "notify customer",
            &event.order_id,
            &event.customer_id,
            &event.trace_context,
        );
        span.record("outcome", "delivery scheduled");
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
            partition: self.partition.index,
        };
        let context = span.into_context();
        Some(NewTask {
            key: event.order_id.clone(),
            customer_id: event.customer_id.clone(),
            task: DeliveryTask {
                upstream: Some(event.header()),
                notification: Some(notification),
                dead_letter_id: 0,
                trace_context: context.clone(),
            },
            trace_context: context,
        })
    }
}

impl Apply for Notifying {
    type Event = Ending;
    type Prepared = FirstAttempts<Deliveries>;

    async fn prepare(&self, entries: &[Entry<Ending>]) -> Self::Prepared {
        let deliveries = entries
            .iter()
            .filter_map(|entry| self.delivery(&entry.event))
            .collect();
        self.deliveries.attempt_first(deliveries).await
    }

    fn apply(
        &self,
        txn: &mut Txn,
        entry: &Entry<Ending>,
        first: &mut Self::Prepared,
    ) -> Result<(), StoreError> {
        let known = txn.has_key_in_any(&[BY_ORDER, DEAD_LETTER_BY_ORDER], &entry.event.order_id)?;
        self.record(txn, entry, first, known).map(|_| ())
    }

    fn apply_batch(
        &self,
        txn: &mut Txn,
        entries: &[Entry<Ending>],
        first: &mut Self::Prepared,
    ) -> Result<(), StoreError> {
        // The orders notified (or dead-lettered) before this batch, with the two tables opened
        // once for the batch rather than for each event.
        let known = txn.keys_in_any(
            &[BY_ORDER, DEAD_LETTER_BY_ORDER],
            entries.iter().map(|entry| entry.event.order_id.as_str()),
        )?;
        // Each order's first delivery in the batch, submitted together; a later one for the same
        // order is a duplicate, which `submit_all` turns away.
        let mut deliveries = Vec::with_capacity(entries.len());
        let mut events = Vec::with_capacity(entries.len());
        for entry in entries {
            let known = known.contains(entry.event.order_id.as_str());
            if let Some(delivery) = self.delivery_for(entry, first, known) {
                deliveries.push(delivery);
                events.push(&entry.event);
            }
        }
        let submitted = self.deliveries.submit_all(txn, deliveries)?;
        for (event, submitted) in events.into_iter().zip(submitted) {
            if submitted {
                record_processed_since(STAGE, "delivery scheduled", event.at);
            } else {
                tracing::warn!(order_id = %event.order_id, "order already scheduled for delivery; duplicate ignored");
            }
        }
        Ok(())
    }
}

impl Notifying {
    /// Records the delivery `entry` asks for: settled at once when its first attempt decided it,
    /// else scheduled. `known`: the order has been notified or dead-lettered already, so this is a
    /// duplicate to ignore. Returns whether a delivery was recorded.
    fn record(
        &self,
        txn: &mut Txn,
        entry: &Entry<Ending>,
        first: &mut FirstAttempts<Deliveries>,
        known: bool,
    ) -> Result<bool, StoreError> {
        let Some(delivery) = self.delivery_for(entry, first, known) else {
            return Ok(false);
        };
        let submitted = self.deliveries.submit(txn, delivery)?;
        if submitted {
            record_processed_since(STAGE, "delivery scheduled", entry.event.at);
        }
        Ok(submitted)
    }

    /// The delivery `entry` asks for, with its first attempt if one was made; `None` for an event
    /// that ends nothing, or an order already notified or dead-lettered (`known`).
    fn delivery_for(
        &self,
        entry: &Entry<Ending>,
        first: &mut FirstAttempts<Deliveries>,
        known: bool,
    ) -> Option<FirstAttempt<Deliveries>> {
        let event = &entry.event;
        let delivery = match first.take(&event.order_id) {
            Some(delivery) => delivery,
            // A duplicate within the batch, or an event that ends nothing.
            None => match self.delivery(event) {
                Some(delivery) => FirstAttempt::not_attempted(delivery),
                None => {
                    if let Some(How::Invoiced(InvoiceCreatedView { invoice: None })) = &event.how {
                        tracing::warn!(order_id = %event.order_id, "invoice event without invoice skipped");
                    }
                    return None;
                }
            },
        };
        if known {
            tracing::warn!(order_id = %event.order_id, "order already notified; duplicate ignored");
            return None;
        }
        Some(delivery)
    }
}
