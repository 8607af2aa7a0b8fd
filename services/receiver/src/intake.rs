//! Group commit: the single writer of the receiver's store.
//!
//! `PlaceOrder` calls hand their order to the writer through a bounded channel and wait. The writer
//! takes the first waiting order plus every other already queued (up to `max_batch`), writes them all
//! — the order records and their `OrderPlaced` events — in ONE transaction, and answers every caller
//! once that commit is on disk. While one fsync runs, the next batch queues up, so under load many
//! calls share each fsync; with one caller at a time the latency is one commit.

use orderflow_proto::v1::{Event, Order};
use orderflow_runtime::{Store, StoreError};
use prost::Message;
use redb::TableDefinition;
use tokio::{
    sync::{mpsc, oneshot},
    task::JoinHandle,
};
use tonic::Status;

/// `order_id` → encoded [`Order`] as accepted.
pub(crate) const ORDERS: TableDefinition<&str, &[u8]> = TableDefinition::new("orders");

/// Orders waiting for the writer at most; further callers wait for room.
const QUEUE_DEPTH: usize = 16_384;

struct Pending {
    order: Order,
    event: Event,
    reply: oneshot::Sender<Result<u64, Status>>,
}

/// Hands orders to the group-commit writer.
#[derive(Clone)]
pub(crate) struct Intake {
    queue: mpsc::Sender<Pending>,
}

impl Intake {
    /// Starts the writer over `store`; it ends once every `Intake` clone is dropped and the queue is
    /// written.
    pub(crate) fn start(store: Store, max_batch: usize) -> (Intake, JoinHandle<()>) {
        let (queue, rx) = mpsc::channel(QUEUE_DEPTH);
        let writer = tokio::spawn(write_batches(store, rx, max_batch));
        (Intake { queue }, writer)
    }

    /// Makes `order` and its `event` durable; returns the event's offset once committed.
    pub(crate) async fn submit(&self, order: Order, event: Event) -> Result<u64, Status> {
        let (reply, answer) = oneshot::channel();
        self.queue
            .send(Pending {
                order,
                event,
                reply,
            })
            .await
            .map_err(|_| Status::unavailable("the receiver is shutting down"))?;
        answer
            .await
            .map_err(|_| Status::unavailable("the receiver is shutting down"))?
    }
}

async fn write_batches(store: Store, mut rx: mpsc::Receiver<Pending>, max_batch: usize) {
    let mut batch = Vec::with_capacity(max_batch);
    while rx.recv_many(&mut batch, max_batch).await > 0 {
        let (records, replies): (Vec<_>, Vec<_>) = batch
            .drain(..)
            .map(|p| ((p.order, p.event), p.reply))
            .unzip();
        let store = store.clone();
        let committed = tokio::task::spawn_blocking(move || write(&store, records)).await;
        match committed {
            Ok(Ok(offsets)) => {
                for (reply, offset) in replies.into_iter().zip(offsets) {
                    let _ = reply.send(Ok(offset));
                }
            }
            Ok(Err(e)) => {
                tracing::error!(error = %e, orders = replies.len(), "group commit failed");
                for reply in replies {
                    let _ = reply.send(Err(Status::internal("order could not be stored")));
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "group commit task failed");
                for reply in replies {
                    let _ = reply.send(Err(Status::internal("order could not be stored")));
                }
            }
        }
    }
}

fn write(store: &Store, records: Vec<(Order, Event)>) -> Result<Vec<u64>, StoreError> {
    store.write(|txn| {
        let mut offsets = Vec::with_capacity(records.len());
        let mut encoded = Vec::with_capacity(records.len());
        for (mut order, event) in records {
            let offset = txn.append(&event);
            order.offset = offset;
            offsets.push(offset);
            encoded.push((order.order_id.clone(), order.encode_to_vec()));
        }
        let mut orders = txn.redb().open_table(ORDERS)?;
        for (id, bytes) in &encoded {
            orders.insert(id.as_str(), bytes.as_slice())?;
        }
        Ok(offsets)
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use orderflow_proto::v1::{Event, Order};

    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_orders_share_commits_and_get_dense_offsets() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("r.redb")).unwrap();
        let (intake, writer) = Intake::start(store.clone(), 1000);
        let calls: Vec<_> = (0..500)
            .map(|i| {
                let intake = intake.clone();
                tokio::spawn(async move {
                    let id = format!("order-{i}");
                    let order = Order {
                        order_id: id.clone(),
                        ..Default::default()
                    };
                    let event = Event {
                        order_id: id,
                        ..Default::default()
                    };
                    intake.submit(order, event).await.unwrap()
                })
            })
            .collect();
        let mut offsets = Vec::new();
        for call in calls {
            offsets.push(call.await.unwrap());
        }
        offsets.sort_unstable();
        assert_eq!(offsets, (0..500).collect::<Vec<u64>>());
        let commits = store.commits();
        assert!(
            commits < 500,
            "500 concurrent orders took {commits} commits"
        );
        drop(intake);
        writer.await.unwrap();
    }
}
