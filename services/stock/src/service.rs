//! The `StockChecker` tonic service: delegates each RPC to its own module, at the replica that
//! holds the sku's shard. `SetStock` and `GetStock` of a sku in a shard another replica owns are
//! forwarded there (`--peers`); `ListStock` gathers every shard of every replica.

use std::collections::BTreeMap;

use orderflow_proto::v1::{
    GetStockRequest, ListStockRequest, ListStockResponse, SetStockRequest, StockItem,
    stock_checker_client::StockCheckerClient, stock_checker_server::StockChecker,
};
use orderflow_runtime::{
    AdminGuard, FieldViolations, Peers, Store, forward_to, forwarded_by, paging, respond,
};
use tonic::{Code, Request, Response, Status};

use crate::{get_stock, items, set_stock, shards::shard_of};

pub(crate) struct StockCheckerService {
    /// The stores of the shards this replica owns, by shard; never empty.
    stores: BTreeMap<u32, Store>,
    /// One of them, to answer a request that fails validation wherever it would go.
    checking: Store,
    /// How many shards the stock has.
    count: u32,
    /// The stock stage's replicas, when it runs several.
    peers: Option<Peers>,
    admin: AdminGuard,
}

/// Where a call about one sku is answered.
enum Route<'a> {
    Here(&'a Store),
    /// At the replica that owns the shard.
    Replica(&'a Peers, u32),
}

impl StockCheckerService {
    /// `first` is this replica's first store, `stores` all of them.
    pub(crate) fn new(
        first: &Store,
        stores: &[Store],
        count: u32,
        peers: Option<Peers>,
        admin: AdminGuard,
    ) -> Self {
        let stores = stores
            .iter()
            .map(|store| (store.partition().index, store.clone()))
            .collect();
        StockCheckerService {
            stores,
            checking: first.clone(),
            count,
            peers,
            admin,
        }
    }

    /// Where a call about `sku` (a valid one) is answered; `forwarded_by`: the replica that
    /// forwarded this call here.
    fn route(&self, sku: &str, forwarded_by: Option<&str>) -> Result<Route<'_>, Status> {
        let shard = shard_of(sku, self.count);
        if let Some(store) = self.stores.get(&shard) {
            return Ok(Route::Here(store));
        }
        forward_to(self.peers.as_ref(), shard, forwarded_by)
            .map(|peers| Route::Replica(peers, shard))
    }

    /// A client of the replica that owns `shard`.
    fn client(
        peers: &Peers,
        shard: u32,
    ) -> Result<(u32, StockCheckerClient<tonic::transport::Channel>), Status> {
        let (replica, channel) = peers.owner(shard)?;
        Ok((replica, StockCheckerClient::new(channel)))
    }
}

/// Says which replica a forward that got no answer went to.
fn unreachable(peers: &Peers, replica: u32, shard: u32, status: Status) -> Status {
    if status.code() != Code::Unavailable || !status.details().is_empty() {
        return status;
    }
    Status::unavailable(format!(
        "replica {replica} of the stock stage ({}), which holds shard {shard}, is unavailable: {}",
        peers.url(replica),
        status.message()
    ))
}

/// Whether `sku` is a valid sku (the module that answers says why not).
fn valid_sku(sku: &str) -> bool {
    let mut violations = FieldViolations::new();
    items::check_sku(sku, "sku", &mut violations);
    violations.check().is_ok()
}

#[tonic::async_trait]
impl StockChecker for StockCheckerService {
    async fn set_stock(
        &self,
        request: Request<SetStockRequest>,
    ) -> Result<Response<StockItem>, Status> {
        self.admin.check(request.metadata(), "SetStock")?;
        let from = forwarded_by(request.metadata());
        let (metadata, _, request) = request.into_parts();
        if !valid_sku(&request.sku) {
            return respond(set_stock::set_stock(&self.checking, request).await);
        }
        match self.route(&request.sku, from.as_deref())? {
            Route::Here(store) => respond(set_stock::set_stock(store, request).await),
            Route::Replica(peers, shard) => {
                let (replica, mut client) = Self::client(peers, shard)?;
                client
                    .set_stock(peers.forwarded(request, Some(&metadata)))
                    .await
                    .map_err(|status| unreachable(peers, replica, shard, status))
            }
        }
    }

    async fn get_stock(
        &self,
        request: Request<GetStockRequest>,
    ) -> Result<Response<StockItem>, Status> {
        let from = forwarded_by(request.metadata());
        let (metadata, _, request) = request.into_parts();
        if !valid_sku(&request.sku) {
            return respond(get_stock::get_stock(&self.checking, request).await);
        }
        match self.route(&request.sku, from.as_deref())? {
            Route::Here(store) => respond(get_stock::get_stock(store, request).await),
            Route::Replica(peers, shard) => {
                let (replica, mut client) = Self::client(peers, shard)?;
                client
                    .get_stock(peers.forwarded(request, Some(&metadata)))
                    .await
                    .map_err(|status| unreachable(peers, replica, shard, status))
            }
        }
    }

    async fn list_stock(
        &self,
        request: Request<ListStockRequest>,
    ) -> Result<Response<ListStockResponse>, Status> {
        let forwarded = forwarded_by(request.metadata()).is_some();
        let (metadata, _, request) = request.into_parts();
        let mut violations = FieldViolations::new();
        let size = paging::page_size_or_default(request.page_size, &mut violations);
        violations.check()?;
        let mut pages = Vec::with_capacity(self.stores.len());
        for store in self.stores.values() {
            pages.push(get_stock::list_stock(store, request.clone()).await?);
        }
        // Every other replica's shards, unless this is one of those calls.
        if let Some(peers) = self.peers.as_ref().filter(|_| !forwarded) {
            for replica in (0..peers.replicas()).filter(|r| *r != peers.me()) {
                let Some(channel) = peers.channel(replica) else {
                    continue;
                };
                let page = StockCheckerClient::new(channel)
                    .list_stock(peers.forwarded(request.clone(), Some(&metadata)))
                    .await
                    .map_err(|status| {
                        if status.code() != Code::Unavailable {
                            return status;
                        }
                        Status::unavailable(format!(
                            "replica {replica} of the stock stage ({}) is unavailable, so the \
                             list would miss its shards: {}",
                            peers.url(replica),
                            status.message()
                        ))
                    })?;
                pages.push(page.into_inner());
            }
        }
        respond(Ok(get_stock::merge_pages(pages, size)))
    }
}
