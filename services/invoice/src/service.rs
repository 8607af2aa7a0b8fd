//! The `InvoiceCreator` tonic service: delegates each RPC to its own module.

use orderflow_proto::v1::{
    GetInvoiceRequest, Invoice, ListInvoicesRequest, ListInvoicesResponse,
    invoice_creator_server::InvoiceCreator,
};
use orderflow_runtime::Store;
use tonic::{Request, Response, Status};

pub(crate) struct InvoiceCreatorService {
    store: Store,
}

impl InvoiceCreatorService {
    pub(crate) fn new(store: Store) -> Self {
        InvoiceCreatorService { store }
    }
}

#[tonic::async_trait]
impl InvoiceCreator for InvoiceCreatorService {
    async fn get_invoice(
        &self,
        request: Request<GetInvoiceRequest>,
    ) -> Result<Response<Invoice>, Status> {
        crate::get_invoice::get_invoice(&self.store, request.into_inner())
            .await
            .map(Response::new)
    }

    async fn list_invoices(
        &self,
        request: Request<ListInvoicesRequest>,
    ) -> Result<Response<ListInvoicesResponse>, Status> {
        crate::get_invoice::list_invoices(&self.store, request.into_inner())
            .await
            .map(Response::new)
    }
}
