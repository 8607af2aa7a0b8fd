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

use std::{collections::HashMap, sync::Arc, time::Duration};

use orderflow_proto::v1::{
    DeadLetter, DeadLetterState, Event, Invoice, InvoiceCreated, Payment, PaymentFailed,
    PaymentFailureReason, event::Kind,
};
use orderflow_runtime::{
    Appends, Attempt, Failure, Outcome, RetryPolicy, RetryQueue, RetryWork, Settling, StoreError,
    Txn, dead_letters, follow_up, now_timestamp, record_processed, telemetry,
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
        self.settle_all(txn, Settling::one(key, task, outcome))
    }

    /// Captured payments are invoiced with the counter and the invoice tables opened once for the
    /// whole batch, numbered in order; the failures are recorded after them.
    fn settle_all(
        &self,
        txn: &mut Txn,
        settling: Vec<Settling<PaymentTask, Captured>>,
    ) -> Result<(), StoreError> {
        let mut failed = Vec::new();
        {
            let (redb, log) = txn.split();
            let mut tables = None;
            for Settling { key, task, outcome } in settling {
                let settled = Settled {
                    key,
                    reserved: task.reserved.unwrap_or_default(),
                    invoice: task.invoice.unwrap_or_default(),
                    attempts: outcome.attempts,
                    context: outcome.trace_context,
                };
                match outcome.result {
                    Ok(captured) => {
                        let tables = match &mut tables {
                            Some(tables) => tables,
                            None => tables.insert(InvoiceTables::open(redb)?),
                        };
                        settled.invoiced(tables, log, captured)?;
                    }
                    Err(failure) => failed.push((settled, failure)),
                }
            }
        }
        for (settled, failure) in failed {
            settled.failed(txn, failure, &self.refunds)?;
        }
        Ok(())
    }
}

/// The tables an invoice is recorded in, opened once per batch.
struct InvoiceTables<'t> {
    counter: redb::Table<'t, &'static str, u64>,
    by_order: redb::Table<'t, &'static str, u64>,
    invoices: redb::Table<'t, u64, &'static [u8]>,
}

impl<'t> InvoiceTables<'t> {
    fn open(redb: &'t redb::WriteTransaction) -> Result<Self, StoreError> {
        Ok(InvoiceTables {
            counter: redb.open_table(COUNTER)?,
            by_order: redb.open_table(BY_ORDER)?,
            invoices: redb.open_table(INVOICES)?,
        })
    }

    /// Takes the next invoice number: only paid orders take one, and the counter moves in the
    /// transaction that stores the invoice, so the series has no gap.
    fn next_number(&mut self) -> Result<u64, StoreError> {
        let number = self.counter.get(NEXT_NUMBER)?.map_or(1, |v| v.value());
        self.counter.insert(NEXT_NUMBER, number + 1)?;
        Ok(number)
    }
}

/// A payment whose outcome is final, being recorded.
struct Settled {
    /// The order.
    key: String,
    /// The `StockReserved` event the payment was for.
    reserved: Event,
    /// Priced, not yet numbered.
    invoice: Invoice,
    attempts: u32,
    /// Context of the last attempt's span: the settling span is its child.
    context: HashMap<String, String>,
}

impl Settled {
    /// Numbers the invoice of a captured payment, stores it and announces `InvoiceCreated`.
    fn invoiced(
        mut self,
        tables: &mut InvoiceTables<'_>,
        log: &mut Appends,
        captured: Captured,
    ) -> Result<(), StoreError> {
        let span = telemetry::order_span(
            STAGE,
            "create invoice",
            &self.key,
            &self.reserved.customer_id,
            &self.context,
        );
        let number = tables.next_number()?;
        let now = now_timestamp();
        self.invoice.number = number;
        self.invoice.created_at = Some(now);
        self.invoice.payment = Some(Payment {
            capture_id: captured.capture_id,
            attempts: self.attempts,
            captured_at: Some(now),
            idempotency_key: idempotency_key(&self.key),
        });
        tables.by_order.insert(self.key.as_str(), number)?;
        tables
            .invoices
            .insert(number, self.invoice.encode_to_vec().as_slice())?;
        span.record("outcome", "invoiced");
        span.record("invoice.number", number);
        record_processed(STAGE, "invoiced", &self.reserved);
        log.append(&follow_up(
            &self.reserved,
            span.context(),
            Kind::InvoiceCreated(InvoiceCreated {
                invoice: Some(self.invoice),
            }),
        ));
        Ok(())
    }

    /// Makes a declined or exhausted payment a dead letter, schedules the refund of an exhausted
    /// one (an attempt whose answer was lost may have captured), and announces `PaymentFailed` with
    /// the lines for the stock stage to give back.
    fn failed(
        self,
        txn: &mut Txn,
        failure: Failure,
        refunds: &RetryQueue<impl RetryWork<Task = RefundTask>>,
    ) -> Result<(), StoreError> {
        let span = telemetry::order_span(
            STAGE,
            "payment failed",
            &self.key,
            &self.reserved.customer_id,
            &self.context,
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
        let letter = self.dead_letter(txn, why, &failure)?;
        if failure.exhausted {
            refunds.enqueue(
                txn,
                &self.key,
                &self.reserved.customer_id,
                &RefundTask {
                    dead_letter_id: letter.id,
                },
                span.context(),
            )?;
        }
        tracing::warn!(parent: span.span(), order_id = %self.key, attempts = self.attempts, error = %failure.error, reason = why, "payment failed");
        record_processed(STAGE, "payment failed", &self.reserved);
        let lines = match &self.reserved.kind {
            Some(Kind::StockReserved(r)) => r.lines.clone(),
            _ => Vec::new(),
        };
        txn.append(&follow_up(
            &self.reserved,
            span.context(),
            Kind::PaymentFailed(PaymentFailed {
                reason: reason.into(),
                attempts: self.attempts,
                last_error: failure.error,
                amount: self.invoice.total,
                lines,
            }),
        ));
        Ok(())
    }

    /// The failed payment's dead letter, found by its order: resolved at once when declined
    /// (nothing was captured), pending its refund when exhausted.
    fn dead_letter(
        &self,
        txn: &mut Txn,
        why: &str,
        failure: &Failure,
    ) -> Result<DeadLetter, StoreError> {
        let now = now_timestamp();
        let letter = dead_letters::add(
            txn,
            DeadLetter {
                id: 0,
                order_id: self.key.clone(),
                customer_id: self.reserved.customer_id.clone(),
                stage: STAGE.into(),
                reason: why.into(),
                attempts: self.attempts,
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
                // Said when listed: the partition of the store that keeps it.
                partition: 0,
            },
        )?;
        txn.redb()
            .open_table(FAILED_BY_ORDER)?
            .insert(self.key.as_str(), letter.id)?;
        Ok(letter)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use orderflow_proto::v1::{Money, ReservedLine, StockReserved};
    use orderflow_runtime::{Store, decode_record};
    use redb::TableDefinition;

    use super::*;
    use crate::gateway::{Faults, SimulatedGateway};

    /// The refund queue's table.
    const REFUNDS_PENDING: TableDefinition<&str, &[u8]> = TableDefinition::new("refund.pending");

    /// The payment queue's side over a new store with the stage's tables; the directory goes with
    /// the first value.
    fn payments() -> (tempfile::TempDir, Store, Payments<SimulatedGateway>) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("invoice.redb")).unwrap();
        let (gateway, _ledger) = SimulatedGateway::open(
            &dir.path().join("gateway.redb"),
            Faults {
                latency: Duration::ZERO,
                transient_failure_rate: 0.0,
                decline_rate: 0.0,
            },
        )
        .unwrap();
        let gateway = Arc::new(gateway);
        let refunds = RetryQueue::new(
            STAGE,
            "refund",
            store.clone(),
            Arc::new(Refunds {
                gateway: gateway.clone(),
            }),
            REFUND_POLICY,
        );
        store
            .write(|txn| {
                crate::tables::create(txn)?;
                refunds.create_table(txn)
            })
            .unwrap();
        (dir, store, Payments { gateway, refunds })
    }

    /// The task of `order`: two units of one SKU at 4.99 EUR, priced at 11.88 with tax.
    fn task(order: &str) -> PaymentTask {
        let lines = vec![ReservedLine {
            sku: "SKU-1".into(),
            name: "widget".into(),
            quantity: 2,
            unit_price: Some(Money::new(499, "EUR")),
        }];
        PaymentTask {
            reserved: Some(Event {
                order_id: order.into(),
                customer_id: "alice".into(),
                placed_at: Some(now_timestamp()),
                kind: Some(Kind::StockReserved(StockReserved { lines })),
                ..Default::default()
            }),
            invoice: Some(Invoice {
                order_id: order.into(),
                customer_id: "alice".into(),
                total: Some(Money::new(1188, "EUR")),
                ..Default::default()
            }),
        }
    }

    fn settle(
        store: &Store,
        payments: &Payments<SimulatedGateway>,
        order: &str,
        result: Result<Captured, Failure>,
    ) {
        let outcome = Outcome {
            result,
            attempts: 3,
            trace_context: HashMap::new(),
        };
        store
            .write(|txn| payments.settle(txn, order, task(order), outcome))
            .unwrap();
    }

    fn captured(id: &str) -> Result<Captured, Failure> {
        Ok(Captured {
            capture_id: id.into(),
        })
    }

    fn failed(exhausted: bool) -> Result<Captured, Failure> {
        Err(Failure {
            error: "card expired".into(),
            exhausted,
        })
    }

    /// Every event in the store's outbox, in order.
    fn announced(store: &Store) -> Vec<Event> {
        store.outbox().events(0, 100).unwrap()
    }

    fn invoice(store: &Store, order: &str) -> Option<Invoice> {
        store
            .read(|read| {
                let Some(number) = read.open_table(BY_ORDER)?.get(order)?.map(|v| v.value()) else {
                    return Ok(None);
                };
                let bytes = read.open_table(INVOICES)?.get(number)?.unwrap();
                Ok::<_, StoreError>(Some(decode_record("invoice", number, bytes.value())?))
            })
            .unwrap()
    }

    fn refund_pending(store: &Store, order: &str) -> bool {
        store
            .read(|read| {
                Ok::<_, StoreError>(read.open_table(REFUNDS_PENDING)?.get(order)?.is_some())
            })
            .unwrap()
    }

    fn dead_letter(store: &Store, order: &str) -> DeadLetter {
        store
            .write(|txn| {
                let id = txn
                    .redb()
                    .open_table(FAILED_BY_ORDER)?
                    .get(order)?
                    .unwrap()
                    .value();
                dead_letters::get(txn, id)
            })
            .unwrap()
            .unwrap()
    }

    #[tokio::test]
    async fn a_batch_numbers_its_invoices_in_order_and_records_its_failures_after() {
        let (_dir, store, payments) = payments();
        settle(&store, &payments, "o-0", captured("cap-0"));
        let settling = |order: &str, result| Settling {
            key: order.to_owned(),
            task: task(order),
            outcome: Outcome {
                result,
                attempts: 1,
                trace_context: HashMap::new(),
            },
        };
        store
            .write(|txn| {
                payments.settle_all(
                    txn,
                    vec![
                        settling("o-1", captured("cap-1")),
                        settling("o-2", failed(false)),
                        settling("o-3", captured("cap-3")),
                    ],
                )
            })
            .unwrap();
        let numbers: Vec<_> = ["o-0", "o-1", "o-3"]
            .map(|order| invoice(&store, order).unwrap().number)
            .into();
        assert_eq!(numbers, [1, 2, 3]);
        assert!(invoice(&store, "o-2").is_none());
        assert_eq!(dead_letter(&store, "o-2").order_id, "o-2");
        let events = announced(&store);
        let orders: Vec<_> = events.iter().map(|e| e.order_id.as_str()).collect();
        assert_eq!(orders, ["o-0", "o-1", "o-3", "o-2"]);
        assert!(matches!(events[3].kind, Some(Kind::PaymentFailed(_))));
        // The next batch goes on from there.
        settle(&store, &payments, "o-4", captured("cap-4"));
        assert_eq!(invoice(&store, "o-4").unwrap().number, 4);
    }

    #[tokio::test]
    async fn only_captured_payments_take_a_number_and_the_series_has_no_gap() {
        let (_dir, store, payments) = payments();
        settle(&store, &payments, "o-1", captured("cap-1"));
        settle(&store, &payments, "o-2", failed(false));
        settle(&store, &payments, "o-3", failed(true));
        settle(&store, &payments, "o-4", captured("cap-4"));
        let first = invoice(&store, "o-1").unwrap();
        assert_eq!(first.number, 1);
        assert!(first.created_at.is_some());
        let payment = first.payment.clone().unwrap();
        assert_eq!(payment.capture_id, "cap-1");
        assert_eq!(payment.attempts, 3);
        assert_eq!(payment.idempotency_key, "orderflow-payment-o-1");
        assert_eq!(invoice(&store, "o-4").unwrap().number, 2);
        assert_eq!(invoice(&store, "o-2"), None);
        assert_eq!(invoice(&store, "o-3"), None);
        let events = announced(&store);
        assert_eq!(events.len(), 4);
        let Some(Kind::InvoiceCreated(created)) = &events[0].kind else {
            panic!("not an InvoiceCreated: {:?}", events[0]);
        };
        assert_eq!(created.invoice.as_ref(), Some(&first));
        assert_eq!(events[0].order_id, "o-1");
    }

    #[tokio::test]
    async fn a_declined_payment_is_a_resolved_dead_letter_and_gives_its_lines_back() {
        let (_dir, store, payments) = payments();
        settle(&store, &payments, "o-1", failed(false));
        let letter = dead_letter(&store, "o-1");
        assert_eq!(letter.reason, "declined");
        assert_eq!(letter.stage, "invoice");
        assert_eq!(letter.attempts, 3);
        assert_eq!(letter.last_error, "card expired");
        assert_eq!(letter.resolution, "nothing was captured");
        assert!(letter.resolved_at.is_some());
        // Nothing was captured: nothing to refund.
        assert!(!refund_pending(&store, "o-1"));
        let events = announced(&store);
        let Some(Kind::PaymentFailed(failed)) = &events[0].kind else {
            panic!("not a PaymentFailed: {:?}", events[0]);
        };
        assert_eq!(failed.reason(), PaymentFailureReason::Declined);
        assert_eq!(failed.attempts, 3);
        assert_eq!(failed.last_error, "card expired");
        assert_eq!(failed.amount, Some(Money::new(1188, "EUR")));
        assert_eq!(failed.lines.len(), 1);
        assert_eq!(failed.lines[0].quantity, 2);
    }

    #[tokio::test]
    async fn an_exhausted_payment_schedules_the_refund_its_dead_letter_waits_for() {
        let (_dir, store, payments) = payments();
        settle(&store, &payments, "o-1", failed(true));
        let letter = dead_letter(&store, "o-1");
        assert_eq!(letter.reason, "retries exhausted");
        assert_eq!(letter.resolution, "refund pending");
        assert_eq!(letter.resolved_at, None);
        assert!(refund_pending(&store, "o-1"));
        let events = announced(&store);
        let Some(Kind::PaymentFailed(failed)) = &events[0].kind else {
            panic!("not a PaymentFailed: {:?}", events[0]);
        };
        assert_eq!(failed.reason(), PaymentFailureReason::RetriesExhausted);
    }
}
