//! Compensation: a payment that failed gives its reservation back.
//!
//! The stock stage also consumes the invoice stage's log. For each `PaymentFailed` it returns every
//! reserved line to `available` (and takes it off `reserved`) and appends `StockReleased`, in the
//! batch's one transaction with the consumed invoice offset — so a reservation is given back exactly
//! once, whatever crashes in between.

use orderflow_proto::v1::{LogEntry, StockReleased, event::Kind};
use orderflow_runtime::{Apply, StoreError, Txn, follow_up, record_processed, telemetry};

use crate::{
    STAGE,
    items::{self, ITEMS},
};

/// Applies `PaymentFailed` events of the invoice log; ignores every other kind.
pub(crate) struct Releaser;

impl Apply for Releaser {
    type Prepared = ();

    fn apply(&self, txn: &mut Txn, entry: &LogEntry, _: &mut ()) -> Result<(), StoreError> {
        let Some(event) = &entry.event else {
            return Ok(());
        };
        let Some(Kind::PaymentFailed(failed)) = &event.kind else {
            return Ok(());
        };
        let span = telemetry::order_span(
            STAGE,
            "release stock",
            &event.order_id,
            &event.customer_id,
            &event.trace_context,
        );
        let _entered = span.enter();
        {
            let mut table = txn.redb().open_table(ITEMS)?;
            for line in &failed.lines {
                let Some(mut item) = items::get(&table, &line.sku)? else {
                    tracing::warn!(order_id = %event.order_id, sku = %line.sku, "released line has no catalog item; skipped");
                    continue;
                };
                let quantity = u64::from(line.quantity);
                item.available = item.available.saturating_add(quantity);
                item.reserved = item.reserved.saturating_sub(quantity);
                items::put(&mut table, &item)?;
            }
        }
        span.record("outcome", "released");
        record_processed(STAGE, "released", event);
        txn.append(&follow_up(
            event,
            span.context(),
            Kind::StockReleased(StockReleased {
                lines: failed.lines.clone(),
            }),
        ));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use orderflow_proto::v1::{Event, Money, PaymentFailed, ReservedLine, StockItem};
    use orderflow_runtime::Store;

    use super::*;

    #[test]
    fn a_failed_payment_gives_its_lines_back() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("s.redb")).unwrap();
        store
            .write(|txn| {
                let mut table = txn.redb().open_table(ITEMS)?;
                items::put(
                    &mut table,
                    &StockItem {
                        sku: "A".into(),
                        name: "a".into(),
                        unit_price: Some(Money::new(100, "EUR")),
                        available: 3,
                        reserved: 7,
                    },
                )
            })
            .unwrap();
        let failed = LogEntry {
            offset: 0,
            event: Some(Event {
                order_id: "o1".into(),
                kind: Some(Kind::PaymentFailed(PaymentFailed {
                    lines: vec![
                        ReservedLine {
                            sku: "A".into(),
                            quantity: 5,
                            ..Default::default()
                        },
                        ReservedLine {
                            sku: "GONE".into(),
                            quantity: 1,
                            ..Default::default()
                        },
                    ],
                    ..Default::default()
                })),
                ..Default::default()
            }),
        };
        store
            .write(|txn| Releaser.apply(txn, &failed, &mut ()))
            .unwrap();
        let item = store
            .read(|read| items::get(&read.open_table(ITEMS)?, "A"))
            .unwrap()
            .unwrap();
        assert_eq!((item.available, item.reserved), (8, 2));
        let released = store.outbox().read_log(0, 10, usize::MAX).unwrap();
        assert!(matches!(
            released[0].decode_event().unwrap().kind,
            Some(Kind::StockReleased(r)) if r.lines.len() == 2
        ));
    }
}
