//! The `OrderReceiver` tonic service: delegates each RPC to its own module.

use std::sync::Arc;

use orderflow_proto::v1::{
    GetOrderRequest, GetOrderResponse, PlaceOrderRequest, PlaceOrderResponse, WatchOrderRequest,
    order_receiver_server::OrderReceiver,
};
use orderflow_runtime::respond;
use tonic::{Request, Response, Status, Streaming};

use crate::{Receiver, get_order::OrderStream, place_orders::AnswerStream};

pub(crate) struct OrderReceiverService {
    receiver: Arc<Receiver>,
}

impl OrderReceiverService {
    pub(crate) fn new(receiver: Arc<Receiver>) -> Self {
        OrderReceiverService { receiver }
    }
}

#[tonic::async_trait]
impl OrderReceiver for OrderReceiverService {
    async fn place_order(
        &self,
        request: Request<PlaceOrderRequest>,
    ) -> Result<Response<PlaceOrderResponse>, Status> {
        let from = forwarded_by(&request);
        respond(
            crate::place_order::place_order(&self.receiver, request.into_inner(), from.as_deref())
                .await,
        )
    }

    type PlaceOrdersStream = AnswerStream;

    async fn place_orders(
        &self,
        request: Request<Streaming<PlaceOrderRequest>>,
    ) -> Result<Response<Self::PlaceOrdersStream>, Status> {
        let from = forwarded_by(&request);
        respond(Ok(crate::place_orders::place_orders(
            self.receiver.clone(),
            request.into_inner(),
            from,
        )))
    }

    async fn get_order(
        &self,
        request: Request<GetOrderRequest>,
    ) -> Result<Response<GetOrderResponse>, Status> {
        let from = forwarded_by(&request);
        respond(
            crate::get_order::get_order(&self.receiver, request.into_inner(), from.as_deref())
                .await,
        )
    }

    type WatchOrderStream = OrderStream;

    async fn watch_order(
        &self,
        request: Request<WatchOrderRequest>,
    ) -> Result<Response<Self::WatchOrderStream>, Status> {
        let from = forwarded_by(&request);
        respond(
            crate::get_order::watch_order(
                self.receiver.clone(),
                request.into_inner(),
                from.as_deref(),
            )
            .await,
        )
    }
}

/// The replica that forwarded `request` here, if another replica did.
fn forwarded_by<T>(request: &Request<T>) -> Option<String> {
    orderflow_runtime::forwarded_by(request.metadata())
}
