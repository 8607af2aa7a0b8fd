//! Orders forwarded to the replica that owns their partition over one `PlaceOrders` stream per
//! replica, rather than one `PlaceOrder` call each: a call costs both replicas an HTTP/2 stream,
//! headers and a call of its own, about as much again as placing the order.
//!
//! A stream's orders carry no trace context of their own, so only orders whose trace is decided
//! unsampled travel on it ([`orderflow_runtime::telemetry::decided_unsampled`]); the owner places
//! each as an unsampled order. A sampled order still goes in a call of its own, whose span is the
//! parent of the owner's. So does an order that finds the stream full.
//!
//! The owner answers in the order the orders went out (`crate::place_orders`), so each waiting
//! caller is the front of a queue. When the stream ends, the callers still waiting hear
//! `UNAVAILABLE`: `NOT_STORED` for the orders that never left this replica, or that the owner says
//! it did not read (it is shutting down); `MAYBE_STORED` for the rest, which may have reached it.
//! The next order opens a new stream.

use std::{
    collections::VecDeque,
    sync::{
        Arc, Mutex, MutexGuard, PoisonError,
        atomic::{AtomicU64, Ordering},
    },
};

use orderflow_proto::v1::{
    PlaceOrderRequest, PlaceOrderResponse, PlaceOrdersResponse,
    order_receiver_client::OrderReceiverClient, place_orders_response,
};
use orderflow_runtime::status::NOT_STORED_REASON;
use tokio::sync::{
    mpsc::{self, error::TrySendError},
    oneshot,
};
use tokio_stream::{StreamExt, wrappers::ReceiverStream};
use tonic::{Code, Request, Status, metadata::MetadataMap, transport::Channel};
use tonic_types::{ErrorDetails, StatusExt};

use crate::place_orders::{MAX_IN_FLIGHT, status_of};

/// What the owner answered about one order.
type Answer = Result<PlaceOrderResponse, Status>;

/// The stream to one replica of the receiver, opened by the first order forwarded to it and again
/// by the first after it ended.
pub(crate) struct OrderStream {
    channel: Channel,
    open: Arc<Mutex<Option<Open>>>,
    /// Streams opened so far.
    opened: AtomicU64,
}

/// A stream under way.
struct Open {
    /// Which of this replica's streams it is.
    number: u64,
    requests: mpsc::Sender<PlaceOrderRequest>,
    /// The callers waiting for an answer, in the order their orders were queued.
    waiting: VecDeque<oneshot::Sender<Answer>>,
    /// Orders answered so far.
    answered: u64,
    /// Orders handed to the connection so far; those queued after them never left this replica.
    sent: Arc<AtomicU64>,
}

impl OrderStream {
    pub(crate) fn new(channel: Channel) -> Self {
        OrderStream {
            channel,
            open: Arc::new(Mutex::new(None)),
            opened: AtomicU64::new(0),
        }
    }

    /// Places `request` at the replica over the stream, which is opened with `metadata()` when
    /// none is under way. Gives `request` back when the stream has as many orders waiting as the
    /// owner places at once: the caller forwards it in a call of its own.
    pub(crate) async fn place(
        &self,
        request: PlaceOrderRequest,
        metadata: impl FnOnce() -> MetadataMap,
    ) -> Result<Answer, PlaceOrderRequest> {
        let (answer, answered) = oneshot::channel();
        {
            let mut open = lock(&self.open);
            if open
                .as_ref()
                .is_none_or(|stream| stream.requests.is_closed())
            {
                *open = Some(self.start(metadata()));
            }
            let Some(stream) = open.as_mut() else {
                return Err(request);
            };
            if stream.waiting.len() >= MAX_IN_FLIGHT {
                return Err(request);
            }
            match stream.requests.try_send(request) {
                Ok(()) => stream.waiting.push_back(answer),
                Err(TrySendError::Full(request) | TrySendError::Closed(request)) => {
                    return Err(request);
                }
            }
        }
        Ok(answered.await.unwrap_or_else(|_| {
            Err(Status::unavailable(
                "the stream to it ended before it answered",
            ))
        }))
    }

    /// Opens a stream and starts following its answers.
    fn start(&self, metadata: MetadataMap) -> Open {
        let number = self.opened.fetch_add(1, Ordering::Relaxed);
        let (requests, queued) = mpsc::channel(MAX_IN_FLIGHT);
        let sent = Arc::new(AtomicU64::new(0));
        let counted = sent.clone();
        let outgoing = ReceiverStream::new(queued).map(move |request| {
            counted.fetch_add(1, Ordering::Relaxed);
            request
        });
        let mut call = Request::new(outgoing);
        *call.metadata_mut() = metadata;
        tokio::spawn(follow(
            OrderReceiverClient::new(self.channel.clone()),
            call,
            self.open.clone(),
            number,
        ));
        Open {
            number,
            requests,
            waiting: VecDeque::new(),
            answered: 0,
            sent,
        }
    }
}

fn lock(open: &Mutex<Option<Open>>) -> MutexGuard<'_, Option<Open>> {
    open.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Hands each answer of stream `number` to its caller, and when the stream ends tells the callers
/// still waiting what became of their orders.
async fn follow<S>(
    mut client: OrderReceiverClient<Channel>,
    call: Request<S>,
    open: Arc<Mutex<Option<Open>>>,
    number: u64,
) where
    S: tokio_stream::Stream<Item = PlaceOrderRequest> + Send + 'static,
{
    let ending = match client.place_orders(call).await {
        Err(status) => status,
        Ok(response) => {
            let mut answers = response.into_inner();
            loop {
                match answers.message().await {
                    Ok(Some(answer)) => {
                        if let Err(status) = deliver(&open, number, answer) {
                            break status;
                        }
                    }
                    Ok(None) => break Status::unavailable("it ended the stream"),
                    Err(status) => break status,
                }
            }
        }
    };
    end(&open, number, &ending);
}

/// Hands `answer` to the caller waiting for it; an answer out of turn ends the stream.
fn deliver(
    open: &Mutex<Option<Open>>,
    number: u64,
    answer: PlaceOrdersResponse,
) -> Result<(), Status> {
    let mut open = lock(open);
    let Some(stream) = open.as_mut().filter(|stream| stream.number == number) else {
        return Err(Status::unavailable("the stream was replaced"));
    };
    if answer.index != stream.answered {
        return Err(Status::unavailable(format!(
            "it answered order {} of the stream where {} was due",
            answer.index, stream.answered
        )));
    }
    let Some(caller) = stream.waiting.pop_front() else {
        return Err(Status::unavailable(format!(
            "it answered order {} of the stream, which was not sent",
            answer.index
        )));
    };
    stream.answered += 1;
    let _ = caller.send(match answer.result {
        Some(place_orders_response::Result::Accepted(accepted)) => Ok(accepted),
        Some(place_orders_response::Result::Refused(refusal)) => Err(status_of(refusal)),
        None => Err(Status::unavailable("its answer was empty")),
    });
    Ok(())
}

/// Ends stream `number` with `ending`: the next order opens another, and each caller still waiting
/// hears whether its order may have been placed.
fn end(open: &Mutex<Option<Open>>, number: u64, ending: &Status) {
    let Some(stream) = lock(open).take_if(|stream| stream.number == number) else {
        return;
    };
    let not_read = ending
        .get_details_error_info()
        .is_some_and(|info| info.reason == NOT_STORED_REASON);
    let sent = stream.sent.load(Ordering::Relaxed);
    for (position, caller) in (stream.answered..).zip(stream.waiting) {
        let _ = caller.send(Err(if not_read || position >= sent {
            not_stored(ending)
        } else {
            Status::unavailable(format!(
                "the stream to it ended before it answered: {}",
                ending.message()
            ))
        }));
    }
}

/// `UNAVAILABLE`, `NOT_STORED`: the order was not placed, and may be sent again.
fn not_stored(ending: &Status) -> Status {
    let mut details = ErrorDetails::new();
    details.set_retry_info(Some(std::time::Duration::from_secs(1)));
    details.set_error_info(NOT_STORED_REASON, "orderflow", []);
    Status::with_error_details(
        Code::Unavailable,
        format!(
            "the stream to it ended before the order was read ({}); it was not placed",
            ending.message()
        ),
        details,
    )
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use orderflow_proto::v1::OrderLine;
    use orderflow_runtime::{FORWARDED, ServerArgs, status::MAYBE_STORED_REASON};
    use tokio_util::sync::CancellationToken;
    use tonic::transport::Endpoint;

    use super::*;

    fn order(customer: &str, key: &str) -> PlaceOrderRequest {
        PlaceOrderRequest {
            customer_id: customer.to_owned(),
            lines: vec![OrderLine {
                sku: "A".to_owned(),
                quantity: 1,
            }],
            idempotency_key: key.to_owned(),
        }
    }

    fn forwarded() -> MetadataMap {
        let mut metadata = MetadataMap::new();
        metadata.insert(FORWARDED, 1u32.into());
        metadata
    }

    fn reason(status: &Status) -> Option<String> {
        status.get_details_error_info().map(|info| info.reason)
    }

    /// A real receiver, the owner: orders sent at once on one stream are each answered, as
    /// `PlaceOrder` answers (placed, replayed by an idempotency key, refused with its field
    /// violations). Once the owner is gone, an order that never reached it is `NOT_STORED`.
    #[tokio::test]
    async fn orders_on_the_stream_are_answered_in_turn_and_an_end_says_what_became_of_them() {
        let dir = tempfile::tempdir().unwrap();
        let owner = crate::bind(crate::Config::new(ServerArgs::new(
            "127.0.0.1:0".parse().unwrap(),
            dir.path(),
        )))
        .await
        .unwrap();
        let addr = owner.local_addr();
        let shutdown = CancellationToken::new();
        let serving = tokio::spawn(owner.serve(shutdown.clone()));
        let channel = Endpoint::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect_lazy();
        let stream = OrderStream::new(channel);

        let placing = (0..50).map(|i| stream.place(order(&format!("c{i}"), ""), forwarded));
        let answers = futures::future::join_all(placing).await;
        let mut ids: Vec<String> = answers
            .into_iter()
            .map(|answer| answer.unwrap().unwrap().order_id)
            .collect();
        ids.sort();
        ids.dedup();
        assert_eq!(ids.len(), 50, "each order placed once");
        assert_eq!(stream.opened.load(Ordering::Relaxed), 1, "on one stream");

        let first = stream.place(order("ana", "k1"), forwarded).await;
        let again = stream.place(order("ana", "k1"), forwarded).await;
        let (first, again) = (first.unwrap().unwrap(), again.unwrap().unwrap());
        assert_eq!(first.order_id, again.order_id);
        assert!(again.replayed && !first.replayed);

        let refused = stream
            .place(order("", ""), forwarded)
            .await
            .unwrap()
            .unwrap_err();
        assert_eq!(refused.code(), Code::InvalidArgument);
        let violations = refused.get_details_bad_request().unwrap().field_violations;
        assert_eq!(violations[0].field, "customer_id");

        shutdown.cancel();
        serving.await.unwrap().unwrap();
        let unplaced = stream
            .place(order("bo", ""), forwarded)
            .await
            .unwrap()
            .unwrap_err();
        assert_eq!(unplaced.code(), Code::Unavailable);
        assert_eq!(
            reason(&unplaced).as_deref(),
            Some(NOT_STORED_REASON),
            "{unplaced:?}"
        );
        assert_ne!(reason(&unplaced).as_deref(), Some(MAYBE_STORED_REASON));
    }
}
