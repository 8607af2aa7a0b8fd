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
use orderflow_runtime::{Link, status::MAYBE_STORED_REASON, telemetry};
use tonic::{
    Code, Request, Status, Streaming,
    metadata::{MetadataKey, MetadataValue},
    transport::Channel,
};

use tonic_types::{ErrorDetails, StatusExt};

/// Metadata of a call one replica forwards to another; its value is the forwarding replica.
pub(crate) const FORWARDED: &str = "orderflow-forwarded-by";
/// How long a caller whose call found the owning replica unreachable is told to wait.
const UNREACHABLE_RETRY_AFTER: std::time::Duration = std::time::Duration::from_secs(1);

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

    /// Says which replica a failed forward went to. What the owner answered keeps its details
    /// (`NOT_STORED`/`MAYBE_STORED`, a retry hint). A call that got no answer (the owner could not
    /// be reached, or the connection broke) says what may have become of it: an order may have
    /// been placed (`MAYBE_STORED`), which a retry with the same idempotency key answers.
    fn failed(&self, replica: u32, partition: u32, status: Status, placing: bool) -> Status {
        if status.code() != Code::Unavailable {
            return status;
        }
        let url = self.urls.get(replica as usize).map_or("", String::as_str);
        let message = format!(
            "replica {replica} of the receiver ({url}), which owns partition {partition}, is \
             unavailable: {}",
            status.message()
        );
        if !status.details().is_empty() {
            return Status::with_details(
                Code::Unavailable,
                message,
                status.details().to_vec().into(),
            );
        }
        let mut details = ErrorDetails::new();
        details.set_retry_info(Some(UNREACHABLE_RETRY_AFTER));
        if !placing {
            return Status::with_error_details(Code::Unavailable, message, details);
        }
        details.set_error_info(
            MAYBE_STORED_REASON,
            "orderflow",
            [("replica".to_owned(), replica.to_string())],
        );
        Status::with_error_details(
            Code::Unavailable,
            format!(
                "{message}; the order may have been placed there: retry in {} s with the same \
                 idempotency key, which answers what was placed",
                UNREACHABLE_RETRY_AFTER.as_secs()
            ),
            details,
        )
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
            Err(status) => Err(self.failed(replica, partition, status, true)),
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
            Err(status) => Err(self.failed(replica, partition, status, false)),
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
            Err(status) => Err(self.failed(replica, partition, status, false)),
        }
    }
}

/// The replicas to forward a call for `partition`, which this replica does not own; refused if
/// the call was forwarded here already (`forwarded_by`).
pub(crate) fn forward_to<'a>(
    peers: Option<&'a Peers>,
    partition: u32,
    forwarded_by: Option<&str>,
) -> Result<&'a Peers, Status> {
    match (peers, forwarded_by) {
        (Some(peers), None) => Ok(peers),
        (_, from) => Err(misrouted(partition, from.unwrap_or("(none)"))),
    }
}

/// Refuses a call another replica forwarded for a partition this one does not own either.
fn misrouted(partition: u32, from: &str) -> Status {
    Status::failed_precondition(format!(
        "replica {from} forwarded this call for partition {partition}, which this replica does not \
         own either: the replicas disagree about who owns what (check that --peers lists every \
         replica in replica order and that all run with the same --replicas and --partitions)"
    ))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use orderflow_runtime::{ServerArgs, status::NOT_STORED_REASON};

    use super::*;

    /// Two replicas, the other one at a loopback port nothing listens on.
    fn peers() -> Peers {
        let mut args = ServerArgs::new("127.0.0.1:0".parse().unwrap(), "data");
        (args.replicas, args.partitions) = (2, 2);
        args.peers = Some("http://127.0.0.1:1,http://127.0.0.1:1".parse().unwrap());
        Peers::new(args.peers().unwrap().unwrap(), 2, 0).unwrap()
    }

    /// An order forwarded to a replica that gives no answer may have been placed there: the
    /// caller hears so, and to retry with its key; a read just hears when to retry.
    #[tokio::test]
    async fn a_forward_without_an_answer_says_what_may_have_become_of_it() {
        let peers = peers();
        let placing = peers
            .place(1, PlaceOrderRequest::default())
            .await
            .unwrap_err();
        assert_eq!(placing.code(), Code::Unavailable);
        assert!(
            placing.message().contains("replica 1")
                && placing.message().contains("idempotency key"),
            "{}",
            placing.message()
        );
        assert_eq!(
            placing.get_details_error_info().unwrap().reason,
            MAYBE_STORED_REASON
        );
        assert!(placing.get_details_retry_info().is_some());
        let reading = peers.get(1, GetOrderRequest::default()).await.unwrap_err();
        assert_eq!(reading.code(), Code::Unavailable);
        assert!(reading.get_details_error_info().is_none());
        assert!(reading.get_details_retry_info().is_some());
    }

    /// What the owning replica answered goes back as it was, its details included.
    #[tokio::test]
    async fn the_owner_s_answer_keeps_its_details() {
        let mut details = ErrorDetails::new();
        details.set_error_info(NOT_STORED_REASON, "orderflow", []);
        let owner = Status::with_error_details(Code::Unavailable, "data volume full", details);
        let relayed = peers().failed(1, 3, owner, true);
        assert_eq!(relayed.code(), Code::Unavailable);
        assert!(
            relayed.message().contains("partition 3")
                && relayed.message().contains("data volume full")
        );
        assert_eq!(
            relayed.get_details_error_info().unwrap().reason,
            NOT_STORED_REASON
        );
        let refused = Status::invalid_argument("bad");
        assert_eq!(
            peers().failed(1, 3, refused, true).code(),
            Code::InvalidArgument
        );
    }
}
