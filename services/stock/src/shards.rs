//! Stock sharded by sku: with P partitions, the sku's shard is `home_partition(sku, P)`, and an
//! item changes only in its shard's serial transactions, so no sku can be oversold.
//!
//! An order lives in its home partition (its customer's). When its lines fall in other shards too,
//! the home shard reserves it in three steps, each one transaction with the offset it consumed:
//!
//! 1. **Hold** (home, `OrderPlaced`): hold the home shard's own lines (all or none), record the
//!    order as pending ([`PENDING`]) and append a `HoldRequested` per other shard to its log.
//! 2. **Answer** (each other shard, reading the home shard's log): hold that shard's lines (all or
//!    none) and append `HoldAnswered`, held or refused with a reason per failing line.
//! 3. **Decide** (home, reading the answering shards' logs): once every answer is in, either
//!    `StockReserved` with every line, or `OrderRejected` with every failing line's reason and
//!    every hold given back (its own at once, the others' by `HoldReleased`).
//!
//! A failed payment gives each line back in its own shard the same way (`release`). Every log is
//! consumed exactly once, so no hold is taken, answered or given back twice, whatever crashes in
//! between, and no hold outlives its order's decision. A hold never waits for anything: a shard
//! answers at once, so shards cannot deadlock; an order that meets another's hold on the last
//! units is rejected as out of stock, like an order that meets a reservation.

use std::collections::{BTreeMap, HashMap};

use orderflow_proto::v1::{
    Event, HeldLine, HoldAnswered, HoldReleased, HoldRequested, OrderLine, OrderRejected,
    ReservedLine, event::Kind,
};
use orderflow_runtime::{
    Apply, Decode, Entry, EventFilter, Skipped, StoreError, Txn, decode_record, follow_up,
    home_partition, metrics as names, record_processed, telemetry,
};
use prost::Message;
use redb::{ReadableTable, ReadableTableMetadata, Table, TableDefinition};

use crate::{
    STAGE,
    items::{self, ITEMS},
    reserve::{self, describe_all, mixed_currency},
};

/// Orders this shard is the home of whose holds are not all answered: order id → encoded
/// [`PendingOrder`]. Empty whenever the pipeline is quiet.
pub(crate) const PENDING: TableDefinition<&str, &[u8]> = TableDefinition::new("pending_orders");
const PENDING_NAME: &str = "pending_orders";

/// The shard of `sku` among `count`.
pub(crate) fn shard_of(sku: &str, count: u32) -> u32 {
    home_partition(sku, count)
}

/// Which shard holds each sku, and which one this store is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Shards {
    pub(crate) me: u32,
    pub(crate) count: u32,
}

impl Shards {
    /// The shard of `sku`.
    pub(crate) fn of(&self, sku: &str) -> u32 {
        shard_of(sku, self.count)
    }

    /// Whether every line of `lines` falls in this shard.
    pub(crate) fn all_here(&self, lines: &[OrderLine]) -> bool {
        self.count == 1 || lines.iter().all(|line| self.of(&line.sku) == self.me)
    }

    /// The other shards, ascending.
    pub(crate) fn others(&self) -> impl Iterator<Item = u32> + use<> {
        let me = self.me;
        (0..self.count).filter(move |shard| *shard != me)
    }

    /// The consumer name under which `shard` reads the other shards' logs.
    pub(crate) fn consumer(shard: u32) -> String {
        format!("{STAGE}-{shard}")
    }
}

/// An order waiting for the other shards' answers.
#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct PendingOrder {
    /// The `OrderPlaced` event, its trace context that of the home shard's span.
    #[prost(message, optional, tag = "1")]
    pub(crate) placed: Option<Event>,
    /// The shards whose answer is still awaited.
    #[prost(uint32, repeated, tag = "2")]
    pub(crate) awaited: Vec<u32>,
    /// The lines held so far, in every shard.
    #[prost(message, repeated, tag = "3")]
    pub(crate) held: Vec<HeldLine>,
    /// The lines refused so far, with their reasons.
    #[prost(message, repeated, tag = "4")]
    pub(crate) refused: Vec<orderflow_proto::v1::LineRejection>,
}

/// Step 1: holds the lines of `event` (an order whose lines fall in several shards) that fall in
/// this one, records the order as pending and asks every other shard for its lines (`outcomes`).
pub(crate) fn request_holds(
    shards: Shards,
    table: &mut Table<&'static str, &'static [u8]>,
    pending: &mut Table<&'static str, &'static [u8]>,
    event: &Event,
    lines: &[OrderLine],
    context: HashMap<String, String>,
    outcomes: &mut Vec<Event>,
) -> Result<(), StoreError> {
    let mut by_shard: BTreeMap<u32, Vec<OrderLine>> = BTreeMap::new();
    for line in lines {
        by_shard
            .entry(shards.of(&line.sku))
            .or_default()
            .push(line.clone());
    }
    let own = by_shard.remove(&shards.me).unwrap_or_default();
    let (held, refused) = match reserve::reserve(table, &own)? {
        Ok(held) => (held, Vec::new()),
        Err(refused) => (Vec::new(), refused),
    };
    let mut placed = event.clone();
    placed.trace_context = context.clone();
    let record = PendingOrder {
        placed: Some(placed),
        awaited: by_shard.keys().copied().collect(),
        held,
        refused,
    };
    pending.insert(event.order_id.as_str(), record.encode_to_vec().as_slice())?;
    for (shard, lines) in by_shard {
        outcomes.push(follow_up(
            event,
            context.clone(),
            Kind::HoldRequested(HoldRequested {
                shard,
                home: shards.me,
                lines,
            }),
        ));
    }
    Ok(())
}

/// Applies the other shards' logs to this one: holds asked of it, answers to its own requests,
/// and holds it is to give back. Every other event of those logs is read no further than its kind.
pub(crate) struct ShardTraffic {
    pub(crate) shards: Shards,
}

/// A stock-log event as another shard reads it: decoded whole only when it is shard traffic.
#[derive(Debug, Default, PartialEq)]
pub(crate) struct TrafficEvent(Option<Event>);

/// Just enough of an `Event` to tell shard traffic (fields 18–20 of the `kind` oneof) from the
/// rest.
#[derive(Clone, PartialEq, prost::Message)]
struct TrafficProbe {
    #[prost(message, optional, tag = "18")]
    hold_requested: Option<Skipped>,
    #[prost(message, optional, tag = "19")]
    hold_answered: Option<Skipped>,
    #[prost(message, optional, tag = "20")]
    hold_released: Option<Skipped>,
}

impl Decode for TrafficEvent {
    fn decode_event(bytes: &[u8]) -> Result<Self, prost::DecodeError> {
        let probe = TrafficProbe::decode(bytes)?;
        if probe.hold_requested.is_none()
            && probe.hold_answered.is_none()
            && probe.hold_released.is_none()
        {
            return Ok(TrafficEvent(None));
        }
        Event::decode(bytes).map(|event| TrafficEvent(Some(event)))
    }
}

impl Apply for ShardTraffic {
    type Event = TrafficEvent;
    type Prepared = ();

    /// Everything not addressed to this shard: the other shard's own reservations, and the holds
    /// it asks of (or answers to, or releases at) a third one.
    fn ignores(&self, event: &TrafficEvent) -> bool {
        let me = self.shards.me;
        match event.0.as_ref().and_then(|event| event.kind.as_ref()) {
            Some(Kind::HoldRequested(request)) => request.shard != me,
            Some(Kind::HoldAnswered(answer)) => answer.home != me,
            Some(Kind::HoldReleased(release)) => release.shard != me,
            _ => true,
        }
    }

    /// Only what is addressed to this shard is sent, not the other shard's whole log.
    fn filter(&self) -> Option<EventFilter> {
        Some(
            EventFilter::kinds(&["hold_requested", "hold_answered", "hold_released"])
                .addressed_to(self.shards.me),
        )
    }

    fn apply(
        &self,
        txn: &mut Txn,
        entry: &Entry<TrafficEvent>,
        prepared: &mut (),
    ) -> Result<(), StoreError> {
        self.apply_batch(txn, std::slice::from_ref(entry), prepared)
    }

    fn apply_batch(
        &self,
        txn: &mut Txn,
        entries: &[Entry<TrafficEvent>],
        _: &mut (),
    ) -> Result<(), StoreError> {
        let me = self.shards.me;
        let mut appends = Vec::new();
        let waiting;
        {
            let mut table = txn.redb().open_table(ITEMS)?;
            let mut pending = txn.redb().open_table(PENDING)?;
            for event in entries.iter().filter_map(|entry| entry.event.0.as_ref()) {
                match &event.kind {
                    Some(Kind::HoldRequested(request)) if request.shard == me => {
                        appends.push(hold(&mut table, event, request)?);
                    }
                    Some(Kind::HoldAnswered(answer)) if answer.home == me => answered(
                        self.shards,
                        &mut table,
                        &mut pending,
                        event,
                        answer,
                        &mut appends,
                    )?,
                    Some(Kind::HoldReleased(release)) if release.shard == me => {
                        let span = telemetry::order_span(
                            STAGE,
                            "release hold",
                            &event.order_id,
                            &event.customer_id,
                            &event.trace_context,
                        );
                        let _entered = span.enter();
                        items::give_back(&mut table, &event.order_id, &release.lines)?;
                        span.record("outcome", "released");
                    }
                    _ => {}
                }
            }
            waiting = pending.len()?;
        }
        for event in &appends {
            txn.append(event);
        }
        report_waiting(txn, self.shards, waiting);
        Ok(())
    }
}

/// Sets the gauge of orders waiting for other shards' answers once `txn` has committed.
pub(crate) fn report_waiting(txn: &mut Txn, shards: Shards, waiting: u64) {
    txn.after_commit(move || {
        metrics::gauge!(
            names::PENDING_WORK,
            "stage" => STAGE,
            "work" => "holds",
            "partition" => shards.me.to_string()
        )
        .set(waiting as f64);
    });
}

/// Step 2: holds the lines `request` asks of this shard, or none, and says which.
fn hold(
    table: &mut Table<&'static str, &'static [u8]>,
    event: &Event,
    request: &HoldRequested,
) -> Result<Event, StoreError> {
    let span = telemetry::order_span(
        STAGE,
        "hold stock",
        &event.order_id,
        &event.customer_id,
        &event.trace_context,
    );
    let _entered = span.enter();
    let (held, refused) = match reserve::reserve(table, &request.lines)? {
        Ok(held) => {
            span.record("outcome", "held");
            record_processed(STAGE, "held", event);
            (held, Vec::new())
        }
        Err(refused) => {
            span.record("outcome", "refused");
            record_processed(STAGE, "refused", event);
            span.record("otel.status_description", describe_all(&refused).as_str());
            (Vec::new(), refused)
        }
    };
    Ok(follow_up(
        event,
        span.context(),
        Kind::HoldAnswered(HoldAnswered {
            shard: request.shard,
            home: request.home,
            held,
            refused,
        }),
    ))
}

/// Step 3: records one shard's answer; once every answer is in, decides the order.
fn answered(
    shards: Shards,
    table: &mut Table<&'static str, &'static [u8]>,
    pending: &mut Table<&'static str, &'static [u8]>,
    event: &Event,
    answer: &HoldAnswered,
    appends: &mut Vec<Event>,
) -> Result<(), StoreError> {
    let id = event.order_id.as_str();
    let record = match pending.get(id)? {
        Some(bytes) => Some(decode_record::<PendingOrder>(
            PENDING_NAME,
            id,
            bytes.value(),
        )?),
        None => None,
    };
    let Some(mut record) = record.filter(|r| r.awaited.contains(&answer.shard)) else {
        // Cannot happen while every log is consumed exactly once; if it ever does, nothing the
        // answer holds stays held.
        tracing::warn!(order_id = %id, shard = answer.shard, "an answer to no pending hold; giving back what it holds");
        let lines: Vec<ReservedLine> = answer.held.iter().filter_map(|h| h.line.clone()).collect();
        if !lines.is_empty() {
            appends.push(follow_up(
                event,
                event.trace_context.clone(),
                Kind::HoldReleased(HoldReleased {
                    shard: answer.shard,
                    lines,
                }),
            ));
        }
        return Ok(());
    };
    record.awaited.retain(|shard| *shard != answer.shard);
    record.held.extend(answer.held.iter().cloned());
    record.refused.extend(answer.refused.iter().cloned());
    if !record.awaited.is_empty() {
        pending.insert(id, record.encode_to_vec().as_slice())?;
        return Ok(());
    }
    pending.remove(id)?;
    decide(shards, table, record, appends)
}

/// Every line reserved, or none: rejected with each failing line's reason, every hold given back.
fn decide(
    shards: Shards,
    table: &mut Table<&'static str, &'static [u8]>,
    record: PendingOrder,
    appends: &mut Vec<Event>,
) -> Result<(), StoreError> {
    let PendingOrder {
        placed,
        held,
        mut refused,
        ..
    } = record;
    let Some(placed) = placed else {
        return Ok(());
    };
    let span = telemetry::order_span(
        STAGE,
        "decide reservation",
        &placed.order_id,
        &placed.customer_id,
        &placed.trace_context,
    );
    let _entered = span.enter();
    // Lines in the order the customer gave them.
    let position = |sku: &str| match &placed.kind {
        Some(Kind::OrderPlaced(order)) => order
            .lines
            .iter()
            .position(|line| line.sku == sku)
            .unwrap_or(usize::MAX),
        _ => usize::MAX,
    };
    if refused.is_empty()
        && let Some(mixed) = mixed_currency(&held, |h| {
            h.line
                .as_ref()
                .map(|l| (&l.sku, l.quantity, h.available, l.unit_price.as_ref()))
        })
    {
        refused = mixed;
    }
    if refused.is_empty() {
        let mut held = held;
        held.sort_by_key(|h| h.line.as_ref().map_or(usize::MAX, |l| position(&l.sku)));
        span.record("outcome", "reserved");
        record_processed(STAGE, "reserved", &placed);
        appends.push(follow_up(&placed, span.context(), reserve::reserved(held)));
        return Ok(());
    }
    let mut back: BTreeMap<u32, Vec<ReservedLine>> = BTreeMap::new();
    for line in held.into_iter().filter_map(|h| h.line) {
        back.entry(shards.of(&line.sku)).or_default().push(line);
    }
    for (shard, lines) in back {
        if shard == shards.me {
            items::give_back(table, &placed.order_id, &lines)?;
        } else {
            appends.push(follow_up(
                &placed,
                span.context(),
                Kind::HoldReleased(HoldReleased { shard, lines }),
            ));
        }
    }
    refused.sort_by_key(|line| position(&line.sku));
    span.record("outcome", "rejected");
    span.record("otel.status_description", describe_all(&refused).as_str());
    record_processed(STAGE, "rejected", &placed);
    appends.push(follow_up(
        &placed,
        span.context(),
        Kind::OrderRejected(OrderRejected { lines: refused }),
    ));
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use orderflow_proto::v1::{
        LineRejection, Money, OrderPlaced, PaymentFailed, RejectionReason, StockItem,
    };
    use orderflow_runtime::{Partition, Store};

    use super::*;
    use crate::{release::Releaser, reserve::Reserver};

    /// Three shards' stores, and how far each has read every other's log.
    struct Stock {
        _dir: tempfile::TempDir,
        stores: Vec<Store>,
        read: Vec<Vec<u64>>,
    }

    const COUNT: u32 = 3;

    /// A sku of `shard`, the `n`th one.
    fn sku(shard: u32, n: usize) -> String {
        (0..)
            .map(|i| format!("SKU-{i}"))
            .filter(|sku| shard_of(sku, COUNT) == shard)
            .nth(n)
            .unwrap()
    }

    fn shards(me: u32) -> Shards {
        Shards { me, count: COUNT }
    }

    impl Stock {
        /// Three shards; `items` (sku, currency, available) each in its shard.
        fn new(items: &[(String, &str, u64)]) -> Stock {
            let dir = tempfile::tempdir().unwrap();
            let stores: Vec<Store> = (0..COUNT)
                .map(|index| {
                    let partition = Partition {
                        index,
                        count: COUNT,
                    };
                    Store::open_partition(
                        &dir.path().join(format!("stock-{index}.redb")),
                        partition,
                        1 << 20,
                    )
                    .unwrap()
                })
                .collect();
            for (sku, currency, available) in items {
                stores[shard_of(sku, COUNT) as usize]
                    .write(|txn| {
                        items::put(
                            &mut txn.redb().open_table(ITEMS)?,
                            &StockItem {
                                sku: sku.clone(),
                                name: sku.to_lowercase(),
                                unit_price: Some(Money::new(100, *currency)),
                                available: *available,
                                reserved: 0,
                            },
                        )
                    })
                    .unwrap();
            }
            Stock {
                _dir: dir,
                stores,
                read: vec![vec![0; COUNT as usize]; COUNT as usize],
            }
        }

        /// `(available, reserved)` of `sku` in its shard.
        fn level(&self, sku: &str) -> (u64, u64) {
            let item = self.stores[shard_of(sku, COUNT) as usize]
                .read(|read| items::get(&read.open_table(ITEMS)?, sku))
                .unwrap()
                .unwrap();
            (item.available, item.reserved)
        }

        fn pending(&self) -> u64 {
            self.stores
                .iter()
                .map(|store| {
                    store
                        .read(|read| Ok::<_, StoreError>(read.open_table(PENDING)?.len()?))
                        .unwrap()
                })
                .sum()
        }

        /// Delivers every shard's log to every other shard until no shard has anything new.
        fn settle(&mut self) {
            loop {
                let mut moved = false;
                for reader in 0..COUNT as usize {
                    for source in (0..COUNT as usize).filter(|s| *s != reader) {
                        let from = self.read[reader][source];
                        let entries: Vec<Entry<TrafficEvent>> = self.stores[source]
                            .outbox()
                            .read_log(from, 1000, usize::MAX)
                            .unwrap()
                            .into_iter()
                            .map(|e| Entry {
                                offset: e.offset,
                                event: TrafficEvent::decode_event(&e.event).unwrap(),
                            })
                            .collect();
                        if entries.is_empty() {
                            continue;
                        }
                        moved = true;
                        self.read[reader][source] = from + entries.len() as u64;
                        let traffic = ShardTraffic {
                            shards: shards(reader as u32),
                        };
                        self.stores[reader]
                            .write(|txn| traffic.apply_batch(txn, &entries, &mut ()))
                            .unwrap();
                    }
                }
                if !moved {
                    return;
                }
            }
        }

        /// Every event shard `shard` logged, decoded.
        fn log(&self, shard: usize) -> Vec<Event> {
            self.stores[shard]
                .outbox()
                .read_log(0, 1000, usize::MAX)
                .unwrap()
                .iter()
                .map(|e| e.decode_event().unwrap())
                .collect()
        }

        /// Places an order of `lines` at home shard 0 and lets the shards settle; returns the
        /// decision shard 0 logged.
        fn place(&mut self, id: &str, lines: &[(&str, u32)]) -> Kind {
            let event = Event {
                order_id: id.into(),
                kind: Some(Kind::OrderPlaced(OrderPlaced {
                    lines: lines
                        .iter()
                        .map(|(sku, quantity)| OrderLine {
                            sku: (*sku).into(),
                            quantity: *quantity,
                        })
                        .collect(),
                })),
                ..Default::default()
            };
            let entry = Entry { offset: 0, event };
            let reserver = Reserver { shards: shards(0) };
            self.stores[0]
                .write(|txn| reserver.apply(txn, &entry, &mut ()))
                .unwrap();
            self.settle();
            self.log(0)
                .into_iter()
                .filter(|e| e.order_id == id)
                .filter_map(|e| e.kind)
                .rfind(|k| matches!(k, Kind::StockReserved(_) | Kind::OrderRejected(_)))
                .unwrap()
        }
    }

    #[test]
    fn an_order_across_shards_is_reserved_whole_in_the_customer_s_line_order() {
        let (a, b, c) = (sku(1, 0), sku(0, 0), sku(2, 0));
        let mut stock = Stock::new(&[
            (a.clone(), "EUR", 5),
            (b.clone(), "EUR", 5),
            (c.clone(), "EUR", 5),
        ]);
        let Kind::StockReserved(reserved) = stock.place("o1", &[(&a, 2), (&b, 3), (&c, 5)]) else {
            panic!("not reserved");
        };
        let lines: Vec<(&str, u32)> = reserved
            .lines
            .iter()
            .map(|l| (l.sku.as_str(), l.quantity))
            .collect();
        assert_eq!(lines, [(a.as_str(), 2), (b.as_str(), 3), (c.as_str(), 5)]);
        assert_eq!(stock.level(&a), (3, 2));
        assert_eq!(stock.level(&b), (2, 3));
        assert_eq!(stock.level(&c), (0, 5));
        assert_eq!(stock.pending(), 0);
    }

    #[test]
    fn one_failing_line_in_any_shard_rejects_the_order_and_every_hold_goes_back() {
        let (a, b, c) = (sku(1, 0), sku(0, 0), sku(2, 0));
        let mut stock = Stock::new(&[
            (a.clone(), "EUR", 5),
            (b.clone(), "EUR", 5),
            (c.clone(), "EUR", 1),
        ]);
        let unknown = sku(1, 1);
        let Kind::OrderRejected(rejected) =
            stock.place("o1", &[(&a, 2), (&b, 3), (&c, 2), (&unknown, 1)])
        else {
            panic!("not rejected");
        };
        let reasons: Vec<(RejectionReason, &str, u64)> = rejected
            .lines
            .iter()
            .map(|l| (l.reason(), l.sku.as_str(), l.available))
            .collect();
        assert_eq!(
            reasons,
            [
                (RejectionReason::OutOfStock, c.as_str(), 1),
                (RejectionReason::UnknownSku, unknown.as_str(), 0)
            ]
        );
        assert_eq!(stock.level(&a), (5, 0));
        assert_eq!(stock.level(&b), (5, 0));
        assert_eq!(stock.level(&c), (1, 0));
        assert_eq!(stock.pending(), 0);
        // The home shard's own failing line rejects the order just the same.
        let Kind::OrderRejected(rejected) = stock.place("o2", &[(&a, 1), (&b, 6)]) else {
            panic!("not rejected");
        };
        assert_eq!(rejected.lines.len(), 1);
        assert_eq!(stock.level(&a), (5, 0));
    }

    #[test]
    fn currencies_are_compared_across_shards() {
        let (a, b) = (sku(0, 0), sku(2, 0));
        let mut stock = Stock::new(&[(a.clone(), "EUR", 5), (b.clone(), "USD", 5)]);
        let Kind::OrderRejected(rejected) = stock.place("o1", &[(&a, 1), (&b, 1)]) else {
            panic!("not rejected");
        };
        assert!(
            rejected
                .lines
                .iter()
                .all(|l| l.reason() == RejectionReason::MixedCurrency)
        );
        assert_eq!(
            rejected
                .lines
                .iter()
                .map(|l| l.available)
                .collect::<Vec<_>>(),
            [5, 5]
        );
        assert_eq!((stock.level(&a), stock.level(&b)), ((5, 0), (5, 0)));
    }

    #[test]
    fn a_failed_payment_gives_every_shard_its_lines_back() {
        let (a, b) = (sku(0, 0), sku(1, 0));
        let mut stock = Stock::new(&[(a.clone(), "EUR", 5), (b.clone(), "EUR", 5)]);
        let Kind::StockReserved(reserved) = stock.place("o1", &[(&a, 2), (&b, 4)]) else {
            panic!("not reserved");
        };
        let failed = Event {
            order_id: "o1".into(),
            kind: Some(Kind::PaymentFailed(PaymentFailed {
                lines: reserved.lines,
                ..Default::default()
            })),
            ..Default::default()
        };
        let entry = Entry {
            offset: 0,
            event: crate::release::InvoiceLogEvent::decode_event(&failed.encode_to_vec()).unwrap(),
        };
        let releaser = Releaser { shards: shards(0) };
        stock.stores[0]
            .write(|txn| releaser.apply(txn, &entry, &mut ()))
            .unwrap();
        stock.settle();
        assert_eq!((stock.level(&a), stock.level(&b)), ((5, 0), (5, 0)));
    }

    /// An answer to an order that waits for none gives back whatever it holds.
    #[test]
    fn a_stray_answer_holds_nothing() {
        let a = sku(1, 0);
        let stock = Stock::new(&[(a.clone(), "EUR", 5)]);
        let held = |quantity| HeldLine {
            line: Some(ReservedLine {
                sku: a.clone(),
                quantity,
                ..Default::default()
            }),
            available: 5,
        };
        let stray = Event {
            order_id: "gone".into(),
            kind: Some(Kind::HoldAnswered(HoldAnswered {
                shard: 1,
                home: 0,
                held: vec![held(2)],
                refused: Vec::<LineRejection>::new(),
            })),
            ..Default::default()
        };
        let entry = Entry {
            offset: 0,
            event: TrafficEvent(Some(stray)),
        };
        stock.stores[0]
            .write(|txn| ShardTraffic { shards: shards(0) }.apply(txn, &entry, &mut ()))
            .unwrap();
        let released = stock.log(0).pop().unwrap();
        assert!(matches!(
            released.kind,
            Some(Kind::HoldReleased(HoldReleased { shard: 1, ref lines })) if lines.len() == 1
        ));
    }
}
