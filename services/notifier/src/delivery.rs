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

use std::{collections::HashMap, sync::Arc};

use orderflow_proto::v1::{
    CustomerNotified, DeadLetter, DeadLetterState, Event, Notification, NotificationDeadLettered,
    event::Kind,
};
use orderflow_runtime::{
    Appends, Attempt, Failure, Outcome, RetryWork, Settling, StoreError, Txn, dead_letters,
    follow_up, metrics as names, now_timestamp, record_processed, seconds_since, telemetry,
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
/// (Joined rather than `format!`ted: one per notification, and formatting cost ten times more.)
pub(crate) fn idempotency_key(order_id: &str) -> String {
    ["orderflow-notification-", order_id].concat()
}

/// The notifier's side of the delivery queue.
pub(crate) struct Deliveries {
    /// The replica's sink: every partition delivers through it.
    pub sink: Arc<Sink>,
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
        self.settle_all(txn, Settling::one(key, task, outcome))
    }

    /// Deliveries are recorded with the notification tables opened once for the whole batch; the
    /// dead letters that replays resolve, and the failures, are recorded after them.
    fn settle_all(
        &self,
        txn: &mut Txn,
        settling: Vec<Settling<DeliveryTask, ()>>,
    ) -> Result<(), StoreError> {
        let mut resolved = Vec::new();
        let mut failed = Vec::new();
        {
            let (redb, log) = txn.split();
            let mut tables = None;
            for Settling { key, task, outcome } in settling {
                let Outcome {
                    result,
                    attempts,
                    trace_context,
                } = outcome;
                let (settled, scheduled) =
                    Settled::new(&self.sink, key, task, attempts, trace_context);
                match result {
                    Ok(()) => {
                        let tables = match &mut tables {
                            Some(tables) => tables,
                            None => tables.insert(NotificationTables {
                                by_order: redb.open_table(BY_ORDER)?,
                                notifications: redb.open_table(NOTIFICATIONS)?,
                            }),
                        };
                        if settled.dead_letter_id != 0 {
                            resolved.push(settled.dead_letter_id);
                        }
                        settled.delivered(tables, log)?;
                    }
                    Err(failure) => failed.push((settled, failure, scheduled)),
                }
            }
        }
        for id in resolved {
            dead_letters::update(txn, id, |letter| {
                letter.set_state(DeadLetterState::Delivered);
                letter.resolved_at = Some(now_timestamp());
                letter.resolution = format!("delivered by replay {}", letter.replays);
            })?;
        }
        for (settled, failure, scheduled) in failed {
            settled.dead_lettered(txn, &failure, scheduled)?;
        }
        Ok(())
    }
}

/// The tables a delivery is recorded in, opened once per batch.
struct NotificationTables<'t> {
    by_order: redb::Table<'t, &'static str, u64>,
    notifications: redb::Table<'t, u64, &'static [u8]>,
}

/// A delivery whose outcome is final, being recorded.
struct Settled {
    /// The order.
    key: String,
    upstream: Event,
    /// As the sink was given it, with the sink's name and the attempts made.
    notification: Notification,
    /// The dead letter this was a replay of; 0 for a first delivery.
    dead_letter_id: u64,
    attempts: u32,
    /// Context of the last attempt's span: the settling span is its child.
    context: HashMap<String, String>,
}

impl Settled {
    /// `task` settled under `key` after `attempts`, the last in the span of `context`; and the
    /// context of the span that scheduled it.
    fn new(
        sink: &Sink,
        key: String,
        task: DeliveryTask,
        attempts: u32,
        context: HashMap<String, String>,
    ) -> (Settled, HashMap<String, String>) {
        let DeliveryTask {
            upstream,
            notification,
            dead_letter_id,
            trace_context,
        } = task;
        let mut settled = Settled {
            key,
            upstream: upstream.unwrap_or_default(),
            notification: notification.unwrap_or_default(),
            dead_letter_id,
            attempts,
            context,
        };
        settled.notification.sink = sink.name().to_owned();
        settled.notification.attempts = attempts;
        (settled, trace_context)
    }

    /// Records the notification under the offset of the `CustomerNotified` that announces it (found
    /// by its order) and appends that event.
    fn delivered(
        mut self,
        tables: &mut NotificationTables<'_>,
        log: &mut Appends,
    ) -> Result<(), StoreError> {
        let span = telemetry::order_span(
            STAGE,
            "customer notified",
            &self.key,
            &self.upstream.customer_id,
            &self.context,
        );
        span.record("outcome", "delivered");
        self.notification.id = log.next_offset();
        self.notification.sent_at = Some(now_timestamp());
        tables
            .by_order
            .insert(self.key.as_str(), self.notification.id)?;
        tables.notifications.insert(
            self.notification.id,
            self.notification.encode_to_vec().as_slice(),
        )?;
        self.observe_delivery();
        log.append(&follow_up(
            &self.upstream,
            span.into_context(),
            Kind::CustomerNotified(CustomerNotified {
                notification: Some(self.notification),
            }),
        ));
        Ok(())
    }

    /// Counts the delivery and the time from placing the order to now.
    fn observe_delivery(&self) {
        record_processed(STAGE, "delivered", &self.upstream);
        if let Some(elapsed) = seconds_since(self.upstream.placed_at) {
            names::observe(
                names::PLACED_TO_NOTIFIED_SECONDS,
                [("stage", STAGE)],
                elapsed,
            );
        }
    }

    /// Makes the failed delivery a dead letter — a new one, or the one it replayed put back to
    /// DEAD — and announces `NotificationDeadLettered`. `scheduled`: the context of the span that
    /// scheduled the first delivery, which a replay's attempts are children of.
    fn dead_lettered(
        self,
        txn: &mut Txn,
        failure: &Failure,
        scheduled: HashMap<String, String>,
    ) -> Result<(), StoreError> {
        let span = telemetry::order_span(
            STAGE,
            "notification dead-lettered",
            &self.key,
            &self.upstream.customer_id,
            &self.context,
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
        tracing::warn!(parent: span.span(), order_id = %self.key, attempts = self.attempts, error = %failure.error, "notification dead-lettered");
        let letter = if self.dead_letter_id != 0 {
            dead_letters::update(txn, self.dead_letter_id, |letter| {
                letter.set_state(DeadLetterState::Dead);
                letter.reason = reason.into();
                letter.attempts = self.attempts;
                letter.last_error.clone_from(&failure.error);
                letter.dead_lettered_at = Some(now_timestamp());
            })?
        } else {
            Some(self.new_dead_letter(txn, reason, failure, scheduled)?)
        };
        record_processed(STAGE, "dead-lettered", &self.upstream);
        txn.append(&follow_up(
            &self.upstream,
            span.context(),
            Kind::NotificationDeadLettered(NotificationDeadLettered {
                dead_letter: letter,
                notification: Some(self.notification),
            }),
        ));
        Ok(())
    }

    /// Adds the dead letter of a first delivery, with the task a replay delivers: the notification
    /// as it was scheduled.
    fn new_dead_letter(
        &self,
        txn: &mut Txn,
        reason: &str,
        failure: &Failure,
        scheduled: HashMap<String, String>,
    ) -> Result<DeadLetter, StoreError> {
        let letter = dead_letters::add(
            txn,
            DeadLetter {
                id: 0,
                order_id: self.key.clone(),
                customer_id: self.upstream.customer_id.clone(),
                stage: STAGE.into(),
                reason: reason.into(),
                attempts: self.attempts,
                last_error: failure.error.clone(),
                dead_lettered_at: Some(now_timestamp()),
                state: DeadLetterState::Dead.into(),
                replays: 0,
                resolved_at: None,
                resolution: String::new(),
                // Said when listed: the partition of the store that keeps it.
                partition: 0,
            },
        )?;
        let replay = DeliveryTask {
            upstream: Some(self.upstream.clone()),
            notification: Some(Notification {
                sink: String::new(),
                attempts: 0,
                ..self.notification.clone()
            }),
            dead_letter_id: letter.id,
            trace_context: scheduled,
        };
        txn.redb()
            .open_table(DEAD_LETTER_TASKS)?
            .insert(letter.id, replay.encode_to_vec().as_slice())?;
        txn.redb()
            .open_table(DEAD_LETTER_BY_ORDER)?
            .insert(self.key.as_str(), letter.id)?;
        Ok(letter)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use orderflow_proto::v1::{NotificationKind, OrderRejected};
    use orderflow_runtime::{Store, decode_record};

    use super::*;

    /// A new notifier store with the stage's tables, in a directory removed on drop.
    fn store() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("notifier.redb")).unwrap();
        store.write(crate::tables::create).unwrap();
        (dir, store)
    }

    /// The first delivery of the rejection of `order`, or a replay of dead letter `dead_letter_id`.
    fn task(order: &str, dead_letter_id: u64) -> DeliveryTask {
        DeliveryTask {
            upstream: Some(Event {
                order_id: order.into(),
                customer_id: "alice".into(),
                placed_at: Some(prost_types::Timestamp {
                    seconds: 1_796_000_000,
                    nanos: 0,
                }),
                kind: Some(Kind::OrderRejected(OrderRejected::default())),
                ..Default::default()
            }),
            notification: Some(Notification {
                order_id: order.into(),
                customer_id: "alice".into(),
                kind: NotificationKind::Rejected.into(),
                message: "sorry".into(),
                idempotency_key: idempotency_key(order),
                ..Default::default()
            }),
            dead_letter_id,
            trace_context: HashMap::from([("scheduled".to_owned(), "yes".to_owned())]),
        }
    }

    fn settle(store: &Store, task: DeliveryTask, result: Result<(), Failure>, attempts: u32) {
        let deliveries = Deliveries {
            sink: Arc::new(Sink::Log),
        };
        let key = task.upstream.as_ref().unwrap().order_id.clone();
        let outcome = Outcome {
            result,
            attempts,
            trace_context: HashMap::new(),
        };
        store
            .write(|txn| deliveries.settle(txn, &key, task, outcome))
            .unwrap();
    }

    fn refused(exhausted: bool) -> Result<(), Failure> {
        Err(Failure {
            error: "410 Gone".into(),
            exhausted,
        })
    }

    /// Every event in the store's outbox, in order.
    fn announced(store: &Store) -> Vec<Event> {
        store.outbox().events(0, 100).unwrap()
    }

    fn letter(store: &Store, id: u64) -> DeadLetter {
        store
            .write(|txn| dead_letters::get(txn, id))
            .unwrap()
            .unwrap()
    }

    #[test]
    fn a_delivery_is_recorded_under_the_offset_that_announces_it() {
        let (_dir, store) = store();
        settle(&store, task("o-1", 0), Ok(()), 2);
        let (by_order, stored) = store
            .read(|read| {
                let id = read.open_table(BY_ORDER)?.get("o-1")?.unwrap().value();
                let bytes = read.open_table(NOTIFICATIONS)?.get(id)?.unwrap();
                let stored: Notification = decode_record("notification", id, bytes.value())?;
                Ok::<_, StoreError>((id, stored))
            })
            .unwrap();
        assert_eq!(by_order, 0);
        assert_eq!(stored.id, 0);
        assert_eq!(stored.sink, "log");
        assert_eq!(stored.attempts, 2);
        assert!(stored.sent_at.is_some());
        let events = announced(&store);
        assert_eq!(events.len(), 1);
        let Some(Kind::CustomerNotified(notified)) = &events[0].kind else {
            panic!("not a CustomerNotified: {:?}", events[0]);
        };
        assert_eq!(notified.notification.as_ref(), Some(&stored));
        assert_eq!(events[0].order_id, "o-1");
        assert_eq!(events[0].customer_id, "alice");
    }

    #[test]
    fn a_batch_records_each_delivery_under_its_own_offset_and_its_failures_after() {
        let (_dir, store) = store();
        let settling = |order: &str, result| Settling {
            key: order.to_owned(),
            task: task(order, 0),
            outcome: Outcome {
                result,
                attempts: 1,
                trace_context: HashMap::new(),
            },
        };
        let deliveries = Deliveries {
            sink: Arc::new(Sink::Log),
        };
        store
            .write(|txn| {
                deliveries.settle_all(
                    txn,
                    vec![
                        settling("o-1", Ok(())),
                        settling("o-2", refused(false)),
                        settling("o-3", Ok(())),
                    ],
                )
            })
            .unwrap();
        let events = announced(&store);
        let order = |e: &Event| e.order_id.clone();
        assert_eq!(
            events.iter().map(order).collect::<Vec<_>>(),
            ["o-1", "o-3", "o-2"]
        );
        for (offset, order) in [(0, "o-1"), (1, "o-3")] {
            let Some(Kind::CustomerNotified(notified)) = &events[offset].kind else {
                panic!("not a CustomerNotified: {:?}", events[offset]);
            };
            assert_eq!(notified.notification.as_ref().unwrap().id, offset as u64);
            let id = store
                .read(|read| {
                    let id = read.open_table(BY_ORDER)?.get(order)?.unwrap().value();
                    Ok::<_, StoreError>(id)
                })
                .unwrap();
            assert_eq!(id, offset as u64);
        }
        assert!(matches!(
            events[2].kind,
            Some(Kind::NotificationDeadLettered(_))
        ));
        assert_eq!(letter(&store, 1).order_id, "o-2");
    }

    #[test]
    fn a_refused_delivery_becomes_a_dead_letter_with_what_a_replay_delivers() {
        let (_dir, store) = store();
        settle(&store, task("o-1", 0), refused(false), 1);
        settle(&store, task("o-2", 0), refused(true), 8);
        let first = letter(&store, 1);
        assert_eq!(first.order_id, "o-1");
        assert_eq!(first.state(), DeadLetterState::Dead);
        assert_eq!(first.reason, "refused by the sink");
        assert_eq!(first.attempts, 1);
        assert_eq!(first.last_error, "410 Gone");
        assert_eq!(letter(&store, 2).reason, "retries exhausted");
        let (by_order, replay) = store
            .read(|read| {
                let id = read
                    .open_table(DEAD_LETTER_BY_ORDER)?
                    .get("o-1")?
                    .unwrap()
                    .value();
                let bytes = read.open_table(DEAD_LETTER_TASKS)?.get(id)?.unwrap();
                let replay: DeliveryTask = decode_record("task", id, bytes.value())?;
                Ok::<_, StoreError>((id, replay))
            })
            .unwrap();
        assert_eq!(by_order, 1);
        // The replay delivers the notification as it was scheduled, under the first span.
        let scheduled = task("o-1", 1);
        assert_eq!(replay, scheduled);
        // Nothing was recorded as delivered.
        let delivered = store
            .read(|read| Ok::<_, StoreError>(read.open_table(BY_ORDER)?.get("o-1")?.is_some()))
            .unwrap();
        assert!(!delivered);
        let events = announced(&store);
        assert_eq!(events.len(), 2);
        let Some(Kind::NotificationDeadLettered(dead)) = &events[0].kind else {
            panic!("not a NotificationDeadLettered: {:?}", events[0]);
        };
        assert_eq!(dead.dead_letter.as_ref(), Some(&first));
        assert_eq!(dead.notification.as_ref().unwrap().sink, "log");
    }

    #[test]
    fn a_replay_that_delivers_resolves_its_dead_letter() {
        let (_dir, store) = store();
        settle(&store, task("o-1", 0), refused(false), 1);
        settle(&store, task("o-1", 1), Ok(()), 1);
        let resolved = letter(&store, 1);
        assert_eq!(resolved.state(), DeadLetterState::Delivered);
        assert!(resolved.resolved_at.is_some());
        assert_eq!(resolved.resolution, "delivered by replay 0");
        let id = store
            .read(|read| {
                Ok::<_, StoreError>(read.open_table(BY_ORDER)?.get("o-1")?.unwrap().value())
            })
            .unwrap();
        // Announced second, after the dead letter.
        assert_eq!(id, 1);
        assert!(matches!(
            announced(&store)[1].kind,
            Some(Kind::CustomerNotified(_))
        ));
    }

    #[test]
    fn a_replay_that_fails_puts_its_dead_letter_back_without_a_new_one() {
        let (_dir, store) = store();
        settle(&store, task("o-1", 0), refused(false), 1);
        store
            .write(|txn| {
                dead_letters::update(txn, 1, |letter| {
                    letter.set_state(DeadLetterState::Replaying);
                    letter.replays = 1;
                })
            })
            .unwrap();
        settle(&store, task("o-1", 1), refused(true), 8);
        let again = letter(&store, 1);
        assert_eq!(again.state(), DeadLetterState::Dead);
        assert_eq!(again.reason, "retries exhausted");
        assert_eq!(again.attempts, 8);
        assert_eq!(again.replays, 1);
        let letters = store
            .write(|txn| dead_letters::ids_where(txn, |_| true))
            .unwrap();
        assert_eq!(letters, vec![1]);
        let events = announced(&store);
        assert_eq!(events.len(), 2);
        assert!(matches!(
            events[1].kind,
            Some(Kind::NotificationDeadLettered(_))
        ));
    }
}
