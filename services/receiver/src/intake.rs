//! The single writer of new orders: group commit over the receiver's store.
//!
//! Tables:
//!
//! | table               | key                          | value                    |
//! |---------------------|------------------------------|--------------------------|
//! | `orders`            | order id                     | encoded `Order` (with its progress) |
//! | `idempotency_keys`  | `customer \0 key`            | encoded [`KeyRecord`]    |
//! | `idempotency_by_time` | (created ms, `customer \0 key`) | ()                  |
//!
//! An idempotency key is looked up inside the batch's transaction, after every earlier order of the
//! same batch, so two concurrent calls with one key cannot both create an order: the second gets the
//! first one's answer (same request) or `ALREADY_EXISTS` (different request). Keys older than the
//! window count as unused and are swept away in the background.

use std::time::Duration;

use orderflow_proto::v1::{Event, Order, PlaceOrderRequest};
use orderflow_runtime::{
    Commit, GroupCommit, Store, StoreError, Txn, WriterName, decode_record, now_unix_ms,
};
use prost::Message;
use redb::{ReadableTable, TableDefinition};
use sha2::{Digest, Sha256};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic::Status;

use crate::STAGE;

/// `order_id` → encoded [`Order`], progress included.
pub(crate) const ORDERS: TableDefinition<&str, &[u8]> = TableDefinition::new("orders");
pub(crate) const ORDERS_NAME: &str = "orders";
const KEYS: TableDefinition<&str, &[u8]> = TableDefinition::new("idempotency_keys");
const KEYS_BY_TIME: TableDefinition<(u64, &str), ()> = TableDefinition::new("idempotency_by_time");
/// Expired keys deleted per transaction at most.
const SWEEP_CHUNK: usize = 10_000;

/// What a key remembers about the call that first used it.
#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct KeyRecord {
    #[prost(string, tag = "1")]
    order_id: String,
    /// SHA-256 of the request as validated (customer and lines), to tell a retry from a reuse.
    #[prost(bytes = "vec", tag = "2")]
    request_hash: Vec<u8>,
    #[prost(uint64, tag = "3")]
    offset: u64,
    #[prost(uint64, tag = "4")]
    created_unix_ms: u64,
}

/// A new order for the writer.
pub(crate) struct NewOrder {
    pub order: Order,
    pub event: Event,
    /// The caller's key, if any, with the hash of its request.
    pub idempotency: Option<(String, Vec<u8>)>,
}

/// The writer's answer: where the order is, and whether an earlier call created it.
#[derive(Debug, Clone)]
pub(crate) struct Accepted {
    pub order_id: String,
    pub offset: u64,
    pub replayed: bool,
}

/// Hands orders to the group-commit writer.
#[derive(Clone)]
pub(crate) struct Intake {
    writer: GroupCommit<NewOrder, Accepted, Status>,
}

/// Creates the key tables so a new store can be read.
pub(crate) fn create_tables(txn: &mut Txn) -> Result<(), StoreError> {
    txn.redb().open_table(KEYS)?;
    txn.redb().open_table(KEYS_BY_TIME)?;
    Ok(())
}

/// The key under which `customer`'s idempotency key `key` is stored: keys are per customer.
pub(crate) fn scoped_key(customer: &str, key: &str) -> String {
    format!("{customer}\u{0}{key}")
}

/// SHA-256 of what makes two calls "the same request".
pub(crate) fn request_hash(request: &PlaceOrderRequest) -> Vec<u8> {
    let canonical = PlaceOrderRequest {
        customer_id: request.customer_id.trim().to_owned(),
        lines: request.lines.clone(),
        idempotency_key: String::new(),
    };
    Sha256::digest(canonical.encode_to_vec()).to_vec()
}

impl Intake {
    /// Starts the writer over `store`; it ends once every `Intake` clone is dropped and the queue is
    /// written. Keys older than `window` count as unused.
    pub(crate) fn start(
        store: Store,
        max_batch: usize,
        window: Duration,
    ) -> (Intake, JoinHandle<()>) {
        let name = WriterName {
            stage: STAGE,
            writer: "intake",
        };
        let (writer, task) = GroupCommit::start(store, name, max_batch, move |txn, orders| {
            write(txn, orders, window)
        });
        (Intake { writer }, task)
    }

    /// Makes the order durable (or finds the one its key created); answers once committed.
    pub(crate) async fn submit(&self, order: NewOrder) -> Result<Accepted, Status> {
        self.writer.submit(order).await
    }
}

fn write(
    txn: &mut Txn,
    orders: Vec<NewOrder>,
    window: Duration,
) -> Result<Vec<Result<Accepted, Status>>, StoreError> {
    let now = now_unix_ms();
    let oldest_valid = now.saturating_sub(window.as_millis() as u64);
    let mut answers = Vec::with_capacity(orders.len());
    // Each table is opened once for the whole batch; the new orders' events are appended after,
    // in the same order, so each takes the offset counted here.
    let mut events = Vec::with_capacity(orders.len());
    let mut next_offset = txn.next_offset();
    {
        let mut table = txn.redb().open_table(ORDERS)?;
        let mut keys = txn.redb().open_table(KEYS)?;
        let mut keys_by_time = txn.redb().open_table(KEYS_BY_TIME)?;
        for NewOrder {
            mut order,
            event,
            idempotency,
        } in orders
        {
            if let Some((key, hash)) = &idempotency {
                let known = match keys.get(key.as_str())? {
                    Some(bytes) => Some(decode_record::<KeyRecord>(
                        "idempotency_keys",
                        key,
                        bytes.value(),
                    )?),
                    None => None,
                };
                if let Some(record) = known.filter(|r| r.created_unix_ms >= oldest_valid) {
                    if &record.request_hash == hash {
                        answers.push(Ok(Accepted {
                            order_id: record.order_id,
                            offset: record.offset,
                            replayed: true,
                        }));
                    } else {
                        answers.push(Err(Status::already_exists(format!(
                            "idempotency key {:?} was already used for a different order ({}); use a new key for a new order",
                            key.split('\u{0}').nth(1).unwrap_or_default(),
                            record.order_id
                        ))));
                    }
                    continue;
                }
            }
            let offset = next_offset;
            next_offset += 1;
            events.push(event);
            order.offset = offset;
            table.insert(order.order_id.as_str(), order.encode_to_vec().as_slice())?;
            if let Some((key, hash)) = idempotency {
                let record = KeyRecord {
                    order_id: order.order_id.clone(),
                    request_hash: hash,
                    offset,
                    created_unix_ms: now,
                };
                keys.insert(key.as_str(), record.encode_to_vec().as_slice())?;
                keys_by_time.insert((now, key.as_str()), ())?;
            }
            answers.push(Ok(Accepted {
                order_id: order.order_id,
                offset,
                replayed: false,
            }));
        }
    }
    for event in &events {
        txn.append(event);
    }
    debug_assert_eq!(txn.next_offset(), next_offset);
    Ok(answers)
}

/// Deletes idempotency keys older than `window`, every minute, until `shutdown`.
pub(crate) async fn sweep_idempotency_keys(
    store: Store,
    window: Duration,
    shutdown: CancellationToken,
) {
    let mut tick = tokio::time::interval(Duration::from_secs(60));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = shutdown.cancelled() => return,
        }
        let cutoff = now_unix_ms().saturating_sub(window.as_millis() as u64);
        let partition = store.partition().index;
        let store = store.clone();
        let swept = tokio::task::spawn_blocking(move || sweep(&store, cutoff)).await;
        match swept {
            Ok(Ok(0)) | Err(_) => {}
            Ok(Ok(n)) => tracing::debug!(partition, keys = n, "expired idempotency keys deleted"),
            Ok(Err(e)) => tracing::warn!(partition, error = %e, "idempotency key sweep failed"),
        }
    }
}

/// Deletes keys created before `cutoff` (ms), in chunks; returns how many.
pub(crate) fn sweep(store: &Store, cutoff: u64) -> Result<usize, StoreError> {
    let mut total = 0;
    loop {
        let removed = store.write_as(Commit::Lazy, |txn| {
            let expired: Vec<(u64, String)> = {
                let by_time = txn.redb().open_table(KEYS_BY_TIME)?;
                let mut expired = Vec::new();
                for row in by_time.range::<(u64, &str)>(..(cutoff, ""))? {
                    let (key, _) = row?;
                    let (at, name) = key.value();
                    expired.push((at, name.to_owned()));
                    if expired.len() == SWEEP_CHUNK {
                        break;
                    }
                }
                expired
            };
            let mut by_time = txn.redb().open_table(KEYS_BY_TIME)?;
            let mut keys = txn.redb().open_table(KEYS)?;
            for (at, name) in &expired {
                by_time.remove((*at, name.as_str()))?;
                // A key reused after expiry has a newer record: keep that one.
                let stale = match keys.get(name.as_str())? {
                    Some(bytes) => {
                        decode_record::<KeyRecord>("idempotency_keys", name, bytes.value())?
                            .created_unix_ms
                            == *at
                    }
                    None => false,
                };
                if stale {
                    keys.remove(name.as_str())?;
                }
            }
            Ok::<_, StoreError>(expired.len())
        })?;
        total += removed;
        if removed < SWEEP_CHUNK {
            return Ok(total);
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use orderflow_proto::v1::{Event, Order, OrderLine};

    use super::*;

    fn new_order(id: &str, key: Option<(&str, &[u8])>) -> NewOrder {
        NewOrder {
            order: Order {
                order_id: id.into(),
                ..Default::default()
            },
            event: Event {
                order_id: id.into(),
                ..Default::default()
            },
            idempotency: key.map(|(k, h)| (scoped_key("alice", k), h.to_vec())),
        }
    }

    fn open(dir: &tempfile::TempDir) -> Store {
        let store = Store::open(&dir.path().join("r.redb")).unwrap();
        store.write(create_tables).unwrap();
        store
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_orders_share_commits_and_get_dense_offsets() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir);
        let (intake, writer) = Intake::start(store.clone(), 1000, Duration::from_secs(60));
        let calls: Vec<_> = (0..500)
            .map(|i| {
                let intake = intake.clone();
                tokio::spawn(async move {
                    intake
                        .submit(new_order(&format!("o{i}"), None))
                        .await
                        .unwrap()
                        .offset
                })
            })
            .collect();
        let mut offsets = Vec::new();
        for call in calls {
            offsets.push(call.await.unwrap());
        }
        offsets.sort_unstable();
        assert_eq!(offsets, (0..500).collect::<Vec<u64>>());
        assert!(
            store.commits() < 500,
            "500 concurrent orders took {} commits",
            store.commits()
        );
        drop(intake);
        writer.await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn one_key_creates_one_order_even_in_one_batch() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir);
        let (intake, writer) = Intake::start(store.clone(), 1000, Duration::from_secs(60));
        let calls: Vec<_> = (0..50)
            .map(|i| {
                let intake = intake.clone();
                tokio::spawn(async move {
                    let hash: &[u8] = if i == 49 { b"other" } else { b"same" };
                    intake
                        .submit(new_order(&format!("o{i}"), Some(("k1", hash))))
                        .await
                })
            })
            .collect();
        let mut created = Vec::new();
        let mut conflicts = 0;
        for call in calls {
            match call.await.unwrap() {
                Ok(a) if !a.replayed => created.push(a.order_id),
                Ok(_) => {}
                Err(status) => {
                    assert_eq!(status.code(), tonic::Code::AlreadyExists);
                    conflicts += 1;
                }
            }
        }
        // Whichever hash came first created the order; the other kind conflicts.
        assert_eq!(created.len(), 1);
        assert!(conflicts == 1 || conflicts == 49, "{conflicts} conflicts");
        assert_eq!(store.outbox().next_offset(), 1);
        drop(intake);
        writer.await.unwrap();
    }

    #[test]
    fn expired_keys_are_swept_and_reusable() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir);
        let hash = request_hash(&PlaceOrderRequest {
            customer_id: " alice ".into(),
            lines: vec![OrderLine {
                sku: "A".into(),
                quantity: 1,
            }],
            idempotency_key: "x".into(),
        });
        let first = store
            .write(|txn| {
                write(
                    txn,
                    vec![new_order("o1", Some(("k", &hash)))],
                    Duration::from_secs(60),
                )
            })
            .unwrap();
        assert!(!first[0].as_ref().unwrap().replayed);
        // With a zero window the key has expired: a new order is created under it.
        std::thread::sleep(Duration::from_millis(5));
        let again = store
            .write(|txn| {
                write(
                    txn,
                    vec![new_order("o2", Some(("k", &hash)))],
                    Duration::ZERO,
                )
            })
            .unwrap();
        assert_eq!(again[0].as_ref().unwrap().order_id, "o2");
        assert_eq!(sweep(&store, now_unix_ms() + 1).unwrap(), 2);
        assert_eq!(sweep(&store, now_unix_ms() + 1).unwrap(), 0);
    }
}
