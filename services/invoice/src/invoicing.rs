//! Turning stock events into payments to capture.
//!
//! Writes only `payment.pending`, the retry queue's table (the invoice tables are written when a
//! payment settles, see `payments`; all are listed in `tables`). For each `StockReserved` this prices the order and schedules its payment, in the batch's one
//! transaction with the consumed offset: a reservation is scheduled exactly once and survives any
//! crash. `OrderRejected` is passed on for the notifier.

use orderflow_proto::v1::{Invoice, LogEntry, event::Kind};
use orderflow_runtime::{
    Apply, RetryQueue, Store, StoreError, Txn, follow_up, record_processed, telemetry,
};

use crate::{
    STAGE,
    gateway::SimulatedGateway,
    payments::{PaymentTask, Payments},
    pricing::price,
    tables::{self, BY_ORDER, FAILED_BY_ORDER},
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

/// Schedules payment for `StockReserved`, passes `OrderRejected` on, ignores the rest.
pub(crate) struct Pricing {
    pub tax_rate_bps: u32,
    pub payments: PaymentQueue,
}

impl Apply for Pricing {
    fn apply(&self, txn: &mut Txn, entry: &LogEntry) -> Result<(), StoreError> {
        let Some(event) = &entry.event else {
            return Ok(());
        };
        match &event.kind {
            Some(Kind::StockReserved(reserved)) => {
                let settled = txn.has_key_in_any(&[BY_ORDER, FAILED_BY_ORDER], &event.order_id)?;
                if settled {
                    // An upstream duplicate must not bill twice.
                    tracing::warn!(order_id = %event.order_id, "duplicate reservation ignored");
                    return Ok(());
                }
                let span = telemetry::order_span(
                    STAGE,
                    "price order",
                    &event.order_id,
                    &event.customer_id,
                    &event.trace_context,
                );
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
                };
                let task = PaymentTask {
                    reserved: Some(event.clone()),
                    invoice: Some(invoice),
                };
                self.payments.enqueue(
                    txn,
                    &event.order_id,
                    &event.customer_id,
                    &task,
                    telemetry::inject(&span),
                )?;
                span.record("outcome", "payment scheduled");
                record_processed(STAGE, "payment scheduled", event);
            }
            Some(Kind::OrderRejected(rejected)) => {
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
                    telemetry::inject(&span),
                    Kind::OrderRejected(rejected.clone()),
                ));
            }
            _ => {}
        }
        Ok(())
    }
}
