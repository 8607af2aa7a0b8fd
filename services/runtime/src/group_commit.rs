//! Group commit: many callers, one writer, one transaction — one fsync — per batch.
//!
//! Callers hand their item to the writer through a bounded queue and wait. The writer takes the first
//! waiting item plus every other already queued (up to `max_batch`), passes them all to the stage's
//! `write` function inside ONE transaction, and answers every caller once that commit is on disk.
//! While one fsync runs the next batch queues up, so under load many callers share each fsync; with
//! one caller at a time the latency is one commit.
//!
//! An item's answer is `Result<R, E>`: `write` may refuse one item alone (an RPC writer answers
//! with a `tonic::Status`, say), and a batch that cannot be committed is the [`StoreError`], as
//! `E`, for each of its items.

use tokio::{
    sync::{mpsc, oneshot},
    task::JoinHandle,
};

use crate::{
    metrics as names,
    store::{Store, StoreError, Txn, blocking},
};

/// Which group commit this is, in its metrics: the stage and what it writes (e.g. `intake`).
#[derive(Debug, Clone, Copy)]
pub struct WriterName {
    pub stage: &'static str,
    pub writer: &'static str,
}

/// Items waiting for the writer at most; further callers wait for room.
const QUEUE_DEPTH: usize = 16_384;

/// What `write` decides for each item of a batch: its answer, or a refusal that only that caller
/// sees (the rest of the batch still commits).
pub type ItemResult<R, E> = Result<R, E>;

struct Pending<T, R, E> {
    item: T,
    reply: oneshot::Sender<ItemResult<R, E>>,
}

/// Hands items to the group-commit writer. Cheap to clone.
pub struct GroupCommit<T, R, E> {
    queue: mpsc::Sender<Pending<T, R, E>>,
}

impl<T, R, E> Clone for GroupCommit<T, R, E> {
    fn clone(&self) -> Self {
        GroupCommit {
            queue: self.queue.clone(),
        }
    }
}

impl<T, R, E> GroupCommit<T, R, E>
where
    T: Send + 'static,
    R: Send + 'static,
    E: From<StoreError> + Clone + Send + 'static,
{
    /// Starts the writer over `store`. `write` gets each batch inside one durable transaction and
    /// returns one result per item, in order. The writer ends once every `GroupCommit` clone is
    /// dropped and the queue is written. Each batch's size is recorded as
    /// `orderflow_group_commit_entries{stage, writer}`.
    pub fn start<W>(
        store: Store,
        name: WriterName,
        max_batch: usize,
        write: W,
    ) -> (Self, JoinHandle<()>)
    where
        W: Fn(&mut Txn, Vec<T>) -> Result<Vec<ItemResult<R, E>>, StoreError>
            + Send
            + Sync
            + 'static,
    {
        let (queue, rx) = mpsc::channel(QUEUE_DEPTH);
        let writer = tokio::spawn(write_batches(
            store,
            name,
            rx,
            max_batch.max(1),
            std::sync::Arc::new(write),
        ));
        (GroupCommit { queue }, writer)
    }

    /// Commits `item` with whatever else is waiting; its answer once the commit is on disk.
    pub async fn submit(&self, item: T) -> ItemResult<R, E> {
        let (reply, answer) = oneshot::channel();
        let stopped = || E::from(StoreError::ShuttingDown);
        self.queue
            .send(Pending { item, reply })
            .await
            .map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())?
    }
}

async fn write_batches<T, R, E, W>(
    store: Store,
    name: WriterName,
    mut rx: mpsc::Receiver<Pending<T, R, E>>,
    max_batch: usize,
    write: std::sync::Arc<W>,
) where
    T: Send + 'static,
    R: Send + 'static,
    E: From<StoreError> + Clone + Send + 'static,
    W: Fn(&mut Txn, Vec<T>) -> Result<Vec<ItemResult<R, E>>, StoreError> + Send + Sync + 'static,
{
    let mut batch = Vec::with_capacity(max_batch);
    while rx.recv_many(&mut batch, max_batch).await > 0 {
        let (items, replies): (Vec<_>, Vec<_>) = batch.drain(..).map(|p| (p.item, p.reply)).unzip();
        let count = items.len();
        metrics::histogram!(names::GROUP_COMMIT_ENTRIES, "stage" => name.stage, "writer" => name.writer)
            .record(count as f64);
        let store = store.clone();
        let write = write.clone();
        let committed = blocking(move || store.write(|txn| write(txn, items))).await;
        let results = match committed {
            Ok(Ok(results)) if results.len() == count => results,
            Ok(Ok(results)) => {
                tracing::error!(
                    items = count,
                    results = results.len(),
                    "group commit answered the wrong number of items"
                );
                fail_all(
                    count,
                    StoreError::TaskFailed("group commit lost items".into()),
                )
            }
            Ok(Err(e)) => {
                // A storage fault is logged once, by the store, however many batches it refuses.
                if e.fault().is_none() {
                    tracing::error!(error = %e, items = count, "group commit failed");
                }
                fail_all(count, e)
            }
            Err(e) => fail_all(count, e),
        };
        for (reply, result) in replies.into_iter().zip(results) {
            let _ = reply.send(result);
        }
    }
}

/// The same refusal for every item of a batch that could not be committed: nothing of it was.
fn fail_all<R, E: From<StoreError> + Clone>(
    count: usize,
    error: StoreError,
) -> Vec<ItemResult<R, E>> {
    let error = E::from(error);
    (0..count).map(|_| Err(error.clone())).collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use orderflow_proto::v1::Event;
    use tonic::Status;

    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_items_share_commits_and_answer_each() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("g.redb")).unwrap();
        let name = WriterName {
            stage: "test",
            writer: "events",
        };
        let (commit, writer) =
            GroupCommit::start(store.clone(), name, 1000, |txn, items: Vec<u32>| {
                Ok(items
                    .into_iter()
                    .map(|i| {
                        if i % 100 == 99 {
                            return Err(Status::already_exists(format!("{i}")));
                        }
                        Ok(txn.append(&Event {
                            order_id: i.to_string(),
                            ..Default::default()
                        }))
                    })
                    .collect())
            });
        let calls: Vec<_> = (0..500u32)
            .map(|i| {
                let commit = commit.clone();
                tokio::spawn(async move { (i, commit.submit(i).await) })
            })
            .collect();
        let mut offsets = Vec::new();
        for call in calls {
            let (i, result) = call.await.unwrap();
            match result {
                Ok(offset) => offsets.push(offset),
                Err(status) => {
                    assert_eq!(i % 100, 99);
                    assert_eq!(status.code(), tonic::Code::AlreadyExists);
                }
            }
        }
        offsets.sort_unstable();
        assert_eq!(offsets, (0..495).collect::<Vec<u64>>());
        assert!(store.commits() < 495, "{} commits", store.commits());
        drop(commit);
        writer.await.unwrap();
    }
}
