//! Every table of the notifier's store, in one place (the retry queue names its own
//! `delivery.pending`).
//!
//! - `notifications`: id (the offset of the event that ended the order) → encoded `Notification`,
//!   written when a delivery settles.
//! - `notification_by_order`: order id → notification id.
//! - `dead_letters` (the runtime's): deliveries that failed for good.
//! - `dead_letter_tasks`: dead letter id → encoded `DeliveryTask`, what a replay delivers.
//! - `dead_letter_by_order`: order id → dead letter id.

use orderflow_runtime::{StoreError, Txn, dead_letters};
use redb::TableDefinition;

pub(crate) const NOTIFICATIONS: TableDefinition<u64, &[u8]> =
    TableDefinition::new(NOTIFICATIONS_NAME);
pub(crate) const NOTIFICATIONS_NAME: &str = "notifications";
pub(crate) const BY_ORDER: TableDefinition<&str, u64> =
    TableDefinition::new("notification_by_order");
pub(crate) const DEAD_LETTER_TASKS: TableDefinition<u64, &[u8]> =
    TableDefinition::new("dead_letter_tasks");
pub(crate) const DEAD_LETTER_BY_ORDER: TableDefinition<&str, u64> =
    TableDefinition::new("dead_letter_by_order");

/// Creates the stage's tables, so queries on a new store find them empty.
pub(crate) fn create(txn: &mut Txn) -> Result<(), StoreError> {
    txn.redb().open_table(NOTIFICATIONS)?;
    txn.redb().open_table(BY_ORDER)?;
    dead_letters::create_table(txn)?;
    txn.redb().open_table(DEAD_LETTER_TASKS)?;
    txn.redb().open_table(DEAD_LETTER_BY_ORDER)?;
    Ok(())
}
