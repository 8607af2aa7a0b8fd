//! The `OrderReceiver` tonic service: delegates each RPC to its own module.

use orderflow_proto::v1::{
    GetOrderRequest, GetOrderResponse, PlaceOrderRequest, PlaceOrderResponse,
    order_receiver_server::OrderReceiver,
};
use orderflow_runtime::Store;
use tonic::{Request, Response, Status};

use crate::intake::Intake;

pub(crate) struct OrderReceiverService {
    intake: Intake,
    store: Store,
}

impl OrderReceiverService {
    pub(crate) fn new(intake: Intake, store: Store) -> Self {
        OrderReceiverService { intake, store }
    }
}

#[tonic::async_trait]
impl OrderReceiver for OrderReceiverService {
    async fn place_order(
        &self,
        request: Request<PlaceOrderRequest>,
    ) -> Result<Response<PlaceOrderResponse>, Status> {
        crate::place_order::place_order(&self.intake, request.into_inner())
            .await
            .map(Response::new)
    }

    async fn get_order(
        &self,
        request: Request<GetOrderRequest>,
    ) -> Result<Response<GetOrderResponse>, Status> {
        crate::get_order::get_order(&self.store, request.into_inner())
            .await
            .map(Response::new)
    }
}
