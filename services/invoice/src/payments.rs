//! Capturing payment for a priced order, through the stage's retry queue.
//!
//! Each reserved order waits in `payment.pending` (see `orderflow_runtime::retry`) with its priced,
//! not yet numbered invoice. Every attempt asks the gateway to capture the total under the order's
//! idempotency key, `orderflow-payment-<order id>`, so retries and restarts never charge twice.
//!
//! Settling, in one transaction per batch of results:
//! - **captured**: the invoice takes the next number (`invoice_counter`), is stored and announced as
//!   `InvoiceCreated`. Only paid orders are numbered, so numbers stay gap-free whatever fails.
//! - **declined** (final at once) or **retries exhausted**: no number is used; the order becomes a
//!   dead letter with its reason and is announced as `PaymentFailed` with its lines, which the stock
//!   stage gives back and the notifier tells the customer about.
//!
//! An exhausted payment may still have been captured: an attempt whose answer was lost. So the same
//! transaction schedules a **refund** (`refund.pending`): the gateway is asked to void whatever was
//! captured under the order's idempotency key, retried until it answers, and the dead letter records
//! the result. A declined payment captured nothing and is resolved at once.

use std::{sync::Arc, time::Duration};

use orderflow_proto::v1::{
    DeadLetter, DeadLetterState, Event, Invoice, InvoiceCreated, Payment, PaymentFailed,
    PaymentFailureReason, event::Kind,
};
use orderflow_runtime::{
    Attempt, Outcome, RetryPolicy, RetryQueue, RetryWork, StoreError, Txn, dead_letters, follow_up,
    now_timestamp, record_processed, telemetry,
};
use prost::Message;
use redb::ReadableTable;

use crate::{
    STAGE,
    gateway::{CaptureRequest, Captured, PaymentError, PaymentGateway},
    tables::{BY_ORDER, COUNTER, FAILED_BY_ORDER, INVOICES, NEXT_NUMBER},
};

/// What waits for payment: the reservation and the priced invoice (number 0 until captured).
#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct PaymentTask {
    /// The `StockReserved` event: order, customer, lines, placement time.
    #[prost(message, optional, tag = "1")]
    pub reserved: Option<Event>,
    #[prost(message, optional, tag = "2")]
    pub invoice: Option<Invoice>,
}

/// The idempotency key of an order's payment: stable across attempts and restarts.
pub(crate) fn idempotency_key(order_id: &str) -> String {
    format!("orderflow-payment-{order_id}")
}

/// The invoice stage's side of the payment queue.
pub(crate) struct Payments<G: PaymentGateway> {
    pub gateway: Arc<G>,
    pub refunds: RetryQueue<Refunds<G>>,
}

/// A refund to make: the dead letter of the failed payment it resolves.
#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct RefundTask {
    #[prost(uint64, tag = "1")]
    pub dead_letter_id: u64,
}

/// How refunds are retried: until the gateway answers, backing off to a minute (10,000 attempts is
/// about a week).
pub(crate) const REFUND_POLICY: RetryPolicy = RetryPolicy {
    max_attempts: 10_000,
    backoff_min: Duration::from_millis(200),
    backoff_max: Duration::from_secs(60),
    concurrency: 16,
    max_pending: usize::MAX,
};

/// The invoice stage's side of the refund queue.
pub(crate) struct Refunds<G> {
    pub gateway: Arc<G>,
}

impl<G: PaymentGateway> RetryWork for Refunds<G> {
    type Task = RefundTask;
    type Done = Option<String>;

    async fn attempt(
        &self,
        key: &str,
        _task: &RefundTask,
        _attempt: u32,
    ) -> Attempt<Option<String>> {
        match self.gateway.void(&idempotency_key(key)).await {
            Ok(voided) => Attempt::Done(voided),
            Err(PaymentError::Transient(error)) => Attempt::Retry { error, after: None },
            Err(PaymentError::Declined(error)) => Attempt::Fail { error },
        }
    }

    fn settle(
        &self,
        txn: &mut Txn,
        key: &str,
        task: RefundTask,
        outcome: Outcome<Option<String>>,
    ) -> Result<(), StoreError> {
        let resolution = match &outcome.result {
            Ok(Some(capture_id)) => format!("capture {capture_id} voided"),
            Ok(None) => "nothing was captured".to_owned(),
            Err(failure) => {
                tracing::error!(order_id = %key, error = %failure.error, "refund failed; an operator must check the payment");
                format!("refund failed, check the payment: {}", failure.error)
            }
        };
        if outcome.result.is_ok() {
            tracing::info!(order_id = %key, resolution = %resolution, "failed payment refunded");
        }
        dead_letters::update(txn, task.dead_letter_id, |letter| {
            letter.resolution = resolution;
            letter.resolved_at = Some(now_timestamp());
        })?;
        Ok(())
    }
}

impl<G: PaymentGateway> RetryWork for Payments<G> {
    type Task = PaymentTask;
    type Done = Captured;

    async fn attempt(&self, key: &str, task: &PaymentTask, _attempt: u32) -> Attempt<Captured> {
        let Some(amount) = task.invoice.as_ref().and_then(|i| i.total.clone()) else {
            return Attempt::Fail {
                error: "the order has no total to charge".into(),
            };
        };
        let request = CaptureRequest {
            idempotency_key: idempotency_key(key),
            order_id: key.to_owned(),
            amount,
        };
        match self.gateway.capture(request).await {
            Ok(captured) => Attempt::Done(captured),
            Err(PaymentError::Declined(error)) => Attempt::Fail { error },
            Err(PaymentError::Transient(error)) => Attempt::Retry { error, after: None },
        }
    }

    fn settle(
        &self,
        txn: &mut Txn,
        key: &str,
        task: PaymentTask,
        outcome: Outcome<Captured>,
    ) -> Result<(), StoreError> {
        let reserved = task.reserved.unwrap_or_default();
        let mut invoice = task.invoice.unwrap_or_default();
        match outcome.result {
            Ok(captured) => {
                let span = telemetry::order_span(
                    STAGE,
                    "create invoice",
                    key,
                    &reserved.customer_id,
                    &outcome.trace_context,
                );
                let number = {
                    let mut counter = txn.redb().open_table(COUNTER)?;
                    let number = counter.get(NEXT_NUMBER)?.map_or(1, |v| v.value());
                    counter.insert(NEXT_NUMBER, number + 1)?;
                    number
                };
                let now = now_timestamp();
                invoice.number = number;
                invoice.created_at = Some(now);
                invoice.payment = Some(Payment {
                    capture_id: captured.capture_id,
                    attempts: outcome.attempts,
                    captured_at: Some(now),
                    idempotency_key: idempotency_key(key),
                });
                txn.redb().open_table(BY_ORDER)?.insert(key, number)?;
                txn.redb()
                    .open_table(INVOICES)?
                    .insert(number, invoice.encode_to_vec().as_slice())?;
                span.record("outcome", "invoiced");
                span.record("invoice.number", number);
                record_processed(STAGE, "invoiced", &reserved);
                txn.append(&follow_up(
                    &reserved,
                    span.context(),
                    Kind::InvoiceCreated(InvoiceCreated {
                        invoice: Some(invoice),
                    }),
                ));
            }
            Err(failure) => {
                let span = telemetry::order_span(
                    STAGE,
                    "payment failed",
                    key,
                    &reserved.customer_id,
                    &outcome.trace_context,
                );
                let (reason, why) = if failure.exhausted {
                    (PaymentFailureReason::RetriesExhausted, "retries exhausted")
                } else {
                    (PaymentFailureReason::Declined, "declined")
                };
                span.record("outcome", "payment failed");
                span.record(
                    "otel.status_description",
                    format!("payment {why}: {}", failure.error).as_str(),
                );
                let now = now_timestamp();
                let letter = dead_letters::add(
                    txn,
                    DeadLetter {
                        id: 0,
                        order_id: key.to_owned(),
                        customer_id: reserved.customer_id.clone(),
                        stage: STAGE.into(),
                        reason: why.into(),
                        attempts: outcome.attempts,
                        last_error: failure.error.clone(),
                        dead_lettered_at: Some(now),
                        state: DeadLetterState::Dead.into(),
                        replays: 0,
                        resolved_at: (!failure.exhausted).then_some(now),
                        resolution: if failure.exhausted {
                            "refund pending".into()
                        } else {
                            "nothing was captured".into()
                        },
                    },
                )?;
                if failure.exhausted {
                    self.refunds.enqueue(
                        txn,
                        key,
                        &reserved.customer_id,
                        &RefundTask {
                            dead_letter_id: letter.id,
                        },
                        span.context(),
                    )?;
                }
                txn.redb()
                    .open_table(FAILED_BY_ORDER)?
                    .insert(key, letter.id)?;
                tracing::warn!(parent: span.span(), order_id = %key, attempts = outcome.attempts, error = %failure.error, reason = why, "payment failed");
                record_processed(STAGE, "payment failed", &reserved);
                let lines = match &reserved.kind {
                    Some(Kind::StockReserved(r)) => r.lines.clone(),
                    _ => Vec::new(),
                };
                txn.append(&follow_up(
                    &reserved,
                    span.context(),
                    Kind::PaymentFailed(PaymentFailed {
                        reason: reason.into(),
                        attempts: outcome.attempts,
                        last_error: failure.error,
                        amount: invoice.total,
                        lines,
                    }),
                ));
            }
        }
        Ok(())
    }
}
