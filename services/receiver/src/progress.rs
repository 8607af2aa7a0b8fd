//! Where each order is: its progress, learned from the later stages' logs.
//!
//! The receiver subscribes to the stock, invoice and notifier logs like any downstream stage (one
//! [`Progress`] each) and records every event about an order as one small row of [`STEPS`], keyed
//! by the order and the step, in the batch's transaction with the consumed offset: no order row is
//! read or rewritten on this path. Reading an order ([`compose`]) folds its steps into its row from
//! intake. The three logs are read independently, so a later state can be learned before an earlier
//! one; a step is never lost or recorded twice, and the order's status is the furthest state reached.
//! The order is `terminal` only once its whole path to that state is known, so `WatchOrder` never
//! ends before it has shown every transition:
//!
//! ```text
//! ACCEPTED → RESERVED ─→ INVOICED ──────→ NOTIFIED (terminal)
//!          ↘ REJECTED  ↘ PAYMENT_FAILED ↗ ↘ DEAD_LETTERED (terminal until a replay delivers it)
//! ```
//!
//! After each commit the [`Watchers`] of the orders it touched are woken, which is how `WatchOrder`
//! pushes transitions as they happen.
//!
//! Stores written before the steps table existed kept the progress inside the order's row; such a
//! row is the starting point of the fold like any other, so those orders read as they did.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use orderflow_proto::{
    v1::{
        InvoiceSummary, LineRejection, Order, OrderStatus, OrderTransition, PaymentFailureReason,
    },
    views::{InvoiceCreatedView, PaymentFailedView},
};
use orderflow_runtime::{Apply, Entry, EventFilter, Skipped, StoreError, Txn, decode_record};
use prost::Message;
use redb::{ReadTransaction, TableDefinition};
use tokio::sync::watch;

/// One row per step an order went through after intake: (order id, [`Step`] code) → the step as
/// an order fragment (its transition and what the step adds: invoice, rejections, failure reason,
/// release time). Written once per step and never rewritten; [`compose`] folds them into the order.
pub(crate) const STEPS: TableDefinition<(&str, u8), &[u8]> = TableDefinition::new("order_steps");
const STEPS_NAME: &str = "order_steps";

/// A step's key within its order: the status it reached, or [`STOCK_RELEASED`].
type Step = u8;
/// The stock stage gave a failed payment's reservation back: not a status of its own, so numbered
/// above every status.
const STOCK_RELEASED: Step = 100;

/// How far along the pipeline a status is; the order's status is the furthest one reached.
fn rank(status: OrderStatus) -> u8 {
    match status {
        OrderStatus::Unspecified => 0,
        OrderStatus::Accepted => 1,
        OrderStatus::Reserved | OrderStatus::Rejected => 2,
        OrderStatus::Invoiced | OrderStatus::PaymentFailed => 3,
        OrderStatus::DeadLettered => 4,
        OrderStatus::Notified => 5,
    }
}

/// NOTIFIED and DEAD_LETTERED: nothing more happens on its own.
pub(crate) fn is_terminal(status: OrderStatus) -> bool {
    matches!(status, OrderStatus::Notified | OrderStatus::DeadLettered)
}

/// An event of the stock, invoice or notifier log as the progress fold reads it: the `Event`
/// message with only the fields a step keeps. Lines, notification texts, trace contexts and the
/// rest are skipped unread, so the three subscriptions decode a fraction of each event.
#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct StepEvent {
    #[prost(string, tag = "1")]
    pub order_id: String,
    #[prost(message, optional, tag = "3")]
    pub at: Option<prost_types::Timestamp>,
    #[prost(oneof = "StepKind", tags = "11, 12, 13, 14, 15, 16, 17")]
    pub kind: Option<StepKind>,
}

/// The kinds of `Event` that move an order (same field numbers), each read as far as its step needs.
#[derive(Clone, PartialEq, prost::Oneof)]
pub(crate) enum StepKind {
    #[prost(message, tag = "11")]
    StockReserved(Skipped),
    #[prost(message, tag = "12")]
    OrderRejected(Rejected),
    #[prost(message, tag = "13")]
    InvoiceCreated(InvoiceCreatedView),
    #[prost(message, tag = "14")]
    CustomerNotified(Skipped),
    #[prost(message, tag = "15")]
    PaymentFailed(PaymentFailedView),
    #[prost(message, tag = "16")]
    StockReleased(Skipped),
    #[prost(message, tag = "17")]
    NotificationDeadLettered(DeadLetteredView),
}

/// `OrderRejected`: every line's reason is kept.
#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct Rejected {
    #[prost(message, repeated, tag = "1")]
    pub lines: Vec<LineRejection>,
}

/// `NotificationDeadLettered`: the dead letter's reason and last error (not the notification).
#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct DeadLetteredView {
    #[prost(message, optional, tag = "1")]
    pub dead_letter: Option<DeadLetterView>,
}

/// `DeadLetter`: why delivery gave up.
#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct DeadLetterView {
    #[prost(string, tag = "5")]
    pub reason: String,
    #[prost(string, tag = "7")]
    pub last_error: String,
}

/// Records one stage's events as the steps of the orders they are about.
pub(crate) struct Progress {
    stage: &'static str,
    watchers: Arc<Watchers>,
    /// How many partitions the pipeline has: with several, the stock log also carries the holds
    /// between its shards.
    partitions: u32,
}

impl Progress {
    pub(crate) fn new(stage: &'static str, watchers: Arc<Watchers>, partitions: u32) -> Self {
        Progress {
            stage,
            watchers,
            partitions,
        }
    }
}

impl Apply for Progress {
    type Event = StepEvent;
    type Prepared = ();

    /// Events of no kind that moves an order: the holds between stock shards.
    fn ignores(&self, event: &StepEvent) -> bool {
        event.kind.is_none()
    }

    /// With several partitions, the holds between stock shards are left out before they are sent.
    fn filter(&self) -> Option<EventFilter> {
        (self.stage == "stock" && self.partitions > 1)
            .then(|| EventFilter::kinds(&["stock_reserved", "order_rejected", "stock_released"]))
    }

    fn apply(
        &self,
        txn: &mut Txn,
        entry: &Entry<StepEvent>,
        prepared: &mut (),
    ) -> Result<(), StoreError> {
        self.apply_batch(txn, std::slice::from_ref(entry), prepared)
    }

    fn apply_batch(
        &self,
        txn: &mut Txn,
        entries: &[Entry<StepEvent>],
        _: &mut (),
    ) -> Result<(), StoreError> {
        let mut moved = Vec::new();
        {
            let mut steps = txn.redb().open_table(STEPS)?;
            let mut encoded = Vec::new();
            for Entry { event, .. } in entries {
                let Some((step, fragment)) = event
                    .kind
                    .as_ref()
                    .and_then(|kind| self.step(event.at, kind))
                else {
                    continue;
                };
                // Not checked against `orders`: a step of an order this receiver does not hold
                // (its data was reset, say) is a small row that no read ever reaches.
                encoded.clear();
                // Encoding into a `Vec` cannot fail: it grows.
                fragment.encode_raw(&mut encoded);
                let key = (event.order_id.as_str(), step);
                let earlier = steps
                    .insert(key, encoded.as_slice())?
                    .map(|row| row.value().to_vec());
                if let Some(earlier) = earlier {
                    // A step is recorded once (a replayed notification dead-lettered again, say):
                    // the first one stays.
                    steps.insert(key, earlier.as_slice())?;
                    continue;
                }
                moved.push(event.order_id.clone());
            }
        }
        if !moved.is_empty() {
            let watchers = self.watchers.clone();
            txn.after_commit(move || {
                for id in &moved {
                    watchers.notify(id);
                }
            });
        }
        Ok(())
    }
}

impl Progress {
    /// The step one event of this stage's records, as an order fragment; `None` for an event that
    /// moves no order.
    fn step(&self, at: Option<prost_types::Timestamp>, kind: &StepKind) -> Option<(Step, Order)> {
        let reached = |status: OrderStatus, mut fragment: Order| {
            fragment.transitions.push(OrderTransition {
                status: status.into(),
                at,
                stage: self.stage.to_owned(),
            });
            Some((status as Step, fragment))
        };
        match (self.stage, kind) {
            ("stock", StepKind::StockReserved(_)) => {
                reached(OrderStatus::Reserved, Order::default())
            }
            ("stock", StepKind::OrderRejected(rejected)) => reached(
                OrderStatus::Rejected,
                Order {
                    rejections: rejected.lines.clone(),
                    ..Order::default()
                },
            ),
            ("stock", StepKind::StockReleased(_)) => Some((
                STOCK_RELEASED,
                Order {
                    stock_released_at: at,
                    ..Order::default()
                },
            )),
            ("invoice", StepKind::InvoiceCreated(created)) => reached(
                OrderStatus::Invoiced,
                Order {
                    invoice: created.invoice.as_ref().map(|invoice| InvoiceSummary {
                        number: invoice.number,
                        total: invoice.total.clone(),
                        tax: invoice.tax.clone(),
                        payment_attempts: invoice.payment.as_ref().map_or(0, |p| p.attempts),
                    }),
                    ..Order::default()
                },
            ),
            ("invoice", StepKind::PaymentFailed(failed)) => {
                let why = match failed.reason() {
                    PaymentFailureReason::Declined => "payment declined",
                    _ => "payment gateway unavailable after every attempt",
                };
                reached(
                    OrderStatus::PaymentFailed,
                    Order {
                        failure_reason: format!(
                            "{why}: {} ({} attempts)",
                            failed.last_error, failed.attempts
                        ),
                        ..Order::default()
                    },
                )
            }
            ("notifier", StepKind::CustomerNotified(_)) => {
                reached(OrderStatus::Notified, Order::default())
            }
            ("notifier", StepKind::NotificationDeadLettered(dead)) => reached(
                OrderStatus::DeadLettered,
                Order {
                    failure_reason: dead
                        .dead_letter
                        .as_ref()
                        .map(|letter| {
                            format!(
                                "notification not delivered: {} ({})",
                                letter.reason, letter.last_error
                            )
                        })
                        .unwrap_or_default(),
                    ..Order::default()
                },
            ),
            _ => None,
        }
    }
}

/// Folds every recorded step of `order` into it, in step order: how an order is read.
pub(crate) fn compose(read: &ReadTransaction, order: &mut Order) -> Result<(), StoreError> {
    let steps = read.open_table(STEPS)?;
    let id = order.order_id.clone();
    for row in steps.range((id.as_str(), Step::MIN)..=(id.as_str(), Step::MAX))? {
        let (key, fragment) = row?;
        let (_, step) = key.value();
        let fragment: Order =
            decode_record(STEPS_NAME, format_args!("{id}/{step}"), fragment.value())?;
        fold(order, fragment);
    }
    Ok(())
}

/// Folds one step into `order`: its transition and what it adds, unless the order knew it already.
fn fold(order: &mut Order, fragment: Order) {
    let Order {
        transitions,
        invoice,
        rejections,
        failure_reason,
        stock_released_at,
        ..
    } = fragment;
    if stock_released_at.is_some() && order.stock_released_at.is_none() {
        order.stock_released_at = stock_released_at;
    }
    let Some(transition) = transitions.into_iter().next() else {
        return;
    };
    if !advance(order, transition.status(), transition.at, &transition.stage) {
        return;
    }
    if invoice.is_some() {
        order.invoice = invoice;
    }
    if !rejections.is_empty() {
        order.rejections = rejections;
    }
    if !failure_reason.is_empty() {
        order.failure_reason = failure_reason;
    }
}

/// Records that `order` reached `status`; `false` if it was already known.
fn advance(
    order: &mut Order,
    status: OrderStatus,
    at: Option<prost_types::Timestamp>,
    stage: &str,
) -> bool {
    if order.transitions.iter().any(|t| t.status() == status) {
        return false;
    }
    order.transitions.push(OrderTransition {
        status: status.into(),
        at,
        stage: stage.to_owned(),
    });
    order.transitions.sort_by_key(|t| {
        (
            rank(t.status()),
            t.at.map_or((0, 0), |at| (at.seconds, at.nanos)),
        )
    });
    if rank(status) > rank(order.status()) {
        order.set_status(status);
    }
    order.terminal = is_terminal(order.status()) && path_is_complete(order);
    true
}

/// Whether every state on the way to the order's current one is known: the stock stage's verdict
/// and, for a reserved order, the invoice stage's.
fn path_is_complete(order: &Order) -> bool {
    let reached = |status| order.transitions.iter().any(|t| t.status() == status);
    reached(OrderStatus::Rejected)
        || (reached(OrderStatus::Reserved)
            && (reached(OrderStatus::Invoiced) || reached(OrderStatus::PaymentFailed)))
}

/// Who is waiting for which order to move: one channel per watched order, woken after each commit
/// that changed it.
#[derive(Default)]
pub(crate) struct Watchers {
    by_order: Mutex<HashMap<String, watch::Sender<()>>>,
}

impl Watchers {
    /// A receiver that sees a change whenever `order_id` moves.
    pub(crate) fn watch(&self, order_id: &str) -> watch::Receiver<()> {
        match self.by_order.lock() {
            Ok(mut map) => map
                .entry(order_id.to_owned())
                .or_insert_with(|| watch::channel(()).0)
                .subscribe(),
            // A poisoned map only means a panic elsewhere; a detached receiver never fires, and the
            // watch still ends when the stage drains.
            Err(_) => watch::channel(()).1,
        }
    }

    /// Wakes the watchers of `order_id`, forgetting the channel once nobody listens.
    fn notify(&self, order_id: &str) {
        if let Ok(mut map) = self.by_order.lock()
            && let Some(sender) = map.get(order_id)
        {
            if sender.receiver_count() == 0 {
                map.remove(order_id);
            } else {
                sender.send_replace(());
            }
        }
    }

    /// Forgets `order_id`'s channel if its last watcher has left.
    pub(crate) fn release(&self, order_id: &str) {
        if let Ok(mut map) = self.by_order.lock()
            && map.get(order_id).is_some_and(|s| s.receiver_count() == 0)
        {
            map.remove(order_id);
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use orderflow_proto::v1::{
        CustomerNotified, DeadLetter, Event, Invoice, InvoiceCreated, Money,
        NotificationDeadLettered, StockReserved, event::Kind,
    };
    use orderflow_runtime::{Decode, Store};

    use super::*;
    use crate::intake::{ORDERS, ORDERS_NAME};

    /// An event about `o1` as a subscription hands it over: decoded from the bytes of the whole
    /// `Event` its stage logged.
    fn entry(kind: Kind, at: i64) -> Entry<StepEvent> {
        let event = Event {
            order_id: "o1".into(),
            customer_id: "c1".into(),
            at: ts(at),
            trace_context: [("traceparent".to_owned(), "00-ab-cd-01".to_owned())].into(),
            kind: Some(kind),
            ..Default::default()
        };
        Entry {
            offset: 0,
            event: StepEvent::decode_event(&event.encode_to_vec()).unwrap(),
        }
    }

    fn dead_lettered(reason: &str, at: i64) -> Entry<StepEvent> {
        entry(
            Kind::NotificationDeadLettered(NotificationDeadLettered {
                dead_letter: Some(DeadLetter {
                    reason: reason.into(),
                    last_error: "sink down".into(),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            at,
        )
    }

    /// A store holding order `o1` as intake wrote it, or as `row` says (a store from before the
    /// steps table kept progress in the row).
    fn store_with(row: Order) -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("r.redb")).unwrap();
        store
            .write(|txn| {
                txn.redb().open_table(STEPS)?;
                let mut orders = txn.redb().open_table(ORDERS)?;
                orders.insert("o1", row.encode_to_vec().as_slice())?;
                Ok::<_, StoreError>(())
            })
            .unwrap();
        (dir, store)
    }

    fn accepted() -> Order {
        let mut order = Order {
            order_id: "o1".into(),
            ..Default::default()
        };
        advance(&mut order, OrderStatus::Accepted, ts(1), "receiver");
        order
    }

    /// Applies `entries` as `stage`'s batch; returns the orders whose watchers were woken.
    fn apply(store: &Store, stage: &'static str, entries: &[Entry<StepEvent>]) -> Vec<String> {
        let watchers = Arc::new(Watchers::default());
        let mut woken = watchers.watch("o1");
        woken.mark_unchanged();
        store
            .write(|txn| {
                Progress::new(stage, watchers.clone(), 1).apply_batch(txn, entries, &mut ())
            })
            .unwrap();
        if woken.has_changed().unwrap() {
            vec!["o1".into()]
        } else {
            Vec::new()
        }
    }

    fn read(store: &Store) -> Order {
        store
            .read(|read| {
                let orders = read.open_table(ORDERS)?;
                let mut order: Order =
                    decode_record(ORDERS_NAME, "o1", orders.get("o1")?.unwrap().value())?;
                compose(read, &mut order)?;
                Ok::<_, StoreError>(order)
            })
            .unwrap()
    }

    #[test]
    fn steps_compose_into_the_order_in_any_arrival_order() {
        let (_dir, store) = store_with(accepted());
        let notified = entry(Kind::CustomerNotified(CustomerNotified::default()), 4);
        assert_eq!(apply(&store, "notifier", &[notified]), vec!["o1"]);
        let order = read(&store);
        assert_eq!(order.status(), OrderStatus::Notified);
        assert!(!order.terminal, "terminal before its path is known");
        apply(
            &store,
            "stock",
            &[entry(Kind::StockReserved(StockReserved::default()), 2)],
        );
        let created = InvoiceCreated {
            invoice: Some(Invoice {
                number: 7,
                ..Default::default()
            }),
        };
        apply(
            &store,
            "invoice",
            &[entry(Kind::InvoiceCreated(created), 3)],
        );
        let order = read(&store);
        assert!(order.terminal);
        assert_eq!(order.invoice.map(|i| i.number), Some(7));
        let path: Vec<_> = order
            .transitions
            .iter()
            .map(|t| (t.status(), t.stage.as_str()))
            .collect();
        assert_eq!(
            path,
            vec![
                (OrderStatus::Accepted, "receiver"),
                (OrderStatus::Reserved, "stock"),
                (OrderStatus::Invoiced, "invoice"),
                (OrderStatus::Notified, "notifier")
            ]
        );
    }

    #[test]
    fn a_step_is_recorded_once() {
        let (_dir, store) = store_with(accepted());
        assert_eq!(
            apply(&store, "notifier", &[dead_lettered("first", 5)]),
            vec!["o1"]
        );
        assert!(
            apply(&store, "notifier", &[dead_lettered("second", 9)]).is_empty(),
            "the same step again woke the watchers"
        );
        let order = read(&store);
        assert_eq!(order.status(), OrderStatus::DeadLettered);
        assert_eq!(
            order.failure_reason,
            "notification not delivered: first (sink down)"
        );
        assert_eq!(order.transitions.len(), 2);
    }

    #[test]
    fn a_row_that_kept_its_progress_reads_as_before() {
        let mut row = accepted();
        advance(&mut row, OrderStatus::Reserved, ts(2), "stock");
        let (_dir, store) = store_with(row);
        apply(
            &store,
            "stock",
            &[entry(Kind::StockReserved(StockReserved::default()), 2)],
        );
        apply(
            &store,
            "notifier",
            &[entry(
                Kind::CustomerNotified(CustomerNotified::default()),
                4,
            )],
        );
        let order = read(&store);
        assert_eq!(
            path(&order),
            vec![
                OrderStatus::Accepted,
                OrderStatus::Reserved,
                OrderStatus::Notified
            ]
        );
        assert_eq!(order.status(), OrderStatus::Notified);
    }

    #[test]
    fn events_that_move_no_order_record_nothing() {
        let (_dir, store) = store_with(accepted());
        // The stock stage's events read from the invoice log's subscription mean nothing there.
        assert!(
            apply(
                &store,
                "invoice",
                &[entry(Kind::StockReserved(StockReserved::default()), 2)]
            )
            .is_empty()
        );
        assert_eq!(read(&store), accepted());
    }

    fn ts(seconds: i64) -> Option<prost_types::Timestamp> {
        Some(prost_types::Timestamp { seconds, nanos: 0 })
    }

    /// The states `order` went through, in order.
    fn path(order: &Order) -> Vec<OrderStatus> {
        order.transitions.iter().map(|t| t.status()).collect()
    }

    #[test]
    fn status_is_the_furthest_state_in_any_arrival_order() {
        let mut order = Order::default();
        advance(&mut order, OrderStatus::Accepted, ts(1), "receiver");
        // The notifier's log was read before the stock and invoice logs.
        assert!(advance(
            &mut order,
            OrderStatus::Notified,
            ts(4),
            "notifier"
        ));
        assert!(!order.terminal, "terminal before its path is known");
        assert!(advance(&mut order, OrderStatus::Reserved, ts(2), "stock"));
        assert!(!order.terminal);
        assert!(advance(&mut order, OrderStatus::Invoiced, ts(3), "invoice"));
        assert!(
            !advance(&mut order, OrderStatus::Invoiced, ts(3), "invoice"),
            "applied twice"
        );
        assert_eq!(order.status(), OrderStatus::Notified);
        assert!(order.terminal);
        assert_eq!(
            path(&order),
            vec![
                OrderStatus::Accepted,
                OrderStatus::Reserved,
                OrderStatus::Invoiced,
                OrderStatus::Notified
            ]
        );
    }

    #[test]
    fn a_replayed_dead_letter_ends_notified() {
        let mut order = Order::default();
        advance(&mut order, OrderStatus::Accepted, ts(1), "receiver");
        advance(&mut order, OrderStatus::Rejected, ts(2), "stock");
        advance(&mut order, OrderStatus::DeadLettered, ts(5), "notifier");
        assert!(order.terminal);
        assert_eq!(order.status(), OrderStatus::DeadLettered);
        advance(&mut order, OrderStatus::Notified, ts(9), "notifier");
        assert_eq!(order.status(), OrderStatus::Notified);
    }

    #[test]
    fn the_lean_view_keeps_what_each_step_shows() {
        // Each case: a store with `o1` reserved, then one event of the stage with every field set.
        let after = |stage: &'static str, kind: Kind| {
            let (dir, store) = store_with(accepted());
            apply(
                &store,
                "stock",
                &[entry(Kind::StockReserved(StockReserved::default()), 2)],
            );
            apply(&store, stage, &[entry(kind, 3)]);
            let order = read(&store);
            drop(dir);
            order
        };
        let invoice = Invoice {
            number: 9,
            order_id: "o1".into(),
            lines: vec![Default::default(); 3],
            tax: Some(Money::new(20, "EUR")),
            total: Some(Money::new(120, "EUR")),
            payment: Some(orderflow_proto::v1::Payment {
                capture_id: "cap-1".into(),
                attempts: 2,
                ..Default::default()
            }),
            ..Default::default()
        };
        let created = Kind::InvoiceCreated(InvoiceCreated {
            invoice: Some(invoice),
        });
        assert_eq!(
            after("invoice", created).invoice,
            Some(InvoiceSummary {
                number: 9,
                total: Some(Money::new(120, "EUR")),
                tax: Some(Money::new(20, "EUR")),
                payment_attempts: 2,
            })
        );

        let failed = Kind::PaymentFailed(orderflow_proto::v1::PaymentFailed {
            reason: PaymentFailureReason::Declined.into(),
            attempts: 1,
            last_error: "card expired".into(),
            lines: vec![Default::default(); 2],
            ..Default::default()
        });
        let order = after("invoice", failed);
        assert_eq!(order.status(), OrderStatus::PaymentFailed);
        assert_eq!(
            order.failure_reason,
            "payment declined: card expired (1 attempts)"
        );

        let (_dir, store) = store_with(accepted());
        let rejection = LineRejection {
            sku: "KB-01".into(),
            requested: 3,
            available: 1,
            reason: orderflow_proto::v1::RejectionReason::OutOfStock.into(),
        };
        let rejected = Kind::OrderRejected(orderflow_proto::v1::OrderRejected {
            lines: vec![rejection.clone()],
        });
        apply(&store, "stock", &[entry(rejected, 2)]);
        let order = read(&store);
        assert_eq!(order.status(), OrderStatus::Rejected);
        assert_eq!(order.rejections, vec![rejection]);
    }
}
