//! Payment capture: the [`PaymentGateway`] trait and the gateway orderflow ships, a simulated one.
//!
//! # The simulated gateway
//! It behaves like an outside payment provider, with faults an operator can dial in (flags at start,
//! `SetFaults` at run time):
//! - `latency` before every answer;
//! - `transient_failure_rate`: the share of requests that fail transiently. Half of them never reach
//!   the gateway (nothing charged); the other half are charged but the answer is lost (the caller
//!   sees a timeout) — the case that charges twice unless retries carry an idempotency key;
//! - `decline_rate`: the share of the remaining requests it declines (final).
//!
//! It honours idempotency keys: a request whose key it has seen gets the first answer again and is
//! never charged twice. A void (refund) of a key cancels its capture, if there is one, and keeps any
//! later capture under that key from going through. Its ledger lives in its own file
//! (`<data-dir>/gateway.redb`), outside the invoice stage's transactions, as a real provider's would;
//! each answer is durable before it is given (group commit). `ListCaptures` reads it, so tests and
//! operators can count the charges.
//!
//! Each invoice replica has a gateway (and ledger) of its own, numbering its captures: replica 0's
//! are `cap_0000000001`, `cap_0000000002`, …, replica r's `cap_r<r>_0000000001`, …, so a capture id
//! names one charge across all replicas.

use std::{
    future::Future,
    path::Path,
    sync::{
        RwLock,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use orderflow_proto::v1::{Capture, GatewayStats, Money};
use orderflow_runtime::{
    GroupCommit, Store, StoreError, Txn, WriterName, decode_record, now_timestamp,
};
use prost::Message;
use rand::Rng;
use redb::{ReadableTable, TableDefinition};
use tokio::task::JoinHandle;

/// One capture: charge `amount` for `order_id`, once per `idempotency_key`.
#[derive(Debug, Clone)]
pub struct CaptureRequest {
    pub idempotency_key: String,
    pub order_id: String,
    pub amount: Money,
}

/// A successful capture.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Captured {
    pub capture_id: String,
}

/// Why a capture did not go through.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PaymentError {
    /// The provider said no; asking again will not change that.
    #[error("declined: {0}")]
    Declined(String),
    /// The provider could not be reached or did not answer; the same request may succeed later.
    #[error("{0}")]
    Transient(String),
}

/// A payment provider. Implementations must honour the idempotency key: the same key never charges
/// twice, however often it is presented.
pub trait PaymentGateway: Send + Sync + 'static {
    fn capture(
        &self,
        request: CaptureRequest,
    ) -> impl Future<Output = Result<Captured, PaymentError>> + Send;

    /// Voids whatever was captured under `idempotency_key` — the capture id, or `None` when nothing
    /// was — and refuses any later capture under it. Idempotent.
    fn void(
        &self,
        idempotency_key: &str,
    ) -> impl Future<Output = Result<Option<String>, PaymentError>> + Send;
}

/// The simulated gateway's fault settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Faults {
    pub latency: Duration,
    /// 0.0 to 1.0.
    pub transient_failure_rate: f64,
    /// 0.0 to 1.0.
    pub decline_rate: f64,
}

/// The ledger's page cache: it only looks keys up and appends.
const LEDGER_CACHE_BYTES: usize = 4 * 1024 * 1024;
/// The ledger's group commit, in metrics.
const LEDGER_WRITER: WriterName = WriterName {
    stage: "invoice",
    writer: "gateway_ledger",
};

/// Longest latency the simulated gateway accepts.
pub const MAX_LATENCY: Duration = Duration::from_secs(60);

const BY_KEY: TableDefinition<&str, &[u8]> = TableDefinition::new("gateway_by_key");
pub(crate) const CAPTURES: TableDefinition<u64, &[u8]> = TableDefinition::new("gateway_captures");
pub(crate) const CAPTURES_NAME: &str = "gateway_captures";

/// What the ledger remembers per idempotency key.
#[derive(Clone, PartialEq, prost::Message)]
struct KeyEntry {
    /// Sequence of the capture; 0 for a decline or a void without capture.
    #[prost(uint64, tag = "1")]
    sequence: u64,
    #[prost(string, tag = "2")]
    capture_id: String,
    /// The key was voided: no capture under it goes through any more.
    #[prost(bool, tag = "3")]
    voided: bool,
}

enum LedgerWrite {
    Capture {
        request: CaptureRequest,
        decline: bool,
    },
    Void {
        key: String,
    },
}

/// The ledger's answer: the capture (if any), whether the key was seen before, and whether it is
/// voided.
struct LedgerAnswer {
    capture_id: Option<String>,
    replayed: bool,
    voided: bool,
}

/// Why the ledger could not answer: its store's error, as text (every caller of a failed batch
/// gets it).
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
struct LedgerError(String);

impl From<StoreError> for LedgerError {
    fn from(e: StoreError) -> Self {
        LedgerError(e.to_string())
    }
}

/// The simulated provider.
pub struct SimulatedGateway {
    faults: RwLock<Faults>,
    ledger: GroupCommit<LedgerWrite, LedgerAnswer, LedgerError>,
    store: Store,
    requests: AtomicU64,
    captures: AtomicU64,
    declines: AtomicU64,
    unreachable: AtomicU64,
    timeouts_after_capture: AtomicU64,
    idempotent_replays: AtomicU64,
    voids: AtomicU64,
}

impl SimulatedGateway {
    /// Opens (or creates) the ledger at `path` of invoice replica 0; the returned task ends once
    /// the gateway is dropped.
    pub fn open(path: &Path, faults: Faults) -> Result<(Self, JoinHandle<()>), StoreError> {
        Self::open_for_replica(path, faults, 0)
    }

    /// [`SimulatedGateway::open`] for invoice replica `replica`, whose capture ids say so.
    pub fn open_for_replica(
        path: &Path,
        faults: Faults,
        replica: u32,
    ) -> Result<(Self, JoinHandle<()>), StoreError> {
        let store = Store::open_with_cache(path, LEDGER_CACHE_BYTES)?;
        store.write(|txn| {
            txn.redb().open_table(BY_KEY)?;
            txn.redb().open_table(CAPTURES)?;
            Ok::<_, StoreError>(())
        })?;
        let prefix = capture_prefix(replica);
        let (ledger, writer) =
            GroupCommit::start(store.clone(), LEDGER_WRITER, 1024, move |txn, writes| {
                record(txn, &prefix, writes)
            });
        Ok((
            SimulatedGateway {
                faults: RwLock::new(faults),
                ledger,
                store,
                requests: AtomicU64::new(0),
                captures: AtomicU64::new(0),
                declines: AtomicU64::new(0),
                unreachable: AtomicU64::new(0),
                timeouts_after_capture: AtomicU64::new(0),
                idempotent_replays: AtomicU64::new(0),
                voids: AtomicU64::new(0),
            },
            writer,
        ))
    }

    pub fn faults(&self) -> Faults {
        self.faults.read().map_or(
            Faults {
                latency: Duration::ZERO,
                transient_failure_rate: 0.0,
                decline_rate: 0.0,
            },
            |f| *f,
        )
    }

    pub fn set_faults(&self, faults: Faults) {
        if let Ok(mut current) = self.faults.write() {
            *current = faults;
        }
    }

    pub fn stats(&self) -> GatewayStats {
        let get = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        GatewayStats {
            requests: get(&self.requests),
            captures: get(&self.captures),
            declines: get(&self.declines),
            unreachable: get(&self.unreachable),
            timeouts_after_capture: get(&self.timeouts_after_capture),
            idempotent_replays: get(&self.idempotent_replays),
            voids: get(&self.voids),
        }
    }

    /// Waits the configured latency, then rolls the transient-failure dice: `Err` for a request that
    /// never reached the gateway, `Ok(true)` for one whose answer will be lost after processing.
    async fn reach(&self) -> Result<bool, PaymentError> {
        let faults = self.faults();
        if !faults.latency.is_zero() {
            tokio::time::sleep(faults.latency).await;
        }
        let (transient, answer_lost) = {
            let mut rng = rand::rng();
            let transient = rng.random_bool(faults.transient_failure_rate.clamp(0.0, 1.0));
            (transient, transient && rng.random_bool(0.5))
        };
        if transient && !answer_lost {
            self.unreachable.fetch_add(1, Ordering::Relaxed);
            return Err(PaymentError::Transient(
                "gateway unreachable (simulated)".into(),
            ));
        }
        Ok(answer_lost)
    }

    async fn write(&self, write: LedgerWrite) -> Result<LedgerAnswer, PaymentError> {
        self.ledger
            .submit(write)
            .await
            .map_err(|e| PaymentError::Transient(format!("gateway error: {e}")))
    }

    fn lose_answer(&self) -> PaymentError {
        self.timeouts_after_capture.fetch_add(1, Ordering::Relaxed);
        PaymentError::Transient("gateway timed out (simulated; the request was processed)".into())
    }

    /// The ledger's store, for `ListCaptures`.
    pub(crate) fn ledger_store(&self) -> &Store {
        &self.store
    }
}

impl PaymentGateway for SimulatedGateway {
    async fn capture(&self, request: CaptureRequest) -> Result<Captured, PaymentError> {
        self.requests.fetch_add(1, Ordering::Relaxed);
        let answer_lost = self.reach().await?;
        let decline = rand::rng().random_bool(self.faults().decline_rate.clamp(0.0, 1.0));
        let answer = self
            .write(LedgerWrite::Capture { request, decline })
            .await?;
        if answer.replayed {
            self.idempotent_replays.fetch_add(1, Ordering::Relaxed);
        } else if answer.capture_id.is_some() {
            self.captures.fetch_add(1, Ordering::Relaxed);
        } else {
            self.declines.fetch_add(1, Ordering::Relaxed);
        }
        if answer_lost {
            return Err(self.lose_answer());
        }
        match answer.capture_id {
            Some(capture_id) if !answer.voided => Ok(Captured { capture_id }),
            Some(_) => Err(PaymentError::Declined("the payment was voided".into())),
            None if answer.voided => Err(PaymentError::Declined("the payment was voided".into())),
            None => Err(PaymentError::Declined("card declined (simulated)".into())),
        }
    }

    async fn void(&self, idempotency_key: &str) -> Result<Option<String>, PaymentError> {
        self.requests.fetch_add(1, Ordering::Relaxed);
        let answer_lost = self.reach().await?;
        let answer = self
            .write(LedgerWrite::Void {
                key: idempotency_key.to_owned(),
            })
            .await?;
        if !answer.replayed && answer.capture_id.is_some() {
            self.voids.fetch_add(1, Ordering::Relaxed);
        }
        if answer_lost {
            return Err(self.lose_answer());
        }
        Ok(answer.capture_id)
    }
}

/// How the capture ids of invoice replica `replica` begin: `cap_` for replica 0, as before there
/// were replicas, `cap_r<replica>_` for the others.
fn capture_prefix(replica: u32) -> String {
    match replica {
        0 => "cap_".to_owned(),
        r => format!("cap_r{r}_"),
    }
}

/// Records a batch of requests in one transaction: a known key gets its first answer again. New
/// captures are numbered after `prefix`.
fn record(
    txn: &mut Txn,
    prefix: &str,
    writes: Vec<LedgerWrite>,
) -> Result<Vec<Result<LedgerAnswer, LedgerError>>, StoreError> {
    let mut answers = Vec::with_capacity(writes.len());
    for write in writes {
        let answer = match write {
            LedgerWrite::Capture { request, decline } => capture(txn, prefix, request, decline)?,
            LedgerWrite::Void { key } => void(txn, &key)?,
        };
        answers.push(Ok(answer));
    }
    Ok(answers)
}

fn key_entry(txn: &Txn, key: &str) -> Result<Option<KeyEntry>, StoreError> {
    match txn.redb().open_table(BY_KEY)?.get(key)? {
        Some(bytes) => decode_record("gateway_by_key", key, bytes.value()).map(Some),
        None => Ok(None),
    }
}

fn put_key_entry(txn: &Txn, key: &str, entry: &KeyEntry) -> Result<(), StoreError> {
    txn.redb()
        .open_table(BY_KEY)?
        .insert(key, entry.encode_to_vec().as_slice())?;
    Ok(())
}

fn answer(entry: &KeyEntry, replayed: bool) -> LedgerAnswer {
    LedgerAnswer {
        capture_id: (entry.sequence != 0).then(|| entry.capture_id.clone()),
        replayed,
        voided: entry.voided,
    }
}

fn capture(
    txn: &mut Txn,
    prefix: &str,
    request: CaptureRequest,
    decline: bool,
) -> Result<LedgerAnswer, StoreError> {
    let key = request.idempotency_key.clone();
    if let Some(entry) = key_entry(txn, &key)? {
        return Ok(answer(&entry, true));
    }
    let entry = if decline {
        KeyEntry::default()
    } else {
        let mut captures = txn.redb().open_table(CAPTURES)?;
        let sequence = captures.last()?.map_or(1, |(k, _)| k.value() + 1);
        let capture = Capture {
            sequence,
            capture_id: format!("{prefix}{sequence:010}"),
            idempotency_key: key.clone(),
            order_id: request.order_id,
            amount: Some(request.amount),
            captured_at: Some(now_timestamp()),
            voided_at: None,
        };
        captures.insert(sequence, capture.encode_to_vec().as_slice())?;
        KeyEntry {
            sequence,
            capture_id: capture.capture_id,
            voided: false,
        }
    };
    put_key_entry(txn, &key, &entry)?;
    Ok(answer(&entry, false))
}

fn void(txn: &mut Txn, key: &str) -> Result<LedgerAnswer, StoreError> {
    let mut entry = key_entry(txn, key)?.unwrap_or_default();
    let replayed = entry.voided;
    if !entry.voided {
        entry.voided = true;
        if entry.sequence != 0 {
            let mut captures = txn.redb().open_table(CAPTURES)?;
            let bytes = captures.get(entry.sequence)?.map(|v| v.value().to_vec());
            if let Some(bytes) = bytes {
                let mut capture: Capture = decode_record(CAPTURES_NAME, entry.sequence, &bytes)?;
                capture.voided_at = Some(now_timestamp());
                captures.insert(entry.sequence, capture.encode_to_vec().as_slice())?;
            }
        }
        put_key_entry(txn, key, &entry)?;
    }
    Ok(answer(&entry, replayed))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn request(order: &str) -> CaptureRequest {
        CaptureRequest {
            idempotency_key: format!("key-{order}"),
            order_id: order.into(),
            amount: Money::new(1000, "EUR"),
        }
    }

    fn faults(transient: f64, decline: f64) -> Faults {
        Faults {
            latency: Duration::ZERO,
            transient_failure_rate: transient,
            decline_rate: decline,
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_key_is_charged_once_however_often_it_is_retried() {
        let dir = tempfile::tempdir().unwrap();
        let (gateway, writer) =
            SimulatedGateway::open(&dir.path().join("g.redb"), faults(0.5, 0.0)).unwrap();
        let mut captured = None;
        for _ in 0..200 {
            match gateway.capture(request("o1")).await {
                Ok(c) => {
                    assert!(captured.is_none() || captured.as_ref() == Some(&c));
                    captured = Some(c);
                }
                Err(PaymentError::Transient(_)) => {}
                Err(e) => panic!("{e}"),
            }
        }
        assert!(captured.is_some());
        let stats = gateway.stats();
        assert_eq!(stats.captures, 1, "{stats:?}");
        assert!(
            stats.timeouts_after_capture > 0 && stats.unreachable > 0,
            "{stats:?}"
        );
        drop(gateway);
        writer.await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn declines_are_remembered_and_the_ledger_survives_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("g.redb");
        let (gateway, writer) = SimulatedGateway::open(&path, faults(0.0, 1.0)).unwrap();
        assert!(matches!(
            gateway.capture(request("no")).await,
            Err(PaymentError::Declined(_))
        ));
        gateway.set_faults(faults(0.0, 0.0));
        assert!(matches!(
            gateway.capture(request("no")).await,
            Err(PaymentError::Declined(_))
        ));
        let first = gateway.capture(request("yes")).await.unwrap();
        drop(gateway);
        writer.await.unwrap();
        let (gateway, writer) = SimulatedGateway::open(&path, faults(0.0, 0.0)).unwrap();
        assert_eq!(gateway.capture(request("yes")).await.unwrap(), first);
        assert_eq!(gateway.stats().idempotent_replays, 1);
        drop(gateway);
        writer.await.unwrap();
    }

    /// Two replicas' ledgers number their captures apart: no id names two charges.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn each_replica_numbers_its_own_captures_apart() {
        let dir = tempfile::tempdir().unwrap();
        let mut ids = Vec::new();
        for replica in [0, 1, 2] {
            let path = dir.path().join(format!("g{replica}.redb"));
            let (gateway, writer) =
                SimulatedGateway::open_for_replica(&path, faults(0.0, 0.0), replica).unwrap();
            for order in ["a", "b"] {
                ids.push(gateway.capture(request(order)).await.unwrap().capture_id);
            }
            drop(gateway);
            writer.await.unwrap();
        }
        assert_eq!(
            ids,
            [
                "cap_0000000001",
                "cap_0000000002",
                "cap_r1_0000000001",
                "cap_r1_0000000002",
                "cap_r2_0000000001",
                "cap_r2_0000000002",
            ]
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_void_cancels_the_capture_and_any_later_one() {
        let dir = tempfile::tempdir().unwrap();
        let (gateway, writer) =
            SimulatedGateway::open(&dir.path().join("g.redb"), faults(0.0, 0.0)).unwrap();
        let captured = gateway.capture(request("paid")).await.unwrap();
        assert_eq!(
            gateway.void("key-paid").await.unwrap(),
            Some(captured.capture_id.clone())
        );
        assert_eq!(
            gateway.void("key-paid").await.unwrap(),
            Some(captured.capture_id)
        );
        assert_eq!(gateway.stats().voids, 1);
        // A key voided before any capture: nothing to give back, and no capture afterwards.
        assert_eq!(gateway.void("key-late").await.unwrap(), None);
        assert!(matches!(
            gateway.capture(request("late")).await,
            Err(PaymentError::Declined(_))
        ));
        assert_eq!(gateway.stats().captures, 1);
        drop(gateway);
        writer.await.unwrap();
    }
}
