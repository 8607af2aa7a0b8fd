//! The reservation: for each `OrderPlaced`, every line is reserved or none is.
//!
//! An order whose lines all fall in this shard is decided at once. One with lines in other shards
//! holds its own lines here and asks the other shards for theirs (`shards`), which decides it once
//! every answer is in.

use orderflow_proto::v1::{
    Event, HeldLine, LineRejection, Money, OrderLine, OrderRejected, RejectionReason, ReservedLine,
    StockItem, StockReserved, event::Kind,
};
use orderflow_runtime::{Apply, Entry, StoreError, Txn, follow_up, record_processed, telemetry};
use redb::ReadableTableMetadata;

use crate::{
    STAGE,
    items::{self, ITEMS},
    shards::{self, PENDING, Shards},
};

/// Applies `OrderPlaced` events of the orders whose home is this shard; ignores every other kind.
pub(crate) struct Reserver {
    pub(crate) shards: Shards,
}

impl Apply for Reserver {
    type Event = Event;
    type Prepared = ();

    fn apply(
        &self,
        txn: &mut Txn,
        entry: &Entry<Event>,
        prepared: &mut (),
    ) -> Result<(), StoreError> {
        self.apply_batch(txn, std::slice::from_ref(entry), prepared)
    }

    /// Reserves every order of the batch with the items table opened once, then appends what
    /// each order came to, in order.
    fn apply_batch(
        &self,
        txn: &mut Txn,
        entries: &[Entry<Event>],
        _: &mut (),
    ) -> Result<(), StoreError> {
        let mut outcomes = Vec::with_capacity(entries.len());
        let mut waiting = None;
        {
            let mut table = txn.redb().open_table(ITEMS)?;
            let mut pending = match self.shards.count {
                1 => None,
                _ => Some(txn.redb().open_table(PENDING)?),
            };
            for Entry { event, .. } in entries {
                let Some(Kind::OrderPlaced(placed)) = &event.kind else {
                    continue;
                };
                let span = telemetry::order_span(
                    STAGE,
                    "reserve stock",
                    &event.order_id,
                    &event.customer_id,
                    &event.trace_context,
                );
                let _entered = span.enter();
                if let Some(pending) = pending.as_mut()
                    && !self.shards.all_here(&placed.lines)
                {
                    span.record("outcome", "holding");
                    shards::request_holds(
                        self.shards,
                        &mut table,
                        pending,
                        event,
                        &placed.lines,
                        span.context(),
                        &mut outcomes,
                    )?;
                    continue;
                }
                let kind = match reserve(&mut table, &placed.lines)? {
                    Ok(held) => {
                        span.record("outcome", "reserved");
                        record_processed(STAGE, "reserved", event);
                        reserved(held)
                    }
                    Err(lines) => {
                        span.record("outcome", "rejected");
                        span.record("otel.status_description", describe_all(&lines).as_str());
                        record_processed(STAGE, "rejected", event);
                        Kind::OrderRejected(OrderRejected { lines })
                    }
                };
                outcomes.push(follow_up(event, span.context(), kind));
            }
            if let Some(pending) = &pending {
                waiting = Some(pending.len()?);
            }
        }
        for outcome in &outcomes {
            txn.append(outcome);
        }
        if let Some(waiting) = waiting {
            shards::report_waiting(txn, self.shards, waiting);
        }
        Ok(())
    }
}

/// `StockReserved` of the lines `held`.
pub(crate) fn reserved(held: Vec<HeldLine>) -> Kind {
    Kind::StockReserved(StockReserved {
        lines: held.into_iter().filter_map(|h| h.line).collect(),
    })
}

/// `KB-01: out of stock (2 of 3); …` — the rejected lines for spans and logs.
pub(crate) fn describe_all(lines: &[LineRejection]) -> String {
    lines.iter().map(describe).collect::<Vec<_>>().join("; ")
}

/// `KB-01: out of stock (2 of 3)` — a line's rejection for spans and logs.
fn describe(line: &LineRejection) -> String {
    let reason = match line.reason() {
        RejectionReason::UnknownSku => "unknown sku",
        RejectionReason::OutOfStock => "out of stock",
        RejectionReason::MixedCurrency => "mixed currency",
        RejectionReason::Unspecified => "unavailable",
    };
    format!(
        "{}: {reason} ({} of {})",
        line.sku, line.available, line.requested
    )
}

/// Every line held, or why each failing line could not be.
pub(crate) type Outcome = Result<Vec<HeldLine>, Vec<LineRejection>>;

/// Reserves every line in `table`, or changes nothing and says why each failing line failed.
pub(crate) fn reserve(
    table: &mut redb::Table<&'static str, &'static [u8]>,
    lines: &[OrderLine],
) -> Result<Outcome, StoreError> {
    let mut found: Vec<(u32, StockItem)> = Vec::with_capacity(lines.len());
    let mut rejections = Vec::new();
    for line in lines {
        let rejection = |reason: RejectionReason, available: u64| LineRejection {
            sku: line.sku.clone(),
            requested: line.quantity,
            available,
            reason: reason.into(),
        };
        match items::get(table, &line.sku)? {
            None => rejections.push(rejection(RejectionReason::UnknownSku, 0)),
            Some(item) if item.available < u64::from(line.quantity) => {
                rejections.push(rejection(RejectionReason::OutOfStock, item.available));
            }
            Some(item) => found.push((line.quantity, item)),
        }
    }
    if rejections.is_empty()
        && let Some(mixed) = mixed_currency(&found, |(quantity, item)| {
            Some((
                &item.sku,
                *quantity,
                item.available,
                item.unit_price.as_ref(),
            ))
        })
    {
        rejections = mixed;
    }
    if !rejections.is_empty() {
        return Ok(Err(rejections));
    }
    let mut held = Vec::with_capacity(found.len());
    for (quantity, mut item) in found {
        let available = item.available;
        item.available -= u64::from(quantity);
        item.reserved = item.reserved.saturating_add(u64::from(quantity));
        items::put(table, &item)?;
        held.push(HeldLine {
            line: Some(ReservedLine {
                sku: item.sku,
                name: item.name,
                quantity,
                unit_price: item.unit_price,
            }),
            available,
        });
    }
    Ok(Ok(held))
}

/// Every line rejected as `MIXED_CURRENCY` when `lines` are priced in more than one currency (no
/// single invoice can total them); `None` when they agree. `view` gives a line's sku, quantity,
/// units available and unit price.
pub(crate) fn mixed_currency<T>(
    lines: &[T],
    view: impl for<'a> Fn(&'a T) -> Option<(&'a String, u32, u64, Option<&'a Money>)>,
) -> Option<Vec<LineRejection>> {
    let currency =
        |line| view(line).and_then(|(_, _, _, price)| price.map(|p| p.currency.as_str()));
    let first = lines.first().map(currency)?;
    if lines.iter().all(|line| currency(line) == first) {
        return None;
    }
    Some(
        lines
            .iter()
            .filter_map(|line| {
                let (sku, requested, available, _) = view(line)?;
                Some(LineRejection {
                    sku: sku.clone(),
                    requested,
                    available,
                    reason: RejectionReason::MixedCurrency.into(),
                })
            })
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use orderflow_runtime::Store;

    use super::*;

    fn item(sku: &str, currency: &str, available: u64) -> StockItem {
        StockItem {
            sku: sku.into(),
            name: sku.to_lowercase(),
            unit_price: Some(Money::new(100, currency)),
            available,
            reserved: 0,
        }
    }

    fn line(sku: &str, quantity: u32) -> OrderLine {
        OrderLine {
            sku: sku.into(),
            quantity,
        }
    }

    /// Runs `lines` against a fresh table holding `stock`; returns the outcome and the stock after.
    fn run(stock: &[StockItem], lines: &[OrderLine]) -> (Outcome, Vec<(String, u64, u64)>) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("s.redb")).unwrap();
        store
            .write(|txn| {
                let mut table = txn.redb().open_table(ITEMS)?;
                for i in stock {
                    items::put(&mut table, i)?;
                }
                let outcome = reserve(&mut table, lines)?;
                let after = stock
                    .iter()
                    .map(|i| {
                        let now = items::get(&table, &i.sku).unwrap().unwrap();
                        (now.sku, now.available, now.reserved)
                    })
                    .collect();
                Ok::<_, StoreError>((outcome, after))
            })
            .unwrap()
    }

    #[test]
    fn reserves_all_lines() {
        let (outcome, after) = run(
            &[item("A", "EUR", 5), item("B", "EUR", 1)],
            &[line("A", 5), line("B", 1)],
        );
        assert_eq!(outcome.unwrap().len(), 2);
        assert_eq!(after, vec![("A".into(), 0, 5), ("B".into(), 0, 1)]);
    }

    #[test]
    fn one_bad_line_reserves_nothing_and_each_reason_is_given() {
        let (outcome, after) = run(
            &[item("A", "EUR", 5), item("B", "EUR", 1)],
            &[line("A", 2), line("B", 2), line("Z", 1)],
        );
        let reasons: Vec<_> = outcome
            .unwrap_err()
            .into_iter()
            .map(|r| (r.reason(), r.sku, r.available))
            .collect();
        assert_eq!(
            reasons,
            vec![
                (RejectionReason::OutOfStock, "B".into(), 1),
                (RejectionReason::UnknownSku, "Z".into(), 0)
            ]
        );
        assert_eq!(after, vec![("A".into(), 5, 0), ("B".into(), 1, 0)]);
    }

    #[test]
    fn mixed_currencies_are_rejected() {
        let (outcome, after) = run(
            &[item("A", "EUR", 5), item("B", "USD", 5)],
            &[line("A", 1), line("B", 1)],
        );
        assert!(
            outcome
                .unwrap_err()
                .iter()
                .all(|r| r.reason() == RejectionReason::MixedCurrency)
        );
        assert_eq!(after, vec![("A".into(), 5, 0), ("B".into(), 5, 0)]);
    }
}
