//! The `InvoiceCreator` tonic service: delegates each RPC to its own module, at the replica that
//! owns the order's partition. `GetInvoice` of an order in a partition another replica owns is
//! forwarded there (`--peers`); the lists gather every partition of every replica; `SetFaults`
//! changes the gateway of every replica.

use std::sync::Arc;

use futures::FutureExt;
use orderflow_proto::v1::{
    GatewayFaults, GetFaultsRequest, GetInvoiceRequest, Invoice, ListCapturesRequest,
    ListCapturesResponse, ListDeadLettersRequest, ListDeadLettersResponse, ListInvoicesRequest,
    ListInvoicesResponse, SetFaultsRequest, invoice_creator_client::InvoiceCreatorClient,
    invoice_creator_server::InvoiceCreator,
};
use orderflow_runtime::{
    AdminGuard, Owner, Partitions, dead_letters, forwarded_by, order_partition, respond,
};
use tonic::{Request, Response, Status};

use crate::{STAGE, gateway::SimulatedGateway};

pub(crate) struct InvoiceCreatorService {
    partitions: Partitions,
    gateway: Arc<SimulatedGateway>,
    admin: AdminGuard,
}

impl InvoiceCreatorService {
    pub(crate) fn new(
        partitions: Partitions,
        gateway: Arc<SimulatedGateway>,
        admin: AdminGuard,
    ) -> Self {
        InvoiceCreatorService {
            partitions,
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
        let from = forwarded_by(request.metadata());
        let request = request.into_inner();
        crate::get_invoice::check(&request)?;
        let Some(partition) = order_partition(&request.order_id, self.partitions.count()) else {
            return Err(crate::get_invoice::not_found(&request.order_id));
        };
        match self.partitions.owner(partition, from.as_deref())? {
            Owner::Here(store) => respond(crate::get_invoice::get_invoice(store, request).await),
            Owner::Replica {
                peers,
                replica,
                channel,
            } => InvoiceCreatorClient::new(channel)
                .get_invoice(peers.forwarded(request, None))
                .await
                .map_err(|status| {
                    peers.failed(STAGE, replica, &format!("partition {partition}"), status)
                }),
        }
    }

    async fn list_invoices(
        &self,
        request: Request<ListInvoicesRequest>,
    ) -> Result<Response<ListInvoicesResponse>, Status> {
        let from = forwarded_by(request.metadata());
        let page = self
            .partitions
            .gather(
                STAGE,
                request.get_ref(),
                from.as_deref(),
                |store, page| {
                    async move { crate::get_invoice::read_invoices(&store, page).await }.boxed()
                },
                |channel, request| {
                    async move {
                        InvoiceCreatorClient::new(channel)
                            .list_invoices(request)
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
                        InvoiceCreatorClient::new(channel)
                            .list_dead_letters(request)
                            .await
                    }
                    .boxed()
                },
            )
            .await;
        respond(page)
    }

    async fn set_faults(
        &self,
        request: Request<SetFaultsRequest>,
    ) -> Result<Response<GatewayFaults>, Status> {
        self.admin.check(request.metadata(), "SetFaults")?;
        let forwarded = forwarded_by(request.metadata()).is_some();
        let (metadata, _, request) = request.into_parts();
        // Checked and applied here first: a request this replica takes, every replica takes.
        let faults = crate::faults::set_faults(&self.gateway, request)?;
        for (peers, replica, channel) in self.partitions.others(forwarded) {
            InvoiceCreatorClient::new(channel)
                .set_faults(peers.forwarded(request, Some(&metadata)))
                .await
                .map_err(|status| peers.failed(STAGE, replica, "a gateway", status))?;
        }
        respond(Ok(faults))
    }

    async fn get_faults(
        &self,
        request: Request<GetFaultsRequest>,
    ) -> Result<Response<GatewayFaults>, Status> {
        let forwarded = forwarded_by(request.metadata()).is_some();
        let mut faults = crate::faults::get_faults(&self.gateway);
        for (peers, replica, channel) in self.partitions.others(forwarded) {
            let theirs = InvoiceCreatorClient::new(channel)
                .get_faults(peers.forwarded(GetFaultsRequest {}, None))
                .await
                .map_err(|status| peers.failed(STAGE, replica, "a gateway", status))?
                .into_inner();
            crate::faults::add_stats(&mut faults, theirs.stats.unwrap_or_default());
        }
        respond(Ok(faults))
    }

    async fn list_captures(
        &self,
        request: Request<ListCapturesRequest>,
    ) -> Result<Response<ListCapturesResponse>, Status> {
        let from = forwarded_by(request.metadata());
        let request = request.into_inner();
        respond(
            crate::faults::list_captures(
                &self.gateway,
                self.partitions.peers(),
                from.is_some(),
                request,
            )
            .await,
        )
    }
}
