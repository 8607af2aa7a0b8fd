//! Compensation: a payment that failed gives its reservation back.
//!
//! The stock stage also consumes the invoice stage's log. For each `PaymentFailed` it returns every
//! reserved line to `available` (and takes it off `reserved`) and appends `StockReleased`, in the
//! batch's one transaction with the consumed invoice offset — so a reservation is given back exactly
//! once, whatever crashes in between. With several shards, the lines of other shards go back
//! there: a `HoldReleased` per shard in the same transaction (`shards`).

use std::collections::BTreeMap;

use orderflow_proto::v1::{Event, HoldReleased, ReservedLine, StockReleased, event::Kind};
use orderflow_runtime::{
    Apply, Decode, Entry, EventFilter, Skipped, StoreError, Txn, follow_up, record_processed,
    telemetry,
};
use prost::Message;

use crate::{
    STAGE,
    items::{self, ITEMS},
    shards::Shards,
};

/// Applies `PaymentFailed` events of the invoice log; ignores every other kind.
pub(crate) struct Releaser {
    pub(crate) shards: Shards,
}

/// An invoice-log event as the stock stage reads it: decoded whole only when it is a
/// `PaymentFailed`, which is rare; every invoice created is looked at no further than its kind.
#[derive(Debug, Default, PartialEq)]
pub(crate) struct InvoiceLogEvent(Option<Event>);

/// Just enough of an `Event` to tell a `PaymentFailed` (field 15 of the `kind` oneof) from the
/// rest; every other field is skipped unread.
#[derive(Clone, PartialEq, prost::Message)]
struct KindProbe {
    #[prost(message, optional, tag = "15")]
    payment_failed: Option<Skipped>,
}

impl Decode for InvoiceLogEvent {
    fn decode_event(bytes: &[u8]) -> Result<Self, prost::DecodeError> {
        if KindProbe::decode(bytes)?.payment_failed.is_none() {
            return Ok(InvoiceLogEvent(None));
        }
        Event::decode(bytes).map(|event| InvoiceLogEvent(Some(event)))
    }
}

impl Apply for Releaser {
    type Event = InvoiceLogEvent;
    type Prepared = ();

    /// Every event but a failed payment: nearly all of the invoice log.
    fn ignores(&self, event: &InvoiceLogEvent) -> bool {
        event.0.is_none()
    }

    /// Only failed payments are sent, not the whole invoice log.
    fn filter(&self) -> Option<EventFilter> {
        Some(EventFilter::kinds(&["payment_failed"]))
    }

    fn apply(
        &self,
        txn: &mut Txn,
        entry: &Entry<InvoiceLogEvent>,
        _: &mut (),
    ) -> Result<(), StoreError> {
        let Some(event) = &entry.event.0 else {
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
        // Each line goes back in its shard: this one's here, the others' through this log.
        let mut elsewhere: BTreeMap<u32, Vec<ReservedLine>> = BTreeMap::new();
        let mut here = Vec::new();
        for line in &failed.lines {
            match self.shards.of(&line.sku) {
                shard if shard == self.shards.me => here.push(line.clone()),
                shard => elsewhere.entry(shard).or_default().push(line.clone()),
            }
        }
        {
            let mut table = txn.redb().open_table(ITEMS)?;
            items::give_back(&mut table, &event.order_id, &here)?;
        }
        span.record("outcome", "released");
        record_processed(STAGE, "released", event);
        let context = span.context();
        for (shard, lines) in elsewhere {
            txn.append(&follow_up(
                event,
                context.clone(),
                Kind::HoldReleased(HoldReleased { shard, lines }),
            ));
        }
        txn.append(&follow_up(
            event,
            context,
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

    use orderflow_proto::v1::{
        Event, Invoice, InvoiceCreated, Money, PaymentFailed, ReservedLine, StockItem,
    };
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
        let failed = Event {
            order_id: "o1".into(),
            trace_context: [("traceparent".to_owned(), "00-ab-cd-01".to_owned())].into(),
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
        };
        // As the subscription hands it over: decoded from the bytes the invoice log holds.
        let entry = Entry {
            offset: 0,
            event: InvoiceLogEvent::decode_event(&failed.encode_to_vec()).unwrap(),
        };
        assert_eq!(entry.event, InvoiceLogEvent(Some(failed)));
        store
            .write(|txn| {
                Releaser {
                    shards: Shards { me: 0, count: 1 },
                }
                .apply(txn, &entry, &mut ())
            })
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

    #[test]
    fn every_other_invoice_event_is_read_no_further_than_its_kind() {
        let created = Event {
            order_id: "o2".into(),
            kind: Some(Kind::InvoiceCreated(InvoiceCreated {
                invoice: Some(Invoice {
                    number: 7,
                    ..Default::default()
                }),
            })),
            ..Default::default()
        };
        for event in [created, Event::default()] {
            let decoded = InvoiceLogEvent::decode_event(&event.encode_to_vec()).unwrap();
            assert_eq!(decoded, InvoiceLogEvent(None));
        }
        assert!(InvoiceLogEvent::decode_event(&[0x7a, 0x05, 0x01]).is_err());
    }
}
