//! The other replicas of the receiver (`--peers`): where an order of a partition this replica does
//! not own is placed, and where `GetOrder` and `WatchOrder` of such an order are asked. The
//! forwarding itself (metadata, trace context, loops) is the runtime's [`orderflow_runtime::Peers`];
//! orders whose traces are not sampled go over one stream per replica (`crate::forwarding`). This
//! says what a failed forward means for an order.

use orderflow_proto::v1::{
    GetOrderRequest, GetOrderResponse, Order, PlaceOrderRequest, PlaceOrderResponse,
    WatchOrderRequest, order_receiver_client::OrderReceiverClient,
};
use orderflow_runtime::{Link, status::MAYBE_STORED_REASON, telemetry};
use tonic::{Code, Status, Streaming, transport::Channel};

use tonic_types::{ErrorDetails, StatusExt};

use crate::forwarding::OrderStream;

/// How long a caller whose call found the owning replica unreachable is told to wait.
const UNREACHABLE_RETRY_AFTER: std::time::Duration = std::time::Duration::from_secs(1);

/// The receiver's replicas, in replica order.
pub(crate) struct Peers {
    replicas: orderflow_runtime::Peers,
    /// One stream of orders to each replica, by replica.
    streams: Vec<OrderStream>,
}

impl Peers {
    /// The `replicas` replicas `link` names; this one is replica `me`.
    pub(crate) fn new(link: Link, replicas: u32, me: u32) -> Result<Peers, String> {
        let replicas = orderflow_runtime::Peers::new(&link, replicas, me)?;
        let streams = (0..replicas.replicas())
            .filter_map(|replica| replicas.channel(replica))
            .map(OrderStream::new)
            .collect();
        Ok(Peers { replicas, streams })
    }

    /// The replica that owns `partition`, and a client of it.
    fn owner(&self, partition: u32) -> Result<(u32, OrderReceiverClient<Channel>), Status> {
        let (replica, channel) = self.replicas.owner(partition)?;
        Ok((replica, OrderReceiverClient::new(channel)))
    }

    /// Says which replica a failed forward went to. What the owner answered keeps its details
    /// (`NOT_STORED`/`MAYBE_STORED`, a retry hint). A call that got no answer (the owner could not
    /// be reached, or the connection broke) says what may have become of it: an order may have
    /// been placed (`MAYBE_STORED`), which a retry with the same idempotency key answers.
    fn failed(&self, replica: u32, partition: u32, status: Status, placing: bool) -> Status {
        if status.code() != Code::Unavailable {
            return status;
        }
        let url = self.replicas.url(replica);
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

    /// Places `request` at the replica that owns `partition`: over the stream to it when the
    /// order's trace is decided unsampled, else in a call of its own, in the order's trace.
    pub(crate) async fn place(
        &self,
        partition: u32,
        request: PlaceOrderRequest,
    ) -> Result<PlaceOrderResponse, Status> {
        let (replica, mut client) = self.owner(partition)?;
        let mut request = request;
        if let Some(stream) = self.streams.get(replica as usize)
            && telemetry::decided_unsampled(&telemetry::current_context())
        {
            match stream
                .place(request, || self.replicas.forwarded_metadata(None))
                .await
            {
                Ok(answer) => {
                    return answer.map_err(|status| self.failed(replica, partition, status, true));
                }
                // The stream is full: this one goes in a call.
                Err(given_back) => request = given_back,
            }
        }
        match client
            .place_order(self.replicas.forwarded(request, None))
            .await
        {
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
        match client
            .get_order(self.replicas.forwarded(request, None))
            .await
        {
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
        match client
            .watch_order(self.replicas.forwarded(request, None))
            .await
        {
            Ok(response) => Ok(response.into_inner()),
            Err(status) => Err(self.failed(replica, partition, status, false)),
        }
    }
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
