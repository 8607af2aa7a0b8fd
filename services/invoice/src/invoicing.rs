//! Turning stock events into payments to capture.
//!
//! For each `StockReserved` this prices the order and, before the batch's transaction, makes the
//! payment's first attempt (see `orderflow_runtime::retry`). The transaction records it with the
//! consumed offset: a payment captured or declined at once is settled there (see `payments`), one
//! that must be retried waits in `payment.pending`. So a reservation is paid for exactly once and
//! survives any crash. `OrderRejected` is passed on for the notifier. The tables are listed in
//! `tables`.

use crate::{
    STAGE,
    gateway::SimulatedGateway,
    payments::{PaymentTask, Payments},
    pricing::price,
    tables::{self, BY_ORDER, FAILED_BY_ORDER},
};
use orderflow_proto::v1::{Event, Invoice, OrderRejected, StockReserved, event::Kind};
use orderflow_runtime::{
    Apply, Entry, EventFilter, FirstAttempt, FirstAttempts, NewTask, RetryQueue, Store, StoreError,
    Txn, follow_up, record_processed, telemetry,
};

/// The stage's payment queue.
pub(crate) type PaymentQueue = RetryQueue<Payments<SimulatedGateway>>;

/// Creates the tables so that queries on a new store find them empty.
pub(crate) fn create_tables(store: &Store, queue: &PaymentQueue) -> Result<(), StoreError> {
    store.write(|txn| {
        tables::create(txn)?;
        queue.create_table(txn)?;
        queue.worker().refunds.create_table(txn)
    })
}

/// Prices every `StockReserved` and makes its payment's first attempt before the batch's
/// transaction; inside it, settles or schedules each payment. Passes `OrderRejected` on, ignores the
/// rest.
pub(crate) struct Pricing {
    pub tax_rate_bps: u32,
    /// The partition this store holds: its invoices are numbered in its series.
    pub partition: u32,
    /// How many partitions the pipeline has.
    pub partitions: u32,
    pub payments: PaymentQueue,
}

impl Pricing {
    /// Prices `reserved`, the payload of `event`, as the payment task to make, in the order's "price
    /// order" span.
    fn payment(&self, event: &Event, reserved: &StockReserved) -> NewTask<PaymentTask> {
        let span = telemetry::order_span(
            STAGE,
            "price order",
            &event.order_id,
            &event.customer_id,
            &event.trace_context,
        );
        span.record("outcome", "payment scheduled");
        let priced = price(&reserved.lines, self.tax_rate_bps);
        let invoice = Invoice {
            number: 0,
            order_id: event.order_id.clone(),
            customer_id: event.customer_id.clone(),
            lines: priced.lines,
            subtotal: Some(priced.subtotal),
            tax_rate_bps: self.tax_rate_bps,
            tax: Some(priced.tax),
            total: Some(priced.total),
            created_at: None,
            payment: None,
            partition: self.partition,
        };
        NewTask {
            key: event.order_id.clone(),
            customer_id: event.customer_id.clone(),
            task: PaymentTask {
                reserved: Some(event.clone()),
                invoice: Some(invoice),
            },
            trace_context: span.context(),
        }
    }
}

impl Apply for Pricing {
    type Event = Event;
    type Prepared = FirstAttempts<Payments<SimulatedGateway>>;

    /// All but reservations and rejections: releases, and the holds shards ask of each other.
    fn ignores(&self, event: &Event) -> bool {
        !matches!(
            event.kind,
            Some(Kind::StockReserved(_) | Kind::OrderRejected(_))
        )
    }

    /// With several partitions, the holds between stock shards are left out before they are sent.
    /// With one there are none, and the rare release is not worth reading every event's kind for.
    fn filter(&self) -> Option<EventFilter> {
        (self.partitions > 1).then(|| EventFilter::kinds(&["stock_reserved", "order_rejected"]))
    }

    async fn prepare(&self, entries: &[Entry<Event>]) -> Self::Prepared {
        let payments = entries
            .iter()
            .filter_map(|entry| {
                let event = &entry.event;
                match &event.kind {
                    Some(Kind::StockReserved(reserved)) => Some(self.payment(event, reserved)),
                    _ => None,
                }
            })
            .collect();
        self.payments.attempt_first(payments).await
    }

    fn apply(
        &self,
        txn: &mut Txn,
        entry: &Entry<Event>,
        first: &mut Self::Prepared,
    ) -> Result<(), StoreError> {
        let event = &entry.event;
        match &event.kind {
            Some(Kind::StockReserved(reserved)) => {
                let settled = txn.has_key_in_any(&[BY_ORDER, FAILED_BY_ORDER], &event.order_id)?;
                if settled {
                    // An upstream duplicate must not bill twice (its attempt, if any, was a
                    // replay under the same idempotency key).
                    tracing::warn!(order_id = %event.order_id, "duplicate reservation ignored");
                    return Ok(());
                }
                // A duplicate within the batch has no first attempt of its own.
                let payment = first
                    .take(&event.order_id)
                    .unwrap_or_else(|| FirstAttempt::not_attempted(self.payment(event, reserved)));
                if self.payments.submit(txn, payment)? {
                    record_processed(STAGE, "payment scheduled", event);
                }
            }
            Some(Kind::OrderRejected(rejected)) => pass_on(txn, event, rejected),
            _ => {}
        }
        Ok(())
    }

    /// [`Apply::apply`] for a batch, with the settled orders looked up and the payments submitted
    /// once for all of it.
    fn apply_batch(
        &self,
        txn: &mut Txn,
        entries: &[Entry<Event>],
        first: &mut Self::Prepared,
    ) -> Result<(), StoreError> {
        let reserved = entries
            .iter()
            .filter(|entry| matches!(entry.event.kind, Some(Kind::StockReserved(_))));
        let settled = txn.keys_in_any(
            &[BY_ORDER, FAILED_BY_ORDER],
            reserved.map(|entry| entry.event.order_id.as_str()),
        )?;
        let mut payments = Vec::with_capacity(entries.len());
        let mut reservations = Vec::with_capacity(entries.len());
        for entry in entries {
            let event = &entry.event;
            match &event.kind {
                Some(Kind::StockReserved(reserved)) => {
                    if settled.contains(event.order_id.as_str()) {
                        tracing::warn!(order_id = %event.order_id, "duplicate reservation ignored");
                        continue;
                    }
                    payments.push(first.take(&event.order_id).unwrap_or_else(|| {
                        FirstAttempt::not_attempted(self.payment(event, reserved))
                    }));
                    reservations.push(event);
                }
                Some(Kind::OrderRejected(rejected)) => pass_on(txn, event, rejected),
                _ => {}
            }
        }
        // A duplicate within the batch is turned away by `submit_all`.
        let submitted = self.payments.submit_all(txn, payments)?;
        for (event, submitted) in reservations.into_iter().zip(submitted) {
            if submitted {
                record_processed(STAGE, "payment scheduled", event);
            }
        }
        Ok(())
    }
}

/// Passes a rejection on for the notifier.
fn pass_on(txn: &mut Txn, event: &Event, rejected: &OrderRejected) {
    let span = telemetry::order_span(
        STAGE,
        "pass rejection on",
        &event.order_id,
        &event.customer_id,
        &event.trace_context,
    );
    span.record("outcome", "rejected");
    record_processed(STAGE, "rejection passed on", event);
    txn.append(&follow_up(
        event,
        span.context(),
        Kind::OrderRejected(rejected.clone()),
    ));
}
