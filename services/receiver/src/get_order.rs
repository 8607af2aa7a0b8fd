//! `GetOrder` and `WatchOrder`: an order and its progress, once or as it moves.

use std::sync::Arc;

use orderflow_proto::v1::{GetOrderRequest, GetOrderResponse, Order, WatchOrderRequest};
use orderflow_runtime::{FieldViolations, Store, StoreError, decode_record};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Status, Streaming};

use crate::{
    Home, Receiver,
    intake::{ORDERS, ORDERS_NAME},
    peers::Peers,
    progress,
};

/// Where an order lives: here, or at another replica.
enum Place<'a> {
    Here(&'a Home),
    Replica(&'a Peers, u32),
}

/// Where the order `order_id` (checked) lives, by the partition its id names. An id that names
/// no partition of this pipeline names no order.
fn place<'a>(
    receiver: &'a Receiver,
    order_id: &str,
    forwarded_by: Option<&str>,
) -> Result<Place<'a>, Status> {
    check_id(order_id)?;
    let partition = orderflow_runtime::order_partition(order_id, receiver.partitions)
        .ok_or_else(|| not_found(order_id))?;
    if let Some(home) = receiver.home(partition) {
        return Ok(Place::Here(home));
    }
    orderflow_runtime::forward_to(receiver.peers.as_ref(), partition, forwarded_by)
        .map(|peers| Place::Replica(peers, partition))
}

/// The order `request` names, from the replica that owns its partition. `forwarded_by`: the
/// replica that forwarded this call.
pub(crate) async fn get_order(
    receiver: &Receiver,
    request: GetOrderRequest,
    forwarded_by: Option<&str>,
) -> Result<GetOrderResponse, Status> {
    let home = match place(receiver, &request.order_id, forwarded_by)? {
        Place::Here(home) => home,
        Place::Replica(peers, partition) => return peers.get(partition, request).await,
    };
    let order = read(&home.store, &request.order_id).await?;
    Ok(GetOrderResponse {
        order: Some(order.ok_or_else(|| not_found(&request.order_id))?),
    })
}

pub(crate) type OrderStream = ReceiverStream<Result<Order, Status>>;

/// The order now, then after every change, until it is terminal, the caller leaves or the stage
/// drains (then UNAVAILABLE, so the caller knows to watch again elsewhere).
pub(crate) async fn watch_order(
    receiver: Arc<Receiver>,
    request: WatchOrderRequest,
    forwarded_by: Option<&str>,
) -> Result<OrderStream, Status> {
    let store = match place(&receiver, &request.order_id, forwarded_by)? {
        Place::Here(home) => home.store.clone(),
        Place::Replica(peers, partition) => {
            return peers.watch(partition, request).await.map(relay);
        }
    };
    let id = request.order_id;
    // Subscribe before the first read, so no change in between is missed.
    let mut changes = receiver.watchers.watch(&id);
    let Some(first) = read(&store, &id).await? else {
        drop(changes);
        receiver.watchers.release(&id);
        return Err(not_found(&id));
    };
    let (tx, rx) = mpsc::channel(4);
    tokio::spawn(async move {
        let mut last = first;
        let mut terminal = last.terminal;
        if tx.send(Ok(last.clone())).await.is_err() {
            terminal = true;
        }
        while !terminal {
            tokio::select! {
                changed = changes.changed() => if changed.is_err() { break },
                () = tx.closed() => break,
                () = receiver.draining.cancelled() => {
                    let _ = tx.send(Err(Status::unavailable("the receiver is shutting down; watch again"))).await;
                    break;
                }
            }
            match read(&store, &id).await {
                Ok(Some(now)) if now != last => {
                    terminal = now.terminal;
                    if tx.send(Ok(now.clone())).await.is_err() {
                        break;
                    }
                    last = now;
                }
                Ok(_) => {}
                Err(status) => {
                    let _ = tx.send(Err(status)).await;
                    break;
                }
            }
        }
        drop(changes);
        receiver.watchers.release(&id);
    });
    Ok(ReceiverStream::new(rx))
}

/// What another replica streams about an order, passed on as it comes.
fn relay(mut stream: Streaming<Order>) -> OrderStream {
    let (tx, rx) = mpsc::channel(4);
    tokio::spawn(async move {
        loop {
            let next = tokio::select! {
                next = stream.message() => next,
                () = tx.closed() => return,
            };
            let item = match next {
                Ok(Some(order)) => Ok(order),
                Ok(None) => return,
                Err(status) => Err(status),
            };
            let last = item.is_err();
            if tx.send(item).await.is_err() || last {
                return;
            }
        }
    });
    ReceiverStream::new(rx)
}

fn check_id(order_id: &str) -> Result<(), Status> {
    let mut violations = FieldViolations::new();
    violations.check_identifier(
        "order_id",
        order_id,
        orderflow_runtime::status::MAX_ORDER_ID_CHARS,
    );
    violations.check()
}

fn not_found(order_id: &str) -> Status {
    Status::not_found(format!("no order with id {order_id}"))
}

pub(crate) async fn read(store: &Store, order_id: &str) -> Result<Option<Order>, Status> {
    let id = order_id.to_owned();
    store
        .call(move |store| {
            store.read(|read| {
                let orders = read.open_table(ORDERS)?;
                let Some(row) = orders.get(id.as_str())? else {
                    return Ok::<_, StoreError>(None);
                };
                let mut order: Order = decode_record(ORDERS_NAME, &id, row.value())?;
                progress::compose(read, &mut order)?;
                Ok(Some(order))
            })
        })
        .await
}
