//! The other replicas of the receiver (`--peers`): where an order of a partition this replica does
//! not own is placed, and where `GetOrder` and `WatchOrder` of such an order are asked.
//!
//! A forwarded call says so in its metadata ([`FORWARDED`]) and carries the caller's trace context.
//! A replica never forwards a forwarded call again: if it does not own the partition either, the
//! replicas disagree about who owns what (a `--peers` list out of replica order, a replica started
//! with another `--replicas`), and it answers `FAILED_PRECONDITION` saying so.

use orderflow_proto::v1::{
    GetOrderRequest, GetOrderResponse, Order, PlaceOrderRequest, PlaceOrderResponse,
    WatchOrderRequest, order_receiver_client::OrderReceiverClient,
};
use orderflow_runtime::{Link, telemetry};
use tonic::{
    Request, Status, Streaming,
    metadata::{MetadataKey, MetadataValue},
    transport::Channel,
};

/// Metadata of a call one replica forwards to another; its value is the forwarding replica.
pub(crate) const FORWARDED: &str = "orderflow-forwarded-by";

/// The receiver's replicas, in replica order.
pub(crate) struct Peers {
    /// One lazily connected channel per replica (this one's own is never used).
    channels: Vec<Channel>,
    /// Their URLs, for messages.
    urls: Vec<String>,
    /// This replica.
    me: u32,
}

impl Peers {
    /// The `replicas` replicas `link` names; this one is replica `me`.
    pub(crate) fn new(link: Link, replicas: u32, me: u32) -> Result<Peers, String> {
        let mut channels = Vec::with_capacity(replicas as usize);
        let mut urls = Vec::with_capacity(replicas as usize);
        for replica in 0..replicas {
            channels.push(link.endpoint(replica)?.connect_lazy());
            urls.push(link.url.replica(replica).unwrap_or_default());
        }
        Ok(Peers { channels, urls, me })
    }

    /// The replica that owns `partition`, and a client of it.
    fn owner(&self, partition: u32) -> Result<(u32, OrderReceiverClient<Channel>), Status> {
        let replicas = u32::try_from(self.channels.len())
            .unwrap_or(u32::MAX)
            .max(1);
        let replica = partition % replicas;
        let channel = self.channels.get(replica as usize).ok_or_else(|| {
            Status::failed_precondition(format!(
                "--peers names no replica {replica}, which owns partition {partition}"
            ))
        })?;
        Ok((replica, OrderReceiverClient::new(channel.clone())))
    }

    /// `message` as a call forwarded by this replica, in the current span's trace.
    fn forwarded<T>(&self, message: T) -> Request<T> {
        let mut request = Request::new(message);
        let metadata = request.metadata_mut();
        metadata.insert(FORWARDED, MetadataValue::from(self.me));
        for (key, value) in telemetry::inject(&tracing::Span::current()) {
            if let (Ok(key), Ok(value)) = (
                MetadataKey::from_bytes(key.as_bytes()),
                MetadataValue::try_from(value.as_str()),
            ) {
                metadata.insert(key, value);
            }
        }
        request
    }

    /// Says which replica a failed forward went to.
    fn failed(&self, replica: u32, partition: u32, status: Status) -> Status {
        if status.code() != tonic::Code::Unavailable {
            return status;
        }
        let url = self.urls.get(replica as usize).map_or("", String::as_str);
        Status::unavailable(format!(
            "replica {replica} of the receiver ({url}), which owns partition {partition}, is \
             unavailable: {}",
            status.message()
        ))
    }

    /// Places `request` at the replica that owns `partition`.
    pub(crate) async fn place(
        &self,
        partition: u32,
        request: PlaceOrderRequest,
    ) -> Result<PlaceOrderResponse, Status> {
        let (replica, mut client) = self.owner(partition)?;
        match client.place_order(self.forwarded(request)).await {
            Ok(response) => Ok(response.into_inner()),
            Err(status) => Err(self.failed(replica, partition, status)),
        }
    }

    /// The order `request` names, from the replica that owns `partition`.
    pub(crate) async fn get(
        &self,
        partition: u32,
        request: GetOrderRequest,
    ) -> Result<GetOrderResponse, Status> {
        let (replica, mut client) = self.owner(partition)?;
        match client.get_order(self.forwarded(request)).await {
            Ok(response) => Ok(response.into_inner()),
            Err(status) => Err(self.failed(replica, partition, status)),
        }
    }

    /// Watches the order `request` names at the replica that owns `partition`.
    pub(crate) async fn watch(
        &self,
        partition: u32,
        request: WatchOrderRequest,
    ) -> Result<Streaming<Order>, Status> {
        let (replica, mut client) = self.owner(partition)?;
        match client.watch_order(self.forwarded(request)).await {
            Ok(response) => Ok(response.into_inner()),
            Err(status) => Err(self.failed(replica, partition, status)),
        }
    }
}

/// Refuses a call another replica forwarded for a partition this one does not own either.
pub(crate) fn misrouted(partition: u32, from: &str) -> Status {
    Status::failed_precondition(format!(
        "replica {from} forwarded this call for partition {partition}, which this replica does not \
         own either: the replicas disagree about who owns what (check that --peers lists every \
         replica in replica order and that all run with the same --replicas and --partitions)"
    ))
}
