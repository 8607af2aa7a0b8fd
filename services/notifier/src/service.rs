//! The `Notifier` tonic service: delegates each RPC to its own module, at the replica that owns
//! the partition in question. The lists gather every partition of every replica (the
//! notifications of one order come from its partition alone); a replay of one dead letter goes
//! to its partition's replica, a replay of all to every replica.

use std::collections::BTreeMap;

use futures::FutureExt;
use orderflow_proto::v1::{
    ListDeadLettersRequest, ListDeadLettersResponse, ListNotificationsRequest,
    ListNotificationsResponse, ReplayDeadLettersRequest, ReplayDeadLettersResponse,
    notifier_client::NotifierClient, notifier_server::Notifier,
};
use orderflow_runtime::{
    AdminGuard, FieldViolations, Owner, PartitionedPage, Partitions, dead_letters, forwarded_by,
    order_partition, respond, status,
};
use tonic::{Request, Response, Status};

use crate::{
    STAGE,
    dead_letters::{Replay, replay_dead_letters},
    notifying::DeliveryQueue,
};

pub(crate) struct NotifierService {
    partitions: Partitions,
    /// The delivery queue of each partition this replica owns.
    queues: BTreeMap<u32, DeliveryQueue>,
    admin: AdminGuard,
}

impl NotifierService {
    pub(crate) fn new(
        partitions: Partitions,
        queues: BTreeMap<u32, DeliveryQueue>,
        admin: AdminGuard,
    ) -> Self {
        NotifierService {
            partitions,
            queues,
            admin,
        }
    }

    /// `replay` in `partition`, which this replica owns.
    async fn replay_here(
        &self,
        partition: u32,
        replay: Replay,
    ) -> Result<ReplayDeadLettersResponse, Status> {
        match (
            self.partitions.local(partition),
            self.queues.get(&partition),
        ) {
            (Some(store), Some(queue)) => replay_dead_letters(store, queue, replay).await,
            _ => Err(Status::failed_precondition(format!(
                "this replica does not own partition {partition}"
            ))),
        }
    }
}

/// Adds `more` to `response`.
fn merge(response: &mut ReplayDeadLettersResponse, more: ReplayDeadLettersResponse) {
    response.replayed.extend(more.replayed);
    response.skipped.extend(more.skipped);
    response.replayed_letters.extend(more.replayed_letters);
    response.skipped_letters.extend(more.skipped_letters);
}

#[tonic::async_trait]
impl Notifier for NotifierService {
    async fn list_notifications(
        &self,
        request: Request<ListNotificationsRequest>,
    ) -> Result<Response<ListNotificationsResponse>, Status> {
        let from = forwarded_by(request.metadata());
        let request = request.into_inner();
        let count = self.partitions.count();
        // Checked whichever way the call goes.
        PartitionedPage::parse(request.page_size, &request.page_token, count)?;
        if !request.order_id.is_empty() {
            let mut violations = FieldViolations::new();
            violations.check_identifier("order_id", &request.order_id, status::MAX_ORDER_ID_CHARS);
            violations.check()?;
            // An id that names no partition names no order either.
            let Some(partition) = order_partition(&request.order_id, count) else {
                return respond(Ok(ListNotificationsResponse::default()));
            };
            return match self.partitions.owner(partition, from.as_deref())? {
                Owner::Here(store) => {
                    let notifications =
                        crate::list_notifications::of_order(store, request.order_id).await?;
                    respond(Ok(ListNotificationsResponse {
                        notifications,
                        next_page_token: String::new(),
                    }))
                }
                Owner::Replica {
                    peers,
                    replica,
                    channel,
                } => NotifierClient::new(channel)
                    .list_notifications(peers.forwarded(request, None))
                    .await
                    .map_err(|status| {
                        peers.failed(STAGE, replica, &format!("partition {partition}"), status)
                    }),
            };
        }
        let page = self
            .partitions
            .gather(
                STAGE,
                &request,
                from.as_deref(),
                |store, page| {
                    async move { crate::list_notifications::read_page(&store, page).await }.boxed()
                },
                |channel, request| {
                    async move {
                        NotifierClient::new(channel)
                            .list_notifications(request)
                            .await
                    }
                    .boxed()
                },
            )
            .await;
        respond(page)
    }

    async fn list_dead_letters(
        &self,
        request: Request<ListDeadLettersRequest>,
    ) -> Result<Response<ListDeadLettersResponse>, Status> {
        let from = forwarded_by(request.metadata());
        let page = self
            .partitions
            .gather(
                STAGE,
                request.get_ref(),
                from.as_deref(),
                |store, page| async move { dead_letters::read_page(&store, page).await }.boxed(),
                |channel, request| {
                    async move {
                        NotifierClient::new(channel)
                            .list_dead_letters(request)
                            .await
                    }
                    .boxed()
                },
            )
            .await;
        respond(page)
    }

    async fn replay_dead_letters(
        &self,
        request: Request<ReplayDeadLettersRequest>,
    ) -> Result<Response<ReplayDeadLettersResponse>, Status> {
        self.admin.check(request.metadata(), "ReplayDeadLetters")?;
        let from = forwarded_by(request.metadata());
        let (metadata, _, request) = request.into_parts();
        let replay = crate::dead_letters::check(&request, self.partitions.count())?;
        let partition = match replay {
            Replay::One { partition, .. } => partition,
            Replay::All => {
                let mut response = ReplayDeadLettersResponse::default();
                for partition in self.queues.keys() {
                    merge(&mut response, self.replay_here(*partition, replay).await?);
                }
                for (peers, replica, channel) in self.partitions.others(from.is_some()) {
                    let theirs = NotifierClient::new(channel)
                        .replay_dead_letters(peers.forwarded(request, Some(&metadata)))
                        .await
                        .map_err(|status| {
                            peers.failed(STAGE, replica, "its partitions' dead letters", status)
                        })?;
                    merge(&mut response, theirs.into_inner());
                }
                return respond(Ok(response));
            }
        };
        match self.partitions.owner(partition, from.as_deref())? {
            Owner::Here(_) => respond(self.replay_here(partition, replay).await),
            Owner::Replica {
                peers,
                replica,
                channel,
            } => NotifierClient::new(channel)
                .replay_dead_letters(peers.forwarded(request, Some(&metadata)))
                .await
                .map_err(|status| {
                    peers.failed(STAGE, replica, &format!("partition {partition}"), status)
                }),
        }
    }
}
