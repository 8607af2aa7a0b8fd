//! Partitions of the pipeline: which one a store holds, and the check that keeps a store with the
//! one partition count it was created with.
//!
//! The pipeline has P partitions (`--partitions`), fixed when its stores are created. Each
//! partition of a stage has its own store, so its own outbox, offsets and consumer positions, and
//! partition p of a stage consumes partition p of its upstream. A store records which partition it
//! holds in its `meta` table (`partition.index`, `partition.count`) in the transaction that creates
//! it, and refuses to open as any other: a stage started with another P, or for a partition the
//! store does not hold, would otherwise consume, renumber or retain the wrong entries.

use redb::{ReadableTable, WriteTransaction};

use crate::store::{META, StoreError};

/// Upper bound on `--partitions`: far beyond what one pipeline needs, low enough that a typo does not
/// make thousands of stores.
pub const MAX_PARTITIONS: u32 = 1024;

/// `meta` keys of the partition a store holds.
const INDEX_KEY: &str = "partition.index";
const COUNT_KEY: &str = "partition.count";

/// Partition `index` of a pipeline with `count` partitions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Partition {
    pub index: u32,
    pub count: u32,
}

impl Partition {
    /// The one partition of a pipeline that has one: the whole pipeline.
    pub const ONLY: Partition = Partition { index: 0, count: 1 };
}

/// The partition of `count` that `key` (an order's customer id, a SKU) belongs to: FNV-1a (64-bit)
/// of its bytes, mod `count`. Fixed forever: every replica of every version must agree, since it
/// says where an order and its idempotency keys live.
pub fn home_partition(key: &str, count: u32) -> u32 {
    const OFFSET_BASIS: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    let hash = key.bytes().fold(OFFSET_BASIS, |hash, byte| {
        (hash ^ u64::from(byte)).wrapping_mul(PRIME)
    });
    u32::try_from(hash % u64::from(count.max(1))).unwrap_or(0)
}

/// What an order id ends with in a pipeline of several partitions, before its partition's number.
const ORDER_PARTITION_MARK: &str = "-p";

/// The id of a new order `unique` (a UUID) in `partition`: `unique` itself with one partition (ids
/// as they always were), `<unique>-p<index>` with several, so that any replica routes `GetOrder`
/// without a lookup.
pub fn order_id(mut unique: String, partition: Partition) -> String {
    if partition.count > 1 {
        use std::fmt::Write;
        let _ = write!(unique, "{ORDER_PARTITION_MARK}{}", partition.index);
    }
    unique
}

/// The partition of `count` an order id names ([`order_id`]); `None` for an id that names none
/// of them. With one partition every id is partition 0's.
pub fn order_partition(order_id: &str, count: u32) -> Option<u32> {
    if count == 1 {
        return Some(0);
    }
    let (_, index) = order_id.rsplit_once(ORDER_PARTITION_MARK)?;
    let canonical = !index.is_empty()
        && index.bytes().all(|b| b.is_ascii_digit())
        && (index == "0" || !index.starts_with('0'));
    let index: u32 = index.parse().ok().filter(|_| canonical)?;
    (index < count).then_some(index)
}

impl std::fmt::Display for Partition {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "partition {} of {}", self.index, self.count)
    }
}

/// Makes the store `txn` belongs to hold `wanted`, or says why it cannot. A store that records no
/// partition is new when it has no other `meta` row and an empty `outbox`, and then takes
/// `wanted`; otherwise it was created before stores recorded their partition, when every pipeline
/// had one, so it holds [`Partition::ONLY`].
pub(crate) fn claim(
    txn: &WriteTransaction,
    wanted: Partition,
    empty: bool,
) -> Result<(), StoreError> {
    let mut meta = txn.open_table(META)?;
    let index = meta.get(INDEX_KEY)?.map(|v| v.value());
    let count = meta.get(COUNT_KEY)?.map(|v| v.value());
    let held = match (index, count) {
        (Some(index), Some(count)) => Some(Partition {
            index: u32::try_from(index).unwrap_or(u32::MAX),
            count: u32::try_from(count).unwrap_or(u32::MAX),
        }),
        _ if empty => None,
        _ => Some(Partition::ONLY),
    };
    match held {
        Some(held) if held != wanted => Err(StoreError::ForeignPartition { held, wanted }),
        _ => {
            if index.is_none() || count.is_none() {
                meta.insert(INDEX_KEY, u64::from(wanted.index))?;
                meta.insert(COUNT_KEY, u64::from(wanted.count))?;
            }
            Ok(())
        }
    }
}

/// Whether the `meta` table holds nothing yet but, perhaps, the log's id: a store just created
/// (or never written).
pub(crate) fn meta_is_empty(txn: &WriteTransaction) -> Result<bool, StoreError> {
    let meta = txn.open_table(META)?;
    for row in meta.iter()? {
        if row?.0.value() != crate::outbox::LOG_ID_KEY {
            return Ok(false);
        }
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::path::Path;

    use orderflow_proto::v1::Event;

    use super::*;
    use crate::store::{CACHE_BYTES, Store};

    fn open(path: &Path, partition: Partition) -> Result<Store, StoreError> {
        Store::open_partition(path, partition, CACHE_BYTES)
    }

    /// One entry appended and upstream offset 5 consumed.
    fn write_something(store: &Store) {
        store
            .write(|txn| {
                txn.append(&Event {
                    order_id: "o-1".into(),
                    ..Default::default()
                });
                txn.set_consumed("up", 5)
            })
            .unwrap();
    }

    /// Deletes the partition keys, as a store made before stores recorded them.
    fn forget_partition(path: &Path) {
        let db = redb::Database::create(path).unwrap();
        let txn = db.begin_write().unwrap();
        {
            let mut meta = txn.open_table(META).unwrap();
            meta.remove(INDEX_KEY).unwrap();
            meta.remove(COUNT_KEY).unwrap();
        }
        txn.commit().unwrap();
    }

    const THIRD_OF_FOUR: Partition = Partition { index: 2, count: 4 };

    #[test]
    fn a_key_has_one_home_for_good() {
        // Pinned: a change here would move existing orders' keys to other partitions.
        assert_eq!(home_partition("", 1 << 20), 0x22325);
        assert_eq!(home_partition("a", u32::MAX), 895_863_001);
        assert_eq!(home_partition("anything", 1), 0);
        let homes: std::collections::BTreeSet<u32> = (0..200)
            .map(|n| home_partition(&format!("customer-{n}"), 4))
            .collect();
        assert_eq!(homes.into_iter().collect::<Vec<_>>(), [0, 1, 2, 3]);
    }

    #[test]
    fn an_order_id_names_its_partition() {
        let unique = "0190a5b2-7c3e-7d4f-8a1b-2c3d4e5f6a7b";
        assert_eq!(order_id(unique.to_owned(), Partition::ONLY), unique);
        assert_eq!(order_partition(unique, 1), Some(0));
        let id = order_id(unique.to_owned(), THIRD_OF_FOUR);
        assert_eq!(id, format!("{unique}-p2"));
        assert_eq!(order_partition(&id, 4), Some(2));
        for foreign in [
            unique.to_owned(),
            format!("{unique}-p4"),
            format!("{unique}-p02"),
            format!("{unique}-p"),
            format!("{unique}-p+1"),
            "p1".to_owned(),
        ] {
            assert_eq!(order_partition(&foreign, 4), None, "{foreign}");
        }
    }

    #[test]
    fn a_store_keeps_the_partition_it_was_created_for() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("stage.redb");
        let store = open(&path, THIRD_OF_FOUR).unwrap();
        assert_eq!(store.partition(), THIRD_OF_FOUR);
        write_something(&store);
        drop(store);

        for wrong in [
            Partition::ONLY,
            Partition { index: 1, count: 4 },
            Partition { index: 2, count: 8 },
        ] {
            let Err(refused) = open(&path, wrong) else {
                panic!("opened as {wrong}");
            };
            assert!(
                matches!(refused, StoreError::ForeignPartition { held, wanted }
                    if held == THIRD_OF_FOUR && wanted == wrong),
                "{refused}"
            );
            let message = refused.to_string();
            assert!(
                message.contains("partition 2 of 4") && message.contains("--partitions"),
                "{message}"
            );
        }

        // Refusing changed nothing: the store opens as what it is, with what it held.
        let store = open(&path, THIRD_OF_FOUR).unwrap();
        assert_eq!(store.outbox().next_offset(), 1);
        assert_eq!(store.consumed_offset("up").unwrap(), 5);
    }

    #[test]
    fn a_store_made_before_partitions_holds_the_only_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("stage.redb");
        write_something(&open(&path, Partition::ONLY).unwrap());
        forget_partition(&path);

        let refused = open(&path, THIRD_OF_FOUR).err().unwrap();
        assert!(
            matches!(
                refused,
                StoreError::ForeignPartition {
                    held: Partition::ONLY,
                    ..
                }
            ),
            "{refused}"
        );
        let store = open(&path, Partition::ONLY).unwrap();
        assert_eq!(store.consumed_offset("up").unwrap(), 5);
        drop(store);
        // Adopted: the store now records it.
        let db = redb::Database::create(&path).unwrap();
        let read = redb::ReadableDatabase::begin_read(&db).unwrap();
        let meta = read.open_table(META).unwrap();
        assert_eq!(meta.get(COUNT_KEY).unwrap().unwrap().value(), 1);
        assert_eq!(meta.get(INDEX_KEY).unwrap().unwrap().value(), 0);
    }

    #[test]
    fn a_store_that_never_held_anything_takes_any_partition() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("stage.redb");
        drop(open(&path, Partition::ONLY).unwrap());
        forget_partition(&path);
        assert_eq!(
            open(&path, THIRD_OF_FOUR).unwrap().partition(),
            THIRD_OF_FOUR
        );
    }
}
