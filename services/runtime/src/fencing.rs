//! Which process may apply a log as one of its consumers, and from which store.
//!
//! A stage reads its upstream's log as a named consumer ("stock") into a store of its own. Two
//! things must never happen: two processes applying the same log as the same consumer (a second
//! replica, a copy of a volume, a container the orchestrator thinks is gone), and a store resuming
//! from a log it cannot resume from. A subscriber that owns a store says so in `Subscribe`
//! ([`Owner`]): a random incarnation, new at every start, the offset its store has consumed up to,
//! and the id of the log it consumed. The log then refuses, with `FAILED_PRECONDITION` and a
//! `google.rpc.ErrorInfo` of domain `orderflow` whose reason names the case ([`Refusal`]):
//!
//! - **`STORE_BEHIND`**: the store has consumed less than its consumer acknowledged. The consumer
//!   acknowledges only what its store committed, so this store is not the one that did: its volume
//!   was lost (an empty store) or restored from an older copy. Resuming would apply again what the
//!   lost store already applied and passed on.
//! - **`LOG_REPLACED`**: the store consumed a log with another id, or more entries than this log
//!   holds: this log's own store was replaced, and its offsets mean other entries.
//! - **`HELD`**: another process has a stream open as the same consumer. The log remembers, per
//!   consumer, the process holding it ([`Owners`]) for as long as one of its streams is open; a
//!   second process waits until they have all ended (it died, or the connection was cut long
//!   enough for HTTP/2 keepalive to close it) and then takes over.
//! - **`FENCED`**: the process was taken over from. It can neither subscribe nor acknowledge again,
//!   so a process that was frozen or cut off and comes back finds its place taken and stops.
//!
//! The store checks come before the claim, so a process with a stale store never holds a consumer.
//! The claims are in memory: a log that restarts forgets them, and the first owner to come back
//! holds the consumer; a stale process cannot take it even then, because its store is behind what
//! the current one acknowledged. A subscriber refused for any of these reasons reports its stage
//! NOT_SERVING and tries again with backoff; a fenced one stops reading until it is restarted.

use std::{
    collections::{HashMap, VecDeque},
    sync::{Arc, Mutex},
};

use orderflow_proto::v1::Owner;
use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

use crate::outbox::Outbox;

/// The `ErrorInfo` domain of a refusal.
pub const DOMAIN: &str = "orderflow";
/// Fenced incarnations remembered per consumer: far more than restarts between two restarts of the
/// log.
const FENCED_KEPT: usize = 64;

/// Why a log refuses an owner.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    StoreBehind,
    LogReplaced,
    Held,
    Fenced,
}

impl Refusal {
    /// The `ErrorInfo` reason.
    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::StoreBehind => "STORE_BEHIND",
            Refusal::LogReplaced => "LOG_REPLACED",
            Refusal::Held => "HELD",
            Refusal::Fenced => "FENCED",
        }
    }

    /// The refusal a status carries, if it is one.
    pub fn of(status: &Status) -> Option<Refusal> {
        if status.code() != Code::FailedPrecondition {
            return None;
        }
        let info = status.get_details_error_info()?;
        if info.domain != DOMAIN {
            return None;
        }
        [
            Refusal::StoreBehind,
            Refusal::LogReplaced,
            Refusal::Held,
            Refusal::Fenced,
        ]
        .into_iter()
        .find(|r| r.as_str() == info.reason)
    }

    /// `FAILED_PRECONDITION` with this refusal's `ErrorInfo` and `message`.
    pub fn status(self, consumer: &str, message: String) -> Status {
        let mut details = ErrorDetails::new();
        details.set_error_info(
            self.as_str(),
            DOMAIN,
            [("consumer".to_owned(), consumer.to_owned())],
        );
        Status::with_error_details(Code::FailedPrecondition, message, details)
    }
}

/// Refuses `owner`, reading `outbox` as `consumer`, if its store cannot resume from this log.
pub(crate) fn check_store(outbox: &Outbox, consumer: &str, owner: &Owner) -> Result<(), Status> {
    let log_id = outbox.log_id();
    let partition = outbox.partition().index;
    if owner.log_id != 0 && owner.log_id != log_id {
        return Err(Refusal::LogReplaced.status(
            consumer,
            format!(
                "the store of consumer {consumer} consumed log {:016x}, and partition {partition} here is log {log_id:016x}: this log's store was replaced since; restore its volume (or start every stage after it on new stores)",
                owner.log_id
            ),
        ));
    }
    let head = outbox.next_offset();
    if owner.consumed_offset > head {
        return Err(Refusal::LogReplaced.status(
            consumer,
            format!(
                "the store of consumer {consumer} consumed partition {partition} up to offset {}, and this log ends at {head}: this log's store was replaced since; restore its volume (or start every stage after it on new stores)",
                owner.consumed_offset
            ),
        ));
    }
    let acked = outbox.acked(consumer).map_err(Status::from)?;
    if let Some(acked) = acked
        && owner.consumed_offset < acked
    {
        return Err(Refusal::StoreBehind.status(
            consumer,
            format!(
                "consumer {consumer} acknowledged partition {partition} up to offset {acked}, and this store has consumed only up to {}: it is not the store that consumed them (a lost volume, or an older copy of it); restore the volume rather than start it empty",
                owner.consumed_offset
            ),
        ));
    }
    Ok(())
}

/// The process reading as each consumer of one partition's log, and the ones it fenced. Cheap to
/// clone.
#[derive(Clone, Default)]
pub(crate) struct Owners {
    /// The partition whose log this is, for the log lines.
    partition: u32,
    held: Arc<Mutex<HashMap<String, Holder>>>,
}

struct Holder {
    incarnation: u64,
    /// Its streams still open.
    streams: usize,
    fenced: VecDeque<u64>,
}

/// One open stream of the process holding a consumer; dropped when the stream ends.
pub(crate) struct Claim {
    owners: Owners,
    consumer: String,
    incarnation: u64,
}

impl Drop for Claim {
    fn drop(&mut self) {
        if let Ok(mut held) = self.owners.held.lock()
            && let Some(holder) = held.get_mut(&self.consumer)
            && holder.incarnation == self.incarnation
        {
            holder.streams = holder.streams.saturating_sub(1);
        }
    }
}

impl Owners {
    /// No consumer held yet, of the log of `partition`.
    pub(crate) fn of_partition(partition: u32) -> Self {
        Owners {
            partition,
            held: Arc::default(),
        }
    }

    /// Opens a stream of `incarnation` reading as `consumer`: it holds the consumer unless another
    /// process has a stream open (HELD). Taking over from a process whose streams have all ended
    /// fences that one for good.
    pub(crate) fn claim(&self, consumer: &str, incarnation: u64) -> Result<Claim, Status> {
        let mut held = self.held.lock().map_err(|_| poisoned())?;
        let holder = held.entry(consumer.to_owned()).or_insert(Holder {
            incarnation,
            streams: 0,
            fenced: VecDeque::new(),
        });
        if holder.fenced.contains(&incarnation) {
            return Err(fenced(consumer));
        }
        if holder.incarnation != incarnation {
            if holder.streams > 0 {
                return Err(Refusal::Held.status(
                    consumer,
                    format!(
                        "another process reads this log as consumer {consumer} (incarnation {:016x}): two processes must never apply one log as one consumer; this one takes over only once that one's streams end",
                        holder.incarnation
                    ),
                ));
            }
            tracing::warn!(
                consumer,
                partition = self.partition,
                fenced = format_args!("{:016x}", holder.incarnation),
                by = format_args!("{incarnation:016x}"),
                "another process reads as this consumer now; the one before it is fenced"
            );
            if holder.fenced.len() == FENCED_KEPT {
                holder.fenced.pop_front();
            }
            holder.fenced.push_back(holder.incarnation);
            holder.incarnation = incarnation;
        }
        holder.streams += 1;
        Ok(Claim {
            owners: self.clone(),
            consumer: consumer.to_owned(),
            incarnation,
        })
    }

    /// Refuses an acknowledgement by `incarnation` of `consumer` if it was fenced, or while another
    /// process holds the consumer.
    pub(crate) fn check(&self, consumer: &str, incarnation: u64) -> Result<(), Status> {
        let held = self.held.lock().map_err(|_| poisoned())?;
        match held.get(consumer) {
            Some(holder) if holder.fenced.contains(&incarnation) => Err(fenced(consumer)),
            Some(holder) if holder.incarnation != incarnation && holder.streams > 0 => Err(Refusal::Held.status(
                consumer,
                format!("another process reads this log as consumer {consumer}: only it acknowledges"),
            )),
            _ => Ok(()),
        }
    }
}

/// The status of a fenced incarnation.
pub(crate) fn fenced(consumer: &str) -> Status {
    Refusal::Fenced.status(
        consumer,
        format!(
            "another process took over this log as consumer {consumer} while this one was away, so this one is fenced for good: two processes must never apply one log as one consumer; restart it only if the other one is gone"
        ),
    )
}

fn poisoned() -> Status {
    Status::internal("internal error")
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn refusal<T>(result: Result<T, Status>) -> Option<Refusal> {
        result.err().map(|status| Refusal::of(&status).unwrap())
    }

    #[test]
    fn a_consumer_is_held_by_one_process_and_taken_over_only_when_it_is_gone() {
        let owners = Owners::default();
        let first = owners.claim("stock", 1).unwrap();
        // The same process reconnecting while its old stream lingers: still its own.
        let again = owners.claim("stock", 1).unwrap();
        assert_eq!(refusal(owners.claim("stock", 2)), Some(Refusal::Held));
        assert_eq!(refusal(owners.check("stock", 2)), Some(Refusal::Held));
        owners.check("stock", 1).unwrap();
        drop(first);
        assert_eq!(refusal(owners.claim("stock", 2)), Some(Refusal::Held));
        drop(again);
        // Not held while no stream is open; taking over is what fences.
        owners.check("stock", 2).unwrap();
        // Every stream of the first one ended: the second takes over and fences it.
        let _second = owners.claim("stock", 2).unwrap();
        assert_eq!(refusal(owners.claim("stock", 1)), Some(Refusal::Fenced));
        assert_eq!(refusal(owners.check("stock", 1)), Some(Refusal::Fenced));
        owners.check("stock", 2).unwrap();
        // Other consumers are their own.
        let _invoice = owners.claim("invoice", 1).unwrap();
    }

    /// A store with three entries in its log, kept for "stock", which acknowledged two.
    fn log_acked_to_two(dir: &tempfile::TempDir) -> Outbox {
        let store = crate::Store::open(&dir.path().join("up.redb")).unwrap();
        let outbox = store.outbox();
        outbox.retain_for(&["stock".to_owned()]).unwrap();
        store
            .write(|txn| {
                for order in ["o-1", "o-2", "o-3"] {
                    txn.append(&orderflow_proto::v1::Event {
                        order_id: order.into(),
                        ..Default::default()
                    });
                }
                Ok::<_, crate::StoreError>(())
            })
            .unwrap();
        outbox.note_sent("stock", 0, 3);
        outbox.ack("stock", 2).unwrap();
        outbox
    }

    #[test]
    fn a_store_that_cannot_resume_from_the_log_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let outbox = log_acked_to_two(&dir);
        let owner = |consumed_offset, log_id| Owner {
            incarnation: 7,
            consumed_offset,
            log_id,
        };
        let refusal = |owner: Owner| {
            check_store(&outbox, "stock", &owner)
                .err()
                .map(|status| Refusal::of(&status).unwrap())
        };
        let id = outbox.log_id();
        assert_ne!(id, 0);
        // At or past what it acknowledged, up to the head: the store that consumed them.
        for consumed in [2, 3] {
            assert_eq!(refusal(owner(consumed, id)), None);
            assert_eq!(refusal(owner(consumed, 0)), None, "no id recorded yet");
        }
        // An empty store, or an older copy of it.
        assert_eq!(refusal(owner(0, id)), Some(Refusal::StoreBehind));
        assert_eq!(refusal(owner(1, 0)), Some(Refusal::StoreBehind));
        // A log that is not the one the store consumed.
        assert_eq!(refusal(owner(2, id ^ 1)), Some(Refusal::LogReplaced));
        assert_eq!(refusal(owner(4, 0)), Some(Refusal::LogReplaced));
        // A reader the log is not kept for resumes from anything it holds.
        assert!(check_store(&outbox, "audit", &owner(0, id)).is_ok());
    }

    #[test]
    fn a_log_keeps_its_id_and_another_store_has_another() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("up.redb");
        let id = crate::Store::open(&path).unwrap().outbox().log_id();
        assert_eq!(crate::Store::open(&path).unwrap().outbox().log_id(), id);
        let other = crate::Store::open(&dir.path().join("other.redb")).unwrap();
        assert_ne!(other.outbox().log_id(), id);
    }

    #[test]
    fn a_refusal_survives_the_wire_and_nothing_else_reads_as_one() {
        for refusal in [
            Refusal::StoreBehind,
            Refusal::LogReplaced,
            Refusal::Held,
            Refusal::Fenced,
        ] {
            let status = refusal.status("stock", "why".into());
            let response = status.into_http::<()>();
            let decoded = Status::from_header_map(response.headers()).unwrap();
            assert_eq!(Refusal::of(&decoded), Some(refusal));
        }
        assert_eq!(Refusal::of(&Status::failed_precondition("no")), None);
        let mut details = ErrorDetails::new();
        details.set_error_info("FENCED", "elsewhere", []);
        let foreign = Status::with_error_details(Code::FailedPrecondition, "x", details);
        assert_eq!(Refusal::of(&foreign), None);
    }
}
