//! Turning stock events into invoices.
//!
//! Tables: `invoices` (number → encoded `Invoice`), `invoice_by_order` (order id → number) and
//! `invoice_counter` (`next` → the number the next invoice gets). All three move in the batch's one
//! transaction, with the consumed offset, so numbers are gap-free and never reused across crashes.

use orderflow_proto::v1::{Invoice, InvoiceCreated, LogEntry, event::Kind};
use orderflow_runtime::{Apply, Store, StoreError, Txn, follow_up, now_timestamp};
use prost::Message;
use redb::{ReadableTable, TableDefinition};

use crate::pricing::price;

pub(crate) const INVOICES: TableDefinition<u64, &[u8]> = TableDefinition::new("invoices");
pub(crate) const INVOICES_NAME: &str = "invoices";
pub(crate) const BY_ORDER: TableDefinition<&str, u64> = TableDefinition::new("invoice_by_order");
const COUNTER: TableDefinition<&str, u64> = TableDefinition::new("invoice_counter");
const NEXT_NUMBER: &str = "next";

/// Creates the tables so that queries on a new store find them empty.
pub(crate) fn create_tables(store: &Store) -> Result<(), StoreError> {
    store.write(|txn| {
        txn.redb().open_table(INVOICES)?;
        txn.redb().open_table(BY_ORDER)?;
        txn.redb().open_table(COUNTER)?;
        Ok(())
    })
}

/// Invoices `StockReserved`, passes `OrderRejected` on, ignores the rest.
pub(crate) struct InvoiceCreator {
    pub tax_rate_bps: u32,
}

impl Apply for InvoiceCreator {
    fn apply(&self, txn: &mut Txn, entry: &LogEntry) -> Result<(), StoreError> {
        let Some(event) = &entry.event else {
            return Ok(());
        };
        match &event.kind {
            Some(Kind::StockReserved(reserved)) => {
                let invoice = {
                    let mut by_order = txn.redb().open_table(BY_ORDER)?;
                    if by_order.get(event.order_id.as_str())?.is_some() {
                        // Already invoiced: an upstream duplicate must not bill twice.
                        tracing::warn!(order_id = %event.order_id, "duplicate reservation ignored");
                        return Ok(());
                    }
                    let mut counter = txn.redb().open_table(COUNTER)?;
                    let number = counter.get(NEXT_NUMBER)?.map_or(1, |v| v.value());
                    counter.insert(NEXT_NUMBER, number + 1)?;
                    let priced = price(&reserved.lines, self.tax_rate_bps);
                    let invoice = Invoice {
                        number,
                        order_id: event.order_id.clone(),
                        customer_id: event.customer_id.clone(),
                        lines: priced.lines,
                        subtotal: Some(priced.subtotal),
                        tax_rate_bps: self.tax_rate_bps,
                        tax: Some(priced.tax),
                        total: Some(priced.total),
                        created_at: Some(now_timestamp()),
                    };
                    by_order.insert(event.order_id.as_str(), number)?;
                    txn.redb()
                        .open_table(INVOICES)?
                        .insert(number, invoice.encode_to_vec().as_slice())?;
                    invoice
                };
                txn.append(&follow_up(
                    event,
                    Kind::InvoiceCreated(InvoiceCreated {
                        invoice: Some(invoice),
                    }),
                ));
            }
            Some(Kind::OrderRejected(rejected)) => {
                txn.append(&follow_up(event, Kind::OrderRejected(rejected.clone())));
            }
            _ => {}
        }
        Ok(())
    }
}
