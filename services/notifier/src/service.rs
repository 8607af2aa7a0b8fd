//! The `Notifier` tonic service: delegates each RPC to its own module.

use orderflow_proto::v1::{
    ListNotificationsRequest, ListNotificationsResponse, notifier_server::Notifier,
};
use orderflow_runtime::Store;
use tonic::{Request, Response, Status};

pub(crate) struct NotifierService {
    store: Store,
}

impl NotifierService {
    pub(crate) fn new(store: Store) -> Self {
        NotifierService { store }
    }
}

#[tonic::async_trait]
impl Notifier for NotifierService {
    async fn list_notifications(
        &self,
        request: Request<ListNotificationsRequest>,
    ) -> Result<Response<ListNotificationsResponse>, Status> {
        crate::list_notifications::list_notifications(&self.store, request.into_inner())
            .await
            .map(Response::new)
    }
}
