//! Delivering notifications through the sink, with the stage's retry queue.
//!
//! Each scheduled notification waits in `delivery.pending` (see `orderflow_runtime::retry`); attempts
//! run with bounded concurrency, so one slow customer endpoint never holds up the others. Settling,
//! in one transaction per batch of results:
//! - **delivered**: the notification is recorded (`notifications`, id = offset of its event) and
//!   announced as the terminal `CustomerNotified`; a dead letter it came from is marked DELIVERED;
//! - **failed for good** (a permanent refusal, or every attempt failed): it becomes a dead letter
//!   (`dead_letters`, with what a replay needs in `dead_letter_tasks`) and is announced as
//!   `NotificationDeadLettered`. A replay that fails again puts the same dead letter back to DEAD.

use std::collections::HashMap;

use orderflow_proto::v1::{
    CustomerNotified, DeadLetter, DeadLetterState, Event, Notification, NotificationDeadLettered,
    event::Kind,
};
use orderflow_runtime::{
    Attempt, Outcome, RetryWork, StoreError, Txn, dead_letters, follow_up, metrics as names,
    now_timestamp, record_processed, telemetry,
};
use prost::Message;

use crate::{
    STAGE,
    sinks::Sink,
    tables::{BY_ORDER, DEAD_LETTER_BY_ORDER, DEAD_LETTER_TASKS, NOTIFICATIONS},
};

/// A notification waiting for delivery.
#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct DeliveryTask {
    /// The event that ended the order's way through the pipeline.
    #[prost(message, optional, tag = "1")]
    pub upstream: Option<Event>,
    #[prost(message, optional, tag = "2")]
    pub notification: Option<Notification>,
    /// The dead letter this is a replay of; 0 for a first delivery.
    #[prost(uint64, tag = "3")]
    pub dead_letter_id: u64,
    /// Context of the span that scheduled the first delivery, for replays' attempt spans.
    #[prost(map = "string, string", tag = "4")]
    pub trace_context: HashMap<String, String>,
}

/// The idempotency key of an order's notification: the same for every attempt and replay.
pub(crate) fn idempotency_key(order_id: &str) -> String {
    format!("orderflow-notification-{order_id}")
}

/// The notifier's side of the delivery queue.
pub(crate) struct Deliveries {
    pub sink: Sink,
}

impl RetryWork for Deliveries {
    type Task = DeliveryTask;
    type Done = ();

    async fn attempt(&self, _key: &str, task: &DeliveryTask, _attempt: u32) -> Attempt<()> {
        match &task.notification {
            Some(notification) => self.sink.deliver(notification).await,
            None => Attempt::Fail {
                error: "nothing to deliver".into(),
            },
        }
    }

    fn attempts_made(&self) {
        self.sink.attempts_made();
    }

    fn settle(
        &self,
        txn: &mut Txn,
        key: &str,
        task: DeliveryTask,
        outcome: Outcome<()>,
    ) -> Result<(), StoreError> {
        let DeliveryTask {
            upstream,
            notification,
            dead_letter_id,
            trace_context,
        } = task;
        let upstream = upstream.unwrap_or_default();
        let mut notification = notification.unwrap_or_default();
        notification.sink = self.sink.name().to_owned();
        notification.attempts = outcome.attempts;
        match outcome.result {
            Ok(()) => {
                let span = telemetry::order_span(
                    STAGE,
                    "customer notified",
                    key,
                    &upstream.customer_id,
                    &outcome.trace_context,
                );
                span.record("outcome", "delivered");
                notification.id = txn.next_offset();
                notification.sent_at = Some(now_timestamp());
                txn.redb()
                    .open_table(BY_ORDER)?
                    .insert(key, notification.id)?;
                txn.redb()
                    .open_table(NOTIFICATIONS)?
                    .insert(notification.id, notification.encode_to_vec().as_slice())?;
                if dead_letter_id != 0 {
                    dead_letters::update(txn, dead_letter_id, |letter| {
                        letter.set_state(DeadLetterState::Delivered);
                        letter.resolved_at = Some(now_timestamp());
                        letter.resolution = format!("delivered by replay {}", letter.replays);
                    })?;
                }
                record_processed(STAGE, "delivered", &upstream);
                if let Some(placed) = upstream
                    .placed_at
                    .and_then(|p| std::time::SystemTime::try_from(p).ok())
                    && let Ok(elapsed) = std::time::SystemTime::now().duration_since(placed)
                {
                    names::observe(
                        names::PLACED_TO_NOTIFIED_SECONDS,
                        [("stage", STAGE)],
                        elapsed.as_secs_f64(),
                    );
                }
                txn.append(&follow_up(
                    &upstream,
                    span.context(),
                    Kind::CustomerNotified(CustomerNotified {
                        notification: Some(notification),
                    }),
                ));
            }
            Err(failure) => {
                let span = telemetry::order_span(
                    STAGE,
                    "notification dead-lettered",
                    key,
                    &upstream.customer_id,
                    &outcome.trace_context,
                );
                let reason = if failure.exhausted {
                    "retries exhausted"
                } else {
                    "refused by the sink"
                };
                span.record("outcome", "dead-lettered");
                span.record(
                    "otel.status_description",
                    format!("{reason}: {}", failure.error).as_str(),
                );
                tracing::warn!(parent: span.span(), order_id = %key, attempts = outcome.attempts, error = %failure.error, "notification dead-lettered");
                let letter = if dead_letter_id != 0 {
                    dead_letters::update(txn, dead_letter_id, |letter| {
                        letter.set_state(DeadLetterState::Dead);
                        letter.reason = reason.into();
                        letter.attempts = outcome.attempts;
                        letter.last_error.clone_from(&failure.error);
                        letter.dead_lettered_at = Some(now_timestamp());
                    })?
                } else {
                    let letter = dead_letters::add(
                        txn,
                        DeadLetter {
                            id: 0,
                            order_id: key.to_owned(),
                            customer_id: upstream.customer_id.clone(),
                            stage: STAGE.into(),
                            reason: reason.into(),
                            attempts: outcome.attempts,
                            last_error: failure.error.clone(),
                            dead_lettered_at: Some(now_timestamp()),
                            state: DeadLetterState::Dead.into(),
                            replays: 0,
                            resolved_at: None,
                            resolution: String::new(),
                        },
                    )?;
                    let id = letter.id;
                    // What a replay delivers: the task as it was scheduled.
                    let replay = DeliveryTask {
                        upstream: Some(upstream.clone()),
                        notification: Some(Notification {
                            sink: String::new(),
                            attempts: 0,
                            ..notification.clone()
                        }),
                        dead_letter_id: id,
                        trace_context,
                    };
                    txn.redb()
                        .open_table(DEAD_LETTER_TASKS)?
                        .insert(id, replay.encode_to_vec().as_slice())?;
                    txn.redb()
                        .open_table(DEAD_LETTER_BY_ORDER)?
                        .insert(key, id)?;
                    Some(letter)
                };
                record_processed(STAGE, "dead-lettered", &upstream);
                txn.append(&follow_up(
                    &upstream,
                    span.context(),
                    Kind::NotificationDeadLettered(NotificationDeadLettered {
                        dead_letter: letter,
                        notification: Some(notification),
                    }),
                ));
            }
        }
        Ok(())
    }
}
