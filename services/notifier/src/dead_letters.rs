//! `ReplayDeadLetters` in one partition.
//!
//! A replay sends a dead letter through the normal delivery path again — same message, same
//! idempotency key, a fresh set of attempts — in one transaction that marks it REPLAYING. A dead
//! letter a replay already delivered (DELIVERED), or one being replayed, is left alone.

use orderflow_proto::v1::{
    DeadLetterKey, DeadLetterState, ReplayDeadLettersRequest, ReplayDeadLettersResponse,
    replay_dead_letters_request::Target,
};
use orderflow_runtime::{
    FieldViolations, Partition, Store, StoreError, dead_letters, decode_record,
};
use redb::ReadableTable;
use tonic::Status;

use crate::{delivery::DeliveryTask, notifying::DeliveryQueue, tables::DEAD_LETTER_TASKS};

/// Which dead letters a replay is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Replay {
    /// Dead letter `id` of `partition`.
    One { partition: u32, id: u64 },
    /// Every one still dead, in every partition.
    All,
}

/// Checks a `ReplayDeadLetters` request against the stage's `partitions`.
pub(crate) fn check(request: &ReplayDeadLettersRequest, partitions: u32) -> Result<Replay, Status> {
    let mut violations = FieldViolations::new();
    if request.partition >= partitions {
        violations.add(
            "partition",
            format!("the pipeline has {partitions} partition(s), numbered from 0"),
        );
    }
    let replay = match request.target {
        Some(Target::Id(0)) => {
            violations.add("id", "must be a dead letter id (from 1)");
            None
        }
        Some(Target::Id(id)) => Some(Replay::One {
            partition: request.partition,
            id,
        }),
        Some(Target::All(true)) => Some(Replay::All),
        Some(Target::All(false)) | None => {
            violations.add(
                "target",
                "give `id` for one dead letter or `all: true` for every one",
            );
            None
        }
    };
    violations.check()?;
    replay.ok_or_else(|| Status::invalid_argument("no target"))
}

/// Replays `replay` in `store`'s partition, whose delivery queue is `queue`.
pub(crate) async fn replay_dead_letters(
    store: &Store,
    queue: &DeliveryQueue,
    replay: Replay,
) -> Result<ReplayDeadLettersResponse, Status> {
    let only = match replay {
        Replay::One { id, .. } => Some(id),
        Replay::All => None,
    };
    let Partition {
        index: partition,
        count,
    } = store.partition();
    let queue = queue.clone();
    store
        .call(move |store| {
            store.write(|txn| {
                let ids: Vec<u64> = match only {
                    Some(id) => vec![id],
                    None => dead_letters::ids_where(txn, |l| l.state() == DeadLetterState::Dead)?,
                };
                let mut response = ReplayDeadLettersResponse::default();
                for id in ids {
                    let task = txn
                        .redb()
                        .open_table(DEAD_LETTER_TASKS)
                        .map_err(StoreError::from)?
                        .get(id)
                        .map_err(StoreError::from)?
                        .map(|v| v.value().to_vec());
                    let mut dead = false;
                    let letter = dead_letters::update(txn, id, |letter| {
                        dead = letter.state() == DeadLetterState::Dead;
                        if dead {
                            letter.set_state(DeadLetterState::Replaying);
                            letter.replays += 1;
                        }
                    })?;
                    let (Some(letter), Some(task)) = (letter, task) else {
                        let place = if count > 1 {
                            format!(" in partition {partition}")
                        } else {
                            String::new()
                        };
                        return Err(Status::not_found(format!(
                            "the notifier has no dead letter with id {id}{place} (the invoice stage's dead letters record failed payments and cannot be replayed)"
                        )));
                    };
                    if !dead {
                        response.skipped.push(id);
                        response.skipped_letters.push(DeadLetterKey { partition, id });
                        continue;
                    }
                    let task: DeliveryTask = decode_record("dead_letter_tasks", id, &task)?;
                    let context = task.trace_context.clone();
                    queue.enqueue(txn, &letter.order_id, &letter.customer_id, &task, context)?;
                    response.replayed.push(id);
                    response.replayed_letters.push(DeadLetterKey { partition, id });
                }
                if !response.replayed.is_empty() {
                    tracing::info!(
                        dead_letters = response.replayed.len(),
                        "dead letters replayed"
                    );
                }
                Ok(response)
            })
        })
        .await
}
