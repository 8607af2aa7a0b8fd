//! The `InvoiceCreator` tonic service: delegates each RPC to its own module.

use std::sync::Arc;

use orderflow_proto::v1::{
    GatewayFaults, GetFaultsRequest, GetInvoiceRequest, Invoice, ListCapturesRequest,
    ListCapturesResponse, ListDeadLettersRequest, ListDeadLettersResponse, ListInvoicesRequest,
    ListInvoicesResponse, SetFaultsRequest, invoice_creator_server::InvoiceCreator,
};
use orderflow_runtime::{AdminGuard, Store, respond};
use tonic::{Request, Response, Status};

use crate::gateway::SimulatedGateway;

pub(crate) struct InvoiceCreatorService {
    store: Store,
    gateway: Arc<SimulatedGateway>,
    admin: AdminGuard,
}

impl InvoiceCreatorService {
    pub(crate) fn new(store: Store, gateway: Arc<SimulatedGateway>, admin: AdminGuard) -> Self {
        InvoiceCreatorService {
            store,
            gateway,
            admin,
        }
    }
}

#[tonic::async_trait]
impl InvoiceCreator for InvoiceCreatorService {
    async fn get_invoice(
        &self,
        request: Request<GetInvoiceRequest>,
    ) -> Result<Response<Invoice>, Status> {
        respond(crate::get_invoice::get_invoice(&self.store, request.into_inner()).await)
    }

    async fn list_invoices(
        &self,
        request: Request<ListInvoicesRequest>,
    ) -> Result<Response<ListInvoicesResponse>, Status> {
        respond(crate::get_invoice::list_invoices(&self.store, request.into_inner()).await)
    }

    async fn list_dead_letters(
        &self,
        request: Request<ListDeadLettersRequest>,
    ) -> Result<Response<ListDeadLettersResponse>, Status> {
        respond(crate::get_invoice::list_dead_letters(&self.store, request.into_inner()).await)
    }

    async fn set_faults(
        &self,
        request: Request<SetFaultsRequest>,
    ) -> Result<Response<GatewayFaults>, Status> {
        self.admin.check(request.metadata(), "SetFaults")?;
        respond(crate::faults::set_faults(
            &self.gateway,
            request.into_inner(),
        ))
    }

    async fn get_faults(
        &self,
        _request: Request<GetFaultsRequest>,
    ) -> Result<Response<GatewayFaults>, Status> {
        respond(Ok(crate::faults::get_faults(&self.gateway)))
    }

    async fn list_captures(
        &self,
        request: Request<ListCapturesRequest>,
    ) -> Result<Response<ListCapturesResponse>, Status> {
        respond(crate::faults::list_captures(&self.gateway, request.into_inner()).await)
    }
}
