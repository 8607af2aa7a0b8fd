//! Every table of the invoice stage's store, in one place (the simulated gateway's ledger keeps its
//! own, in `gateway`; the retry queues name theirs `payment.pending` and `refund.pending`).
//!
//! - `invoices`: invoice number → encoded `Invoice`, written when a payment is captured.
//! - `invoice_by_order`: order id → invoice number.
//! - `invoice_counter`: the next invoice number, moved in the same transaction as the invoice.
//! - `payment_failed_by_order`: order id → dead letter id, for orders whose payment failed.
//! - `dead_letters` (the runtime's): failed payments and what their refund came to.

use orderflow_runtime::{StoreError, Txn, dead_letters};
use redb::TableDefinition;

pub(crate) const INVOICES: TableDefinition<u64, &[u8]> = TableDefinition::new(INVOICES_NAME);
pub(crate) const INVOICES_NAME: &str = "invoices";
pub(crate) const BY_ORDER: TableDefinition<&str, u64> = TableDefinition::new("invoice_by_order");
pub(crate) const COUNTER: TableDefinition<&str, u64> = TableDefinition::new("invoice_counter");
/// The one key of [`COUNTER`].
pub(crate) const NEXT_NUMBER: &str = "next";
pub(crate) const FAILED_BY_ORDER: TableDefinition<&str, u64> =
    TableDefinition::new("payment_failed_by_order");

/// Creates the stage's tables, so queries on a new store find them empty.
pub(crate) fn create(txn: &mut Txn) -> Result<(), StoreError> {
    txn.redb().open_table(INVOICES)?;
    txn.redb().open_table(BY_ORDER)?;
    txn.redb().open_table(COUNTER)?;
    txn.redb().open_table(FAILED_BY_ORDER)?;
    dead_letters::create_table(txn)
}
