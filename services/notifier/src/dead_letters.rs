//! `ListDeadLetters` and `ReplayDeadLetters`.
//!
//! A replay sends a dead letter through the normal delivery path again — same message, same
//! idempotency key, a fresh set of attempts — in one transaction that marks it REPLAYING. A dead
//! letter a replay already delivered (DELIVERED), or one being replayed, is left alone.

use orderflow_proto::v1::{
    DeadLetterState, ListDeadLettersRequest, ListDeadLettersResponse, ReplayDeadLettersRequest,
    ReplayDeadLettersResponse, replay_dead_letters_request::Target,
};
use orderflow_runtime::{FieldViolations, Store, StoreError, dead_letters, decode_record};
use redb::ReadableTable;
use tonic::Status;

use crate::{delivery::DeliveryTask, notifying::DeliveryQueue, tables::DEAD_LETTER_TASKS};

pub(crate) async fn list_dead_letters(
    store: &Store,
    request: ListDeadLettersRequest,
) -> Result<ListDeadLettersResponse, Status> {
    dead_letters::list(store, request).await
}

pub(crate) async fn replay_dead_letters(
    store: &Store,
    queue: &DeliveryQueue,
    request: ReplayDeadLettersRequest,
) -> Result<ReplayDeadLettersResponse, Status> {
    let mut violations = FieldViolations::new();
    let only = match request.target {
        Some(Target::Id(0)) => {
            violations.add("id", "must be a dead letter id (from 1)");
            None
        }
        Some(Target::Id(id)) => Some(id),
        Some(Target::All(true)) => None,
        Some(Target::All(false)) | None => {
            violations.add(
                "target",
                "give `id` for one dead letter or `all: true` for every one",
            );
            None
        }
    };
    violations.check()?;
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
                        return Err(Status::not_found(format!(
                            "the notifier has no dead letter with id {id} (the invoice stage's dead letters record failed payments and cannot be replayed)"
                        )));
                    };
                    if !dead {
                        response.skipped.push(id);
                        continue;
                    }
                    let task: DeliveryTask = decode_record("dead_letter_tasks", id, &task)?;
                    let context = task.trace_context.clone();
                    queue.enqueue(txn, &letter.order_id, &letter.customer_id, &task, context)?;
                    response.replayed.push(id);
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
