//! Where each order is: its progress, learned from the later stages' logs.
//!
//! The receiver subscribes to the stock, invoice and notifier logs like any downstream stage (one
//! [`Progress`] each) and folds every event about one of its orders into that order's record in the
//! `orders` table, in the batch's transaction with the consumed offset. The three logs are read
//! independently, so a later state can be learned before an earlier one; a state is never lost or
//! applied twice, and the order's status is the furthest state reached. The order is `terminal`
//! only once its whole path to that state is known, so `WatchOrder` never ends before it has shown
//! every transition:
//!
//! ```text
//! ACCEPTED → RESERVED ─→ INVOICED ──────→ NOTIFIED (terminal)
//!          ↘ REJECTED  ↘ PAYMENT_FAILED ↗ ↘ DEAD_LETTERED (terminal until a replay delivers it)
//! ```
//!
//! After each commit the [`Watchers`] of the orders it touched are woken, which is how `WatchOrder`
//! pushes transitions as they happen.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use orderflow_proto::v1::{
    InvoiceSummary, LogEntry, Order, OrderStatus, OrderTransition, PaymentFailureReason,
    event::Kind,
};
use orderflow_runtime::{Apply, StoreError, Txn, decode_record};
use prost::Message;
use redb::ReadableTable;
use tokio::sync::watch;

use crate::intake::{ORDERS, ORDERS_NAME};

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

/// Folds one stage's events into the orders they are about.
pub(crate) struct Progress {
    stage: &'static str,
    watchers: Arc<Watchers>,
}

impl Progress {
    pub(crate) fn new(stage: &'static str, watchers: Arc<Watchers>) -> Self {
        Progress { stage, watchers }
    }
}

impl Apply for Progress {
    type Prepared = ();

    fn apply(&self, txn: &mut Txn, entry: &LogEntry, prepared: &mut ()) -> Result<(), StoreError> {
        self.apply_batch(txn, std::slice::from_ref(entry), prepared)
    }

    fn apply_batch(
        &self,
        txn: &mut Txn,
        entries: &[LogEntry],
        _: &mut (),
    ) -> Result<(), StoreError> {
        let mut moved = Vec::new();
        {
            let mut orders = txn.redb().open_table(ORDERS)?;
            for entry in entries {
                let Some(event) = &entry.event else {
                    continue;
                };
                let Some(kind) = &event.kind else {
                    continue;
                };
                let mut order: Order = match orders.get(event.order_id.as_str())? {
                    Some(bytes) => decode_record(ORDERS_NAME, &event.order_id, bytes.value())?,
                    // Not an order of this receiver (or from before its data was reset).
                    None => continue,
                };
                if self.fold(&mut order, event.at, kind) {
                    orders.insert(event.order_id.as_str(), order.encode_to_vec().as_slice())?;
                    moved.push(event.order_id.clone());
                }
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
    /// Folds one event of this stage's into `order`; `false` if it was known already.
    fn fold(&self, order: &mut Order, at: Option<prost_types::Timestamp>, kind: &Kind) -> bool {
        match (self.stage, kind) {
            ("stock", Kind::StockReserved(_)) => advance(order, OrderStatus::Reserved, at, "stock"),
            ("stock", Kind::OrderRejected(rejected)) => {
                order.rejections.clone_from(&rejected.lines);
                advance(order, OrderStatus::Rejected, at, "stock")
            }
            ("stock", Kind::StockReleased(_)) => {
                let first = order.stock_released_at.is_none();
                order.stock_released_at = at;
                first
            }
            ("invoice", Kind::InvoiceCreated(created)) => {
                if let Some(invoice) = &created.invoice {
                    order.invoice = Some(InvoiceSummary {
                        number: invoice.number,
                        total: invoice.total.clone(),
                        tax: invoice.tax.clone(),
                        payment_attempts: invoice.payment.as_ref().map_or(0, |p| p.attempts),
                    });
                }
                advance(order, OrderStatus::Invoiced, at, "invoice")
            }
            ("invoice", Kind::PaymentFailed(failed)) => {
                let why = match failed.reason() {
                    PaymentFailureReason::Declined => "payment declined",
                    _ => "payment gateway unavailable after every attempt",
                };
                order.failure_reason = format!(
                    "{why}: {} ({} attempts)",
                    failed.last_error, failed.attempts
                );
                advance(order, OrderStatus::PaymentFailed, at, "invoice")
            }
            ("notifier", Kind::CustomerNotified(_)) => {
                advance(order, OrderStatus::Notified, at, "notifier")
            }
            ("notifier", Kind::NotificationDeadLettered(dead)) => {
                if let Some(letter) = &dead.dead_letter {
                    order.failure_reason = format!(
                        "notification not delivered: {} ({})",
                        letter.reason, letter.last_error
                    );
                }
                advance(order, OrderStatus::DeadLettered, at, "notifier")
            }
            _ => false,
        }
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
    use super::*;

    fn ts(seconds: i64) -> Option<prost_types::Timestamp> {
        Some(prost_types::Timestamp { seconds, nanos: 0 })
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
        let path: Vec<_> = order.transitions.iter().map(|t| t.status()).collect();
        assert_eq!(
            path,
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
}
