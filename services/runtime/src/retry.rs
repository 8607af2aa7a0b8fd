//! Work that needs a call to the outside world — a payment capture, a delivery — made durable,
//! attempted with bounded concurrency, retried with exponential backoff and jitter, and settled
//! exactly once.
//!
//! # Design
//! Most calls succeed at once, so a stage first tries each task of a batch itself, before the batch's
//! transaction ([`RetryQueue::attempt_first`], from [`crate::Apply::prepare`]), and records the result
//! in that transaction with the upstream offset ([`RetryQueue::submit`]): a task whose first attempt
//! succeeded, or failed for good, is settled there and then, and never touches the queue's table.
//! Only what must wait — a transient failure, or an attempt the batch had no time for — enters the
//! queue. A crash before the commit makes the first attempt again with the same key, like any attempt
//! whose result was not recorded.
//!
//! A task enters the queue inside a stage transaction ([`RetryQueue::submit`] or
//! [`RetryQueue::enqueue`]), in the same commit as the upstream offset that caused it: from then on it
//! is on disk. The table `<work>.pending`
//! holds one row per task, keyed by a stage-chosen key (the order id): the stage's task (encoded),
//! the attempts made, when the next one is due, the last error, and the trace context of the span
//! that scheduled it.
//!
//! The runner keeps an in-memory schedule of `(due, key)`, rebuilt from the table on start. It starts
//! attempts whose time has come while fewer than `concurrency` run, so a slow task never holds the
//! others up. Each attempt is its own span, a child of the span that scheduled the task. Results go
//! to the settler, which applies every result waiting in ONE transaction:
//! - success, or a final failure (permanent, or the last allowed attempt): the row is deleted and the
//!   stage records the outcome and appends its events ([`RetryWork::settle`]);
//! - a transient failure with attempts left: the row is rewritten with the next due time — backoff
//!   doubling from `backoff_min` to `backoff_max` with equal jitter, and never sooner than a
//!   `Retry-After` the outside system asked for.
//!
//! An [`Admission`] counts the tasks held, so the stage's subscription stops reading while the queue
//! is full and the backlog stays upstream, on disk.
//!
//! # On crash
//! An attempt whose result was not committed is made again after restart, with the same key and
//! task: the outside call must be idempotent on that key (payments carry an idempotency key,
//! deliveries an `Idempotency-Key` header). Its count is the committed one, so an attempt cut short by
//! a crash is not counted.

use std::{
    cmp::Reverse,
    collections::{BinaryHeap, HashMap, HashSet},
    future::Future,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use prost::Message;
use rand::Rng;
use redb::{ReadableTable, TableDefinition};
use tokio::sync::{Notify, Semaphore, mpsc};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::{
    metrics as names, now_unix_ms,
    store::{Store, StoreError, Txn, blocking, decode_record},
    subscription::Admission,
    telemetry,
};

/// What one attempt of the outside call came to.
#[derive(Debug)]
pub enum Attempt<D> {
    /// It worked.
    Done(D),
    /// It failed in a way that may pass: try again later, not before `after` if given.
    Retry {
        error: String,
        after: Option<Duration>,
    },
    /// It failed for good: no retry.
    Fail { error: String },
}

/// A task's final result, handed to [`RetryWork::settle`].
#[derive(Debug)]
pub struct Outcome<D> {
    pub result: Result<D, Failure>,
    /// Attempts made, the last one included.
    pub attempts: u32,
    /// Trace context of the last attempt's span, for the events the stage appends.
    pub trace_context: HashMap<String, String>,
}

/// Why a task failed for good.
#[derive(Debug, Clone)]
pub struct Failure {
    /// The last error.
    pub error: String,
    /// `true`: every attempt failed transiently; `false`: an attempt failed permanently.
    pub exhausted: bool,
}

/// A task to attempt at once, before the transaction that records it.
#[derive(Debug)]
pub struct NewTask<T> {
    /// The stage-chosen key (an order id).
    pub key: String,
    pub customer_id: String,
    pub task: T,
    /// Context of the span that scheduled the task: the parent of its attempt spans.
    pub trace_context: HashMap<String, String>,
}

/// A task and what its first attempt came to, to record with [`RetryQueue::submit`].
pub struct FirstAttempt<H: RetryWork> {
    new: NewTask<H::Task>,
    /// `None`: not attempted (no time was left in the batch, or the store cannot record results).
    finished: Option<Finished<H::Done>>,
}

impl<H: RetryWork> FirstAttempt<H> {
    /// `new`, not attempted: [`RetryQueue::submit`] schedules it, due now.
    pub fn not_attempted(new: NewTask<H::Task>) -> Self {
        FirstAttempt {
            new,
            finished: None,
        }
    }
}

/// The first attempts of one batch, by key.
pub struct FirstAttempts<H: RetryWork> {
    by_key: HashMap<String, FirstAttempt<H>>,
}

impl<H: RetryWork> Default for FirstAttempts<H> {
    fn default() -> Self {
        FirstAttempts {
            by_key: HashMap::new(),
        }
    }
}

impl<H: RetryWork> FirstAttempts<H> {
    /// The task under `key` with its first attempt; `None` when the batch had no task under it, or
    /// it was taken already.
    pub fn take(&mut self, key: &str) -> Option<FirstAttempt<H>> {
        self.by_key.remove(key)
    }
}

/// How long a batch's first attempts may take in all; what has not finished by then is left to the
/// queue, so one slow outside call never holds a whole batch up for long.
pub const FIRST_ATTEMPTS_BUDGET: Duration = Duration::from_millis(500);

/// The work behind a retry queue: the stage's outside call, and how its outcome is recorded.
pub trait RetryWork: Send + Sync + 'static {
    /// What the stage stores per task.
    type Task: Message + Default + Send + Sync + 'static;
    /// What a successful attempt yields.
    type Done: Send + 'static;

    /// One attempt of the outside call for the task stored under `key`; `attempt` counts from 1. It
    /// runs inside the attempt's span.
    fn attempt(
        &self,
        key: &str,
        task: &Self::Task,
        attempt: u32,
    ) -> impl Future<Output = Attempt<Self::Done>> + Send;

    /// Called after a round of attempts, before their outcomes are settled: work whose attempts
    /// leave their effect buffered (the notifier's `log` sink holds its lines) makes it final here,
    /// so that nothing is recorded as done that a crash could still undo.
    fn attempts_made(&self) {}

    /// Records the task's final outcome and appends its events, inside the settling transaction.
    fn settle(
        &self,
        txn: &mut Txn,
        key: &str,
        task: Self::Task,
        outcome: Outcome<Self::Done>,
    ) -> Result<(), StoreError>;

    /// Records the final outcomes of several tasks, in order, inside one transaction: by default
    /// one [`RetryWork::settle`] each. A stage overrides it to open its tables once per batch.
    fn settle_all(
        &self,
        txn: &mut Txn,
        settling: Vec<Settling<Self::Task, Self::Done>>,
    ) -> Result<(), StoreError> {
        for Settling { key, task, outcome } in settling {
            self.settle(txn, &key, task, outcome)?;
        }
        Ok(())
    }
}

/// A task whose outcome is final, for [`RetryWork::settle_all`].
#[derive(Debug)]
pub struct Settling<T, D> {
    /// The task's key (an order id).
    pub key: String,
    pub task: T,
    pub outcome: Outcome<D>,
}

impl<T, D> Settling<T, D> {
    /// A batch of one, for a stage whose [`RetryWork::settle`] is its `settle_all`.
    pub fn one(key: &str, task: T, outcome: Outcome<D>) -> Vec<Self> {
        vec![Settling {
            key: key.to_owned(),
            task,
            outcome,
        }]
    }
}

/// How hard and how fast to retry.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    /// Attempts per task at most, the first included.
    pub max_attempts: u32,
    pub backoff_min: Duration,
    pub backoff_max: Duration,
    /// Attempts running at once at most.
    pub concurrency: usize,
    /// Tasks held before the subscription stops reading (a soft limit: a batch in hand still
    /// enters).
    pub max_pending: usize,
}

impl RetryPolicy {
    /// The pause before attempt `attempts + 1`, after `attempts` failed: `backoff_min × 2^(attempts−1)`
    /// up to `backoff_max`, with equal jitter (a random pause in its upper half), and at least `retry_after` (capped at an
    /// hour, so a hostile header cannot park a task forever).
    pub fn pause(&self, attempts: u32, retry_after: Option<Duration>) -> Duration {
        let exponent = attempts.saturating_sub(1).min(30);
        let ceiling = self
            .backoff_min
            .saturating_mul(1u32 << exponent)
            .min(self.backoff_max)
            .max(Duration::from_millis(1));
        let millis = ceiling.as_millis() as u64;
        let jittered = Duration::from_millis(rand::rng().random_range(millis / 2..=millis));
        match retry_after {
            Some(after) => jittered.max(after.min(Duration::from_secs(3600))),
            None => jittered,
        }
    }
}

/// One row of `<work>.pending`.
#[derive(Clone, PartialEq, prost::Message)]
struct PendingRow {
    /// The stage's task, encoded.
    #[prost(bytes = "vec", tag = "1")]
    task: Vec<u8>,
    /// Attempts made so far.
    #[prost(uint32, tag = "2")]
    attempts: u32,
    /// When the next attempt is due, in milliseconds since the Unix epoch.
    #[prost(uint64, tag = "3")]
    due_unix_ms: u64,
    #[prost(string, tag = "4")]
    last_error: String,
    /// W3C context of the span that scheduled the task: the parent of every attempt span.
    #[prost(map = "string, string", tag = "5")]
    trace_context: HashMap<String, String>,
    /// The customer the task is for, for the attempt spans.
    #[prost(string, tag = "6")]
    customer_id: String,
}

/// What an attempt sends to the settler.
struct Finished<D> {
    key: String,
    attempt: u32,
    result: Attempt<D>,
    trace_context: HashMap<String, String>,
}

/// Where an attempt leaves its task.
enum Concluded<D> {
    /// Done, or failed for good: settle it.
    Settle(Result<D, Failure>),
    /// Failed transiently with attempts left: try again at `due` (Unix ms).
    Retry { due: u64, error: String },
}

/// A durable queue of tasks for one kind of outside call. Cheap to clone.
pub struct RetryQueue<H: RetryWork> {
    shared: Arc<QueueState<H>>,
}

impl<H: RetryWork> Clone for RetryQueue<H> {
    fn clone(&self) -> Self {
        RetryQueue {
            shared: self.shared.clone(),
        }
    }
}

/// What the queue's runner, settler and `enqueue` share: the store, the schedule and the counts.
struct QueueState<H: RetryWork> {
    stage: &'static str,
    work: &'static str,
    /// The partition of `store`, as metrics label it.
    partition: String,
    table: String,
    store: Store,
    worker: Arc<H>,
    policy: RetryPolicy,
    /// `(due, key)` of every pending task not being attempted.
    schedule: Mutex<BinaryHeap<Reverse<(u64, String)>>>,
    /// Keys of attempts under way.
    running: Mutex<HashSet<String>>,
    /// Keys of every pending task, counted once each in `admission` (the start-up scan and an
    /// enqueue committed meanwhile may both report the same key).
    held: Mutex<HashSet<String>>,
    wake: Notify,
    admission: Admission,
}

impl<H: RetryWork> RetryQueue<H> {
    /// A queue for `work` ("payment", "delivery") of `stage`, stored in `store`.
    pub fn new(
        stage: &'static str,
        work: &'static str,
        store: Store,
        worker: Arc<H>,
        policy: RetryPolicy,
    ) -> Self {
        RetryQueue {
            shared: Arc::new(QueueState {
                stage,
                work,
                partition: store.partition().index.to_string(),
                table: format!("{work}.pending"),
                store,
                worker,
                policy,
                schedule: Mutex::new(BinaryHeap::new()),
                running: Mutex::new(HashSet::new()),
                held: Mutex::new(HashSet::new()),
                wake: Notify::new(),
                admission: Admission::new(policy.max_pending),
            }),
        }
    }

    /// Counts the tasks held, for the stage's subscription.
    pub fn admission(&self) -> Admission {
        self.shared.admission.clone()
    }

    /// The stage's side of this queue.
    pub fn worker(&self) -> &Arc<H> {
        &self.shared.worker
    }

    /// Creates the pending table, so that reading it on a new store finds it empty.
    pub fn create_table(&self, txn: &mut Txn) -> Result<(), StoreError> {
        txn.redb().open_table(self.shared.definition())?;
        Ok(())
    }

    /// Schedules `task` under `key` (an order id) for `customer_id` inside the caller's transaction,
    /// due now; the attempt spans will be children of the span whose context is `trace_context`.
    /// Returns `false` (and changes nothing) when a task with this key is already pending.
    pub fn enqueue(
        &self,
        txn: &mut Txn,
        key: &str,
        customer_id: &str,
        task: &H::Task,
        trace_context: HashMap<String, String>,
    ) -> Result<bool, StoreError> {
        let due = now_unix_ms();
        {
            let mut table = txn.redb().open_table(self.shared.definition())?;
            if table.get(key)?.is_some() {
                return Ok(false);
            }
            let row = PendingRow {
                task: task.encode_to_vec(),
                attempts: 0,
                due_unix_ms: due,
                last_error: String::new(),
                trace_context,
                customer_id: customer_id.to_owned(),
            };
            table.insert(key, row.encode_to_vec().as_slice())?;
        }
        let shared = self.shared.clone();
        let key = key.to_owned();
        txn.after_commit(move || {
            shared.hold([key.as_str()]);
            shared.push(due, key);
        });
        Ok(true)
    }

    /// Makes the first attempt of each task now, as many at once as the policy's concurrency and for
    /// [`FIRST_ATTEMPTS_BUDGET`] in all. Tasks with a key seen before in `tasks`, and every task while
    /// the store cannot record results, are not attempted. Record each with [`RetryQueue::submit`].
    pub async fn attempt_first(&self, tasks: Vec<NewTask<H::Task>>) -> FirstAttempts<H> {
        use futures::StreamExt;

        let shared = &self.shared;
        let mut by_key = HashMap::with_capacity(tasks.len());
        for new in tasks {
            by_key.entry(new.key.clone()).or_insert(FirstAttempt {
                new,
                finished: None,
            });
        }
        if shared.store.fault().is_some() {
            return FirstAttempts { by_key };
        }
        let deadline = tokio::time::Instant::now() + FIRST_ATTEMPTS_BUDGET;
        let mut finished = Vec::with_capacity(by_key.len());
        {
            // Futures made up front rather than in a `map` closure: such a closure's borrows defeat
            // the compiler's proof that the stream is `Send`.
            let calls: Vec<_> = by_key
                .values()
                .map(|FirstAttempt { new, .. }| {
                    shared.attempt_task(
                        &new.key,
                        &new.task,
                        1,
                        &new.customer_id,
                        &new.trace_context,
                    )
                })
                .collect();
            let mut attempts =
                futures::stream::iter(calls).buffer_unordered(shared.policy.concurrency.max(1));
            while let Ok(Some(done)) = tokio::time::timeout_at(deadline, attempts.next()).await {
                finished.push(done);
            }
        }
        shared.worker.attempts_made();
        for done in finished {
            if let Some(first) = by_key.get_mut(&done.key) {
                first.finished = Some(done);
            }
        }
        FirstAttempts { by_key }
    }

    /// Records `first` inside the caller's transaction: a success or a final failure is settled at
    /// once ([`RetryWork::settle`]); a transient failure is scheduled after its backoff, and a task
    /// not attempted is scheduled due now. Returns `false` (and changes nothing) when a task with this
    /// key is already pending.
    pub fn submit(&self, txn: &mut Txn, first: FirstAttempt<H>) -> Result<bool, StoreError> {
        Ok(self.submit_all(txn, vec![first])?.contains(&true))
    }

    /// [`RetryQueue::submit`] for a batch, in order, with the pending table opened once to look
    /// the keys up and once to schedule what waits, and every settled task handed to
    /// [`RetryWork::settle_all`] together. Answers per task whether it was taken: `false` for a key
    /// already pending, or taken earlier in the same batch.
    pub fn submit_all(
        &self,
        txn: &mut Txn,
        batch: Vec<FirstAttempt<H>>,
    ) -> Result<Vec<bool>, StoreError> {
        let shared = &self.shared;
        let mut taken = Vec::with_capacity(batch.len());
        let mut settling = Vec::new();
        let mut scheduled = Vec::new();
        {
            let table = txn.redb().open_table(shared.definition())?;
            let mut keys = HashSet::with_capacity(batch.len());
            for FirstAttempt { new, finished } in batch {
                if table.get(new.key.as_str())?.is_some() || !keys.insert(new.key.clone()) {
                    taken.push(false);
                    continue;
                }
                taken.push(true);
                let (attempts, due, last_error) = match finished {
                    None => (0, now_unix_ms(), String::new()),
                    Some(done) => match shared.conclude(done.attempt, done.result) {
                        Concluded::Settle(result) => {
                            settling.push(Settling {
                                key: new.key,
                                task: new.task,
                                outcome: Outcome {
                                    result,
                                    attempts: done.attempt,
                                    trace_context: done.trace_context,
                                },
                            });
                            continue;
                        }
                        Concluded::Retry { due, error } => (done.attempt, due, error),
                    },
                };
                let row = PendingRow {
                    task: new.task.encode_to_vec(),
                    attempts,
                    due_unix_ms: due,
                    last_error,
                    trace_context: new.trace_context,
                    customer_id: new.customer_id,
                };
                scheduled.push((new.key, attempts, due, row.encode_to_vec()));
            }
        }
        shared.settle_all(txn, settling)?;
        if scheduled.is_empty() {
            return Ok(taken);
        }
        {
            let mut table = txn.redb().open_table(shared.definition())?;
            for (key, _, _, row) in &scheduled {
                table.insert(key.as_str(), row.as_slice())?;
            }
        }
        let shared = shared.clone();
        txn.after_commit(move || {
            let retries = scheduled.iter().filter(|(_, attempts, ..)| *attempts > 0);
            let retries = retries.count() as u64;
            if retries > 0 {
                names::count(
                    names::RETRIES,
                    [("stage", shared.stage), ("work", shared.work)],
                    retries,
                );
            }
            shared.hold(scheduled.iter().map(|(key, ..)| key.as_str()));
            for (key, _, due, _) in scheduled {
                shared.push(due, key);
            }
        });
        Ok(taken)
    }

    /// Runs attempts and settles them until `shutdown`; then waits for the attempts under way and
    /// settles their results.
    pub async fn run(self, shutdown: CancellationToken) {
        let shared = self.shared;
        match shared.load().await {
            Ok(count) if count > 0 => {
                tracing::info!(work = shared.work, partition = %shared.partition, pending = count, "resuming pending work")
            }
            Ok(_) => {}
            Err(e) => {
                tracing::error!(work = shared.work, partition = %shared.partition, error = %e, "cannot read pending work; not started");
                return;
            }
        }
        let (results_tx, results_rx) = mpsc::channel(shared.policy.concurrency.max(1) * 2);
        let settler = tokio::spawn(settle_results(shared.clone(), results_rx));
        let permits = Arc::new(Semaphore::new(shared.policy.concurrency.max(1)));
        let mut attempts = tokio::task::JoinSet::new();
        let mut condition = shared.store.condition();
        loop {
            // No outside call while the store cannot record its outcome: it would only be made
            // again once the store recovers.
            if shared.store.fault().is_some() {
                tokio::select! {
                    _ = condition.wait_for(|c| matches!(c, crate::store::Condition::Healthy)) => {}
                    () = shutdown.cancelled() => break,
                }
            }
            // Every due task a free slot can take, read from the store in one go.
            let keys = shared.pop_due(permits.available_permits());
            if !keys.is_empty() {
                for (key, row) in shared.read_rows(keys).await {
                    let Ok(permit) = permits.clone().try_acquire_owned() else {
                        // Cannot happen (the slots were counted), but never run unbounded.
                        shared.finish_running(&key);
                        shared.push(now_unix_ms(), key);
                        continue;
                    };
                    let shared = shared.clone();
                    let results = results_tx.clone();
                    attempts.spawn(async move {
                        if let Some(finished) = shared.attempt(&key, row).await {
                            let _ = results.send(finished).await;
                        }
                        drop(permit);
                        shared.wake.notify_one();
                    });
                }
            }
            while attempts.try_join_next().is_some() {}
            // Sleep until the next task is due — or, with every slot taken, until one frees up.
            let next_due = shared
                .next_due()
                .filter(|_| permits.available_permits() > 0);
            let pause = next_due.map_or(Duration::from_secs(3600), |due| {
                Duration::from_millis(due.saturating_sub(now_unix_ms()))
            });
            tokio::select! {
                () = tokio::time::sleep(pause) => {}
                () = shared.wake.notified() => {}
                () = shutdown.cancelled() => break,
            }
        }
        while attempts.join_next().await.is_some() {}
        drop(results_tx);
        let _ = settler.await;
    }
}

impl<H: RetryWork> QueueState<H> {
    fn definition(&self) -> TableDefinition<'_, &'static str, &'static [u8]> {
        TableDefinition::new(&self.table)
    }

    fn push(&self, due: u64, key: String) {
        if let Ok(mut schedule) = self.schedule.lock() {
            schedule.push(Reverse((due, key)));
        }
        self.wake.notify_one();
    }

    /// The keys of up to `max` tasks that are due now and not under way, earliest first; they count
    /// as under way from here.
    fn pop_due(&self, max: usize) -> Vec<String> {
        let now = now_unix_ms();
        let mut keys = Vec::new();
        let (Ok(mut schedule), Ok(mut running)) = (self.schedule.lock(), self.running.lock())
        else {
            return keys;
        };
        while keys.len() < max {
            match schedule.peek() {
                Some(Reverse((due, _))) if *due <= now => {}
                _ => break,
            }
            let Some(Reverse((_, key))) = schedule.pop() else {
                break;
            };
            // A key already under way is a duplicate entry: its attempt reschedules it if needed.
            if running.insert(key.clone()) {
                keys.push(key);
            }
        }
        keys
    }

    /// The pending rows of `keys`, read in one transaction. A key whose row is gone (settled
    /// meanwhile) is released; one that cannot be read is tried again later.
    async fn read_rows(self: &Arc<Self>, keys: Vec<String>) -> Vec<(String, PendingRow)> {
        let shared = self.clone();
        let lookup = keys.clone();
        let read = blocking(move || {
            shared.store.read(|read| {
                let table = read.open_table(shared.definition())?;
                let mut rows = Vec::with_capacity(lookup.len());
                for key in lookup {
                    let row = match table.get(key.as_str())? {
                        Some(bytes) => Some(decode_record::<PendingRow>(
                            "pending work",
                            &key,
                            bytes.value(),
                        )?),
                        None => None,
                    };
                    rows.push((key, row));
                }
                Ok::<_, StoreError>(rows)
            })
        })
        .await;
        match read {
            Ok(Ok(rows)) => rows
                .into_iter()
                .filter_map(|(key, row)| match row {
                    Some(row) => Some((key, row)),
                    None => {
                        self.finish_running(&key);
                        None
                    }
                })
                .collect(),
            failed => {
                if let Ok(Err(e)) = failed {
                    tracing::error!(work = self.work, partition = %self.partition, error = %e, "cannot read pending work; retrying in 1 s");
                }
                for key in keys {
                    self.finish_running(&key);
                    self.push(now_unix_ms() + 1000, key);
                }
                Vec::new()
            }
        }
    }

    fn next_due(&self) -> Option<u64> {
        let schedule = self.schedule.lock().ok()?;
        schedule.peek().map(|Reverse((due, _))| *due)
    }

    /// Counts `keys` as pending, each once.
    fn hold<'k>(&self, keys: impl IntoIterator<Item = &'k str>) {
        if let Ok(mut held) = self.held.lock() {
            let added = keys
                .into_iter()
                .filter(|key| held.insert((*key).to_owned()))
                .count();
            self.admission.add(added);
        }
        self.report_pending();
    }

    /// Counts `keys` as no longer pending.
    fn release(&self, keys: &[String]) {
        if let Ok(mut held) = self.held.lock() {
            let removed = keys.iter().filter(|key| held.remove(key.as_str())).count();
            self.admission.remove(removed);
        }
        self.report_pending();
    }

    fn report_pending(&self) {
        metrics::gauge!(
            names::PENDING_WORK,
            "stage" => self.stage,
            "work" => self.work,
            "partition" => self.partition.clone()
        )
        .set(self.admission.pending() as f64);
    }

    /// Schedules every pending row found on disk (after a restart).
    async fn load(self: &Arc<Self>) -> Result<usize, StoreError> {
        let shared = self.clone();
        let rows = blocking(move || {
            shared.store.read(|read| {
                let table = match read.open_table(shared.definition()) {
                    Ok(table) => table,
                    Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
                    Err(e) => return Err(StoreError::Storage(e.into())),
                };
                let mut rows = Vec::new();
                for row in table.iter().map_err(StoreError::from)? {
                    let (key, bytes) = row.map_err(StoreError::from)?;
                    let pending: PendingRow =
                        decode_record("pending work", key.value(), bytes.value())?;
                    rows.push((pending.due_unix_ms, key.value().to_owned()));
                }
                Ok::<_, StoreError>(rows)
            })
        })
        .await
        .map_err(|_| StoreError::Poisoned)??;
        let count = rows.len();
        self.hold(rows.iter().map(|(_, key)| key.as_str()));
        for (due, key) in rows {
            self.push(due, key);
        }
        Ok(count)
    }

    /// One attempt for `key`, from its pending row.
    async fn attempt(self: &Arc<Self>, key: &str, row: PendingRow) -> Option<Finished<H::Done>> {
        let task = match H::Task::decode(row.task.as_slice()) {
            Ok(task) => task,
            Err(e) => {
                tracing::error!(work = self.work, partition = %self.partition, key, error = %e, "pending task cannot be decoded; left in place");
                self.finish_running(key);
                return None;
            }
        };
        Some(
            self.attempt_task(
                key,
                &task,
                row.attempts + 1,
                &row.customer_id,
                &row.trace_context,
            )
            .await,
        )
    }

    /// Attempt number `attempt` of `task`: runs the stage's call in its own span, a child of the
    /// span whose context is `parent`.
    async fn attempt_task(
        &self,
        key: &str,
        task: &H::Task,
        attempt: u32,
        customer_id: &str,
        parent: &HashMap<String, String>,
    ) -> Finished<H::Done> {
        let span = telemetry::OrderSpan::child_of(parent, || {
            tracing::info_span!(
                parent: None,
                "attempt",
                otel.name = %format_args!("{} attempt", self.work),
                otel.status_description = tracing::field::Empty,
                orderflow.stage = self.stage,
                order.id = key,
                customer.id = customer_id,
                attempt,
                outcome = tracing::field::Empty,
            )
        });
        let started = Instant::now();
        let result = self
            .worker
            .attempt(key, task, attempt)
            .instrument(span.span().clone())
            .await;
        names::observe(
            names::ATTEMPT_SECONDS,
            [("stage", self.stage), ("work", self.work)],
            started.elapsed().as_secs_f64(),
        );
        let outcome = match &result {
            Attempt::Done(_) => "done",
            Attempt::Retry { error, .. } => {
                span.record("otel.status_description", error.as_str());
                "transient failure"
            }
            Attempt::Fail { error } => {
                span.record("otel.status_description", error.as_str());
                "permanent failure"
            }
        };
        span.record("outcome", outcome);
        names::count(
            names::ATTEMPTS,
            [
                ("stage", self.stage),
                ("work", self.work),
                ("outcome", outcome),
            ],
            1,
        );
        Finished {
            key: key.to_owned(),
            attempt,
            result,
            trace_context: span.into_context(),
        }
    }

    /// Where attempt number `attempt`, which came to `result`, leaves its task.
    fn conclude(&self, attempt: u32, result: Attempt<H::Done>) -> Concluded<H::Done> {
        match result {
            Attempt::Done(done) => Concluded::Settle(Ok(done)),
            Attempt::Retry { error, after } if attempt < self.policy.max_attempts => {
                Concluded::Retry {
                    due: now_unix_ms() + self.policy.pause(attempt, after).as_millis() as u64,
                    error,
                }
            }
            Attempt::Retry { error, .. } => Concluded::Settle(Err(Failure {
                error,
                exhausted: true,
            })),
            Attempt::Fail { error } => Concluded::Settle(Err(Failure {
                error,
                exhausted: false,
            })),
        }
    }

    /// Hands tasks' final outcomes to the stage, counting each failure as a dead letter.
    fn settle_all(
        &self,
        txn: &mut Txn,
        settling: Vec<Settling<H::Task, H::Done>>,
    ) -> Result<(), StoreError> {
        if settling.is_empty() {
            return Ok(());
        }
        let failed = settling
            .iter()
            .filter(|s| s.outcome.result.is_err())
            .count();
        if failed > 0 {
            metrics::counter!(
                names::DEAD_LETTERS,
                "stage" => self.stage,
                "work" => self.work,
                "partition" => self.partition.clone()
            )
            .increment(failed as u64);
        }
        self.worker.settle_all(txn, settling)
    }

    fn finish_running(&self, key: &str) {
        if let Ok(mut running) = self.running.lock() {
            running.remove(key);
        }
    }
}

/// Applies attempt results, as many as are waiting per transaction.
async fn settle_results<H: RetryWork>(
    shared: Arc<QueueState<H>>,
    mut results: mpsc::Receiver<Finished<H::Done>>,
) {
    let mut batch = Vec::new();
    while results.recv_many(&mut batch, 1024).await > 0 {
        let finished: Vec<_> = std::mem::take(&mut batch);
        shared.worker.attempts_made();
        let keys: Vec<String> = finished.iter().map(|f| f.key.clone()).collect();
        let writer = shared.clone();
        let settled = blocking(move || {
            writer
                .store
                .write(|txn| settle_batch(&writer, txn, finished))
        })
        .await;
        // On success the commit hook has released the keys; otherwise every result is lost and the
        // rows are as before: attempt them again.
        if !matches!(settled, Ok(Ok(()))) {
            if let Ok(Err(e)) = &settled {
                tracing::error!(work = shared.work, partition = %shared.partition, error = %e, tasks = keys.len(), "cannot settle attempts; they will be made again");
            }
            for key in keys {
                shared.finish_running(&key);
                shared.push(now_unix_ms() + 1000, key);
            }
        }
    }
}

fn settle_batch<H: RetryWork>(
    shared: &Arc<QueueState<H>>,
    txn: &mut Txn,
    finished: Vec<Finished<H::Done>>,
) -> Result<(), StoreError> {
    let mut settled = Vec::new();
    let mut settling = Vec::new();
    let mut retries = Vec::new();
    let keys: Vec<String> = finished.iter().map(|f| f.key.clone()).collect();
    {
        let mut table = txn.redb().open_table(shared.definition())?;
        for Finished {
            key,
            attempt,
            result,
            trace_context,
        } in finished
        {
            let bytes = table.get(key.as_str())?.map(|v| v.value().to_vec());
            let row = match bytes {
                Some(bytes) => decode_record::<PendingRow>("pending work", &key, &bytes)?,
                None => continue,
            };
            let result = match shared.conclude(attempt, result) {
                Concluded::Settle(result) => result,
                Concluded::Retry { due, error } => {
                    let updated = PendingRow {
                        attempts: attempt,
                        due_unix_ms: due,
                        last_error: error,
                        ..row
                    };
                    table.insert(key.as_str(), updated.encode_to_vec().as_slice())?;
                    retries.push((due, key));
                    continue;
                }
            };
            table.remove(key.as_str())?;
            let task = decode_record::<H::Task>("pending work", &key, &row.task)?;
            settled.push(key.clone());
            settling.push(Settling {
                key,
                task,
                outcome: Outcome {
                    result,
                    attempts: attempt,
                    trace_context,
                },
            });
        }
    }
    shared.settle_all(txn, settling)?;
    let after = shared.clone();
    txn.after_commit(move || {
        // Release before scheduling again, or the schedule would take a retry for a duplicate.
        for key in &keys {
            after.finish_running(key);
        }
        metrics::counter!(
            names::RETRIES,
            "stage" => after.stage,
            "work" => after.work,
            "partition" => after.partition.clone()
        )
        .increment(retries.len() as u64);
        for (due, key) in retries {
            after.push(due, key);
        }
        after.release(&settled);
        after.wake.notify_one();
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::sync::atomic::{AtomicU32, Ordering};

    use orderflow_proto::v1::Event;

    use super::*;

    /// Fails `fail_first` attempts of every task transiently, then succeeds; tasks named "never"
    /// always fail transiently and tasks named "bad" fail permanently. Settling appends an event
    /// naming the key, the result and the attempts.
    struct Flaky {
        fail_first: u32,
        calls: AtomicU32,
        max_parallel: AtomicU32,
        running: AtomicU32,
    }

    impl Flaky {
        fn new(fail_first: u32) -> Arc<Self> {
            Arc::new(Flaky {
                fail_first,
                calls: AtomicU32::new(0),
                max_parallel: AtomicU32::new(0),
                running: AtomicU32::new(0),
            })
        }
    }

    impl RetryWork for Flaky {
        type Task = Event;
        type Done = ();

        async fn attempt(&self, key: &str, _task: &Event, attempt: u32) -> Attempt<()> {
            let now = self.running.fetch_add(1, Ordering::SeqCst) + 1;
            self.max_parallel.fetch_max(now, Ordering::SeqCst);
            self.calls.fetch_add(1, Ordering::SeqCst);
            let pause = if key == "slow" { 60_000 } else { 2 };
            tokio::time::sleep(Duration::from_millis(pause)).await;
            self.running.fetch_sub(1, Ordering::SeqCst);
            match key {
                "bad" => Attempt::Fail { error: "no".into() },
                "never" => Attempt::Retry {
                    error: "down".into(),
                    after: None,
                },
                _ if attempt <= self.fail_first => Attempt::Retry {
                    error: "down".into(),
                    after: None,
                },
                _ => Attempt::Done(()),
            }
        }

        fn settle(
            &self,
            txn: &mut Txn,
            key: &str,
            _task: Event,
            outcome: Outcome<()>,
        ) -> Result<(), StoreError> {
            let what = match &outcome.result {
                Ok(()) => "done".to_owned(),
                Err(f) if f.exhausted => "exhausted".to_owned(),
                Err(_) => "failed".to_owned(),
            };
            txn.append(&Event {
                order_id: format!("{key} {what} {}", outcome.attempts),
                ..Default::default()
            });
            Ok(())
        }
    }

    fn policy() -> RetryPolicy {
        RetryPolicy {
            max_attempts: 4,
            backoff_min: Duration::from_millis(1),
            backoff_max: Duration::from_millis(5),
            concurrency: 3,
            max_pending: 100,
        }
    }

    async fn settled(store: &Store, count: u64) -> Vec<String> {
        let deadline = Instant::now() + Duration::from_secs(20);
        while store.outbox().next_offset() < count {
            assert!(
                Instant::now() < deadline,
                "only {} settled",
                store.outbox().next_offset()
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let mut out: Vec<_> = store
            .outbox()
            .read_log(0, 1000, usize::MAX)
            .unwrap()
            .into_iter()
            .map(|e| e.decode_event().unwrap().order_id)
            .collect();
        out.sort();
        out
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn tasks_are_retried_then_settled_once_each() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("q.redb")).unwrap();
        let handler = Flaky::new(2);
        let queue = RetryQueue::new("test", "call", store.clone(), handler.clone(), policy());
        let shutdown = CancellationToken::new();
        let runner = tokio::spawn(queue.clone().run(shutdown.clone()));
        store
            .write(|txn| {
                for key in ["a", "b", "c", "d", "bad", "never"] {
                    assert!(queue.enqueue(txn, key, "c", &Event::default(), HashMap::new())?);
                }
                // A second enqueue of a pending key does nothing.
                assert!(!queue.enqueue(txn, "a", "c", &Event::default(), HashMap::new())?);
                Ok::<_, StoreError>(())
            })
            .unwrap();
        let outcomes = settled(&store, 6).await;
        assert_eq!(
            outcomes,
            vec![
                "a done 3",
                "b done 3",
                "bad failed 1",
                "c done 3",
                "d done 3",
                "never exhausted 4"
            ]
        );
        assert_eq!(handler.calls.load(Ordering::SeqCst), 4 * 3 + 1 + 4);
        assert!(handler.max_parallel.load(Ordering::SeqCst) <= 3);
        // The count drops in the settling commit's hook, just after the log shows the outcome.
        let deadline = Instant::now() + Duration::from_secs(20);
        while queue.admission().pending() != 0 {
            assert!(
                Instant::now() < deadline,
                "{} still held",
                queue.admission().pending()
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        shutdown.cancel();
        runner.await.unwrap();
    }

    fn new_task(key: &str) -> NewTask<Event> {
        NewTask {
            key: key.into(),
            customer_id: "c".into(),
            task: Event::default(),
            trace_context: HashMap::new(),
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn first_attempts_settle_in_the_batch_and_only_retries_wait() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("q.redb")).unwrap();
        let handler = Flaky::new(0);
        let queue = RetryQueue::new("test", "call", store.clone(), handler.clone(), policy());
        let mut first = queue
            .attempt_first(["a", "b", "bad", "never", "a"].map(new_task).into())
            .await;
        // The second "a" is the same task: attempted once.
        assert_eq!(handler.calls.load(Ordering::SeqCst), 4);
        store
            .write(|txn| {
                for key in ["a", "b", "bad", "never"] {
                    assert!(queue.submit(txn, first.take(key).unwrap())?);
                }
                assert!(first.take("a").is_none());
                // Not attempted: scheduled, due now.
                assert!(queue.submit(txn, FirstAttempt::not_attempted(new_task("late")))?);
                // Already pending: nothing changes.
                assert!(!queue.submit(txn, FirstAttempt::not_attempted(new_task("never")))?);
                Ok::<_, StoreError>(())
            })
            .unwrap();
        // Settled in that transaction, without the queue's table or its runner.
        assert_eq!(
            settled(&store, 3).await,
            vec!["a done 1", "b done 1", "bad failed 1"]
        );
        assert_eq!(
            pending_keys(&store, &queue),
            [("late".to_owned(), 0), ("never".to_owned(), 1)]
        );
        assert_eq!(queue.admission().pending(), 2);
        // The runner takes what waits from there: "never" has three attempts left.
        let shutdown = CancellationToken::new();
        let runner = tokio::spawn(queue.clone().run(shutdown.clone()));
        assert_eq!(
            settled(&store, 5).await,
            vec![
                "a done 1",
                "b done 1",
                "bad failed 1",
                "late done 1",
                "never exhausted 4"
            ]
        );
        shutdown.cancel();
        runner.await.unwrap();
    }

    /// The keys pending in `queue`'s table, with the attempts each has had.
    fn pending_keys(store: &Store, queue: &RetryQueue<Flaky>) -> Vec<(String, u32)> {
        store
            .read(|read| {
                let table = read.open_table(queue.shared.definition())?;
                let mut keys = Vec::new();
                for row in table.iter()? {
                    let (key, bytes) = row?;
                    let row = PendingRow::decode(bytes.value()).unwrap();
                    keys.push((key.value().to_owned(), row.attempts));
                }
                Ok::<_, StoreError>(keys)
            })
            .unwrap()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_batch_is_submitted_at_once_and_each_key_taken_once() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("q.redb")).unwrap();
        let queue = RetryQueue::new("test", "call", store.clone(), Flaky::new(0), policy());
        store
            .write(|txn| queue.submit(txn, FirstAttempt::not_attempted(new_task("p"))))
            .unwrap();
        let mut first = queue
            .attempt_first(["a", "bad", "never"].map(new_task).into())
            .await;
        let batch = vec![
            first.take("a").unwrap(),
            // Pending from an earlier transaction.
            FirstAttempt::not_attempted(new_task("p")),
            first.take("bad").unwrap(),
            // Taken earlier in this batch.
            FirstAttempt::not_attempted(new_task("a")),
            first.take("never").unwrap(),
            FirstAttempt::not_attempted(new_task("late")),
        ];
        let taken = store.write(|txn| queue.submit_all(txn, batch)).unwrap();
        assert_eq!(taken, [true, false, true, false, true, true]);
        // The decided ones settled in that transaction, in order; the others wait.
        assert_eq!(settled(&store, 2).await, vec!["a done 1", "bad failed 1"]);
        assert_eq!(
            pending_keys(&store, &queue),
            [
                ("late".to_owned(), 0),
                ("never".to_owned(), 1),
                ("p".to_owned(), 0)
            ]
        );
        assert_eq!(queue.admission().pending(), 3);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_slow_first_attempt_is_left_to_the_queue_after_the_budget() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("q.redb")).unwrap();
        let queue = RetryQueue::new("test", "call", store.clone(), Flaky::new(0), policy());
        let started = Instant::now();
        let mut first = queue
            .attempt_first(["a", "slow"].map(new_task).into())
            .await;
        let took = started.elapsed();
        assert!(took >= FIRST_ATTEMPTS_BUDGET, "{took:?}");
        assert!(
            took < Duration::from_secs(30),
            "waited for the slow attempt: {took:?}"
        );
        assert!(first.take("a").unwrap().finished.is_some());
        assert!(first.take("slow").unwrap().finished.is_none());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn no_first_attempt_while_the_store_cannot_record_it() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("q.redb")).unwrap();
        let handler = Flaky::new(0);
        let queue = RetryQueue::new("test", "call", store.clone(), handler.clone(), policy());
        // As the first failed commit on a full volume does.
        let full = StoreError::Storage(redb::Error::Io(std::io::Error::from_raw_os_error(28)));
        assert!(store.observe::<()>(Err(full)).is_err());
        let mut first = queue.attempt_first(vec![new_task("a")]).await;
        assert_eq!(handler.calls.load(Ordering::SeqCst), 0);
        assert!(first.take("a").unwrap().finished.is_none());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn pending_tasks_survive_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("q.redb")).unwrap();
        let handler = || Flaky::new(0);
        // Enqueued but never run: as after a crash right after the commit.
        let queue = RetryQueue::new("test", "call", store.clone(), handler(), policy());
        store
            .write(|txn| {
                queue.enqueue(txn, "x", "c", &Event::default(), HashMap::new())?;
                queue.enqueue(txn, "y", "c", &Event::default(), HashMap::new())
            })
            .unwrap();
        drop(queue);
        let queue = RetryQueue::new("test", "call", store.clone(), handler(), policy());
        let shutdown = CancellationToken::new();
        let runner = tokio::spawn(queue.clone().run(shutdown.clone()));
        assert_eq!(settled(&store, 2).await, vec!["x done 1", "y done 1"]);
        shutdown.cancel();
        runner.await.unwrap();
    }

    #[test]
    fn pauses_grow_jitter_and_honour_retry_after() {
        let p = RetryPolicy {
            max_attempts: 10,
            backoff_min: Duration::from_millis(100),
            backoff_max: Duration::from_secs(5),
            concurrency: 1,
            max_pending: 1,
        };
        for _ in 0..100 {
            let first = p.pause(1, None);
            assert!(first >= Duration::from_millis(50) && first <= Duration::from_millis(100));
            let fourth = p.pause(4, None);
            assert!(fourth >= Duration::from_millis(400) && fourth <= Duration::from_millis(800));
            assert!(p.pause(30, None) <= Duration::from_secs(5));
            assert!(p.pause(1, Some(Duration::from_secs(7))) >= Duration::from_secs(7));
            assert!(p.pause(1, Some(Duration::from_secs(86_400))) <= Duration::from_secs(3600));
        }
    }
}
