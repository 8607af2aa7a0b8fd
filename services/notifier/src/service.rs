//! The `Notifier` tonic service: delegates each RPC to its own module.

use orderflow_proto::v1::{
    ListDeadLettersRequest, ListDeadLettersResponse, ListNotificationsRequest,
    ListNotificationsResponse, ReplayDeadLettersRequest, ReplayDeadLettersResponse,
    notifier_server::Notifier,
};
use orderflow_runtime::{AdminGuard, Store, respond};
use tonic::{Request, Response, Status};

use crate::notifying::DeliveryQueue;

pub(crate) struct NotifierService {
    store: Store,
    deliveries: DeliveryQueue,
    admin: AdminGuard,
}

impl NotifierService {
    pub(crate) fn new(store: Store, deliveries: DeliveryQueue, admin: AdminGuard) -> Self {
        NotifierService {
            store,
            deliveries,
            admin,
        }
    }
}

#[tonic::async_trait]
impl Notifier for NotifierService {
    async fn list_notifications(
        &self,
        request: Request<ListNotificationsRequest>,
    ) -> Result<Response<ListNotificationsResponse>, Status> {
        respond(
            crate::list_notifications::list_notifications(&self.store, request.into_inner()).await,
        )
    }

    async fn list_dead_letters(
        &self,
        request: Request<ListDeadLettersRequest>,
    ) -> Result<Response<ListDeadLettersResponse>, Status> {
        respond(crate::dead_letters::list_dead_letters(&self.store, request.into_inner()).await)
    }

    async fn replay_dead_letters(
        &self,
        request: Request<ReplayDeadLettersRequest>,
    ) -> Result<Response<ReplayDeadLettersResponse>, Status> {
        self.admin.check(request.metadata(), "ReplayDeadLetters")?;
        respond(
            crate::dead_letters::replay_dead_letters(
                &self.store,
                &self.deliveries,
                request.into_inner(),
            )
            .await,
        )
    }
}
