//! The `StockChecker` tonic service: delegates each RPC to its own module.

use orderflow_proto::v1::{
    GetStockRequest, ListStockRequest, ListStockResponse, SetStockRequest, StockItem,
    stock_checker_server::StockChecker,
};
use orderflow_runtime::{AdminGuard, Store, respond};
use tonic::{Request, Response, Status};

pub(crate) struct StockCheckerService {
    store: Store,
    admin: AdminGuard,
}

impl StockCheckerService {
    pub(crate) fn new(store: Store, admin: AdminGuard) -> Self {
        StockCheckerService { store, admin }
    }
}

#[tonic::async_trait]
impl StockChecker for StockCheckerService {
    async fn set_stock(
        &self,
        request: Request<SetStockRequest>,
    ) -> Result<Response<StockItem>, Status> {
        self.admin.check(request.metadata(), "SetStock")?;
        respond(crate::set_stock::set_stock(&self.store, request.into_inner()).await)
    }

    async fn get_stock(
        &self,
        request: Request<GetStockRequest>,
    ) -> Result<Response<StockItem>, Status> {
        respond(crate::get_stock::get_stock(&self.store, request.into_inner()).await)
    }

    async fn list_stock(
        &self,
        request: Request<ListStockRequest>,
    ) -> Result<Response<ListStockResponse>, Status> {
        respond(crate::get_stock::list_stock(&self.store, request.into_inner()).await)
    }
}
