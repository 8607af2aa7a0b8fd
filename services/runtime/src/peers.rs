//! The other replicas of a stage (`--peers`): where a call about a partition (or a stock shard)
//! this replica does not own goes.
//!
//! A forwarded call says so in its metadata ([`FORWARDED`]) and carries the caller's trace context.
//! A replica never forwards a forwarded call again: if it does not own the partition either, the
//! replicas disagree about who owns what (a `--peers` list out of replica order, a replica started
//! with another `--replicas`), and it answers `FAILED_PRECONDITION` saying so ([`forward_to`]).

use std::collections::BTreeMap;

use futures::{FutureExt, future::BoxFuture};
use tonic::{
    Request, Response, Status,
    metadata::{MetadataKey, MetadataMap, MetadataValue},
    transport::Channel,
};

use crate::{
    config::Link,
    paging::{self, NumericPage, PagedList, PartitionedPage},
    store::Store,
    telemetry,
};

/// Metadata of a call one replica forwards to another; its value is the forwarding replica.
pub const FORWARDED: &str = "orderflow-forwarded-by";

/// A stage's replicas, in replica order, each behind one lazily connected channel.
pub struct Peers {
    channels: Vec<Channel>,
    /// Their URLs, for messages.
    urls: Vec<String>,
    /// This replica.
    me: u32,
}

impl Peers {
    /// The `replicas` replicas `link` names; this one is replica `me`.
    pub fn new(link: &Link, replicas: u32, me: u32) -> Result<Peers, String> {
        let mut channels = Vec::with_capacity(replicas as usize);
        let mut urls = Vec::with_capacity(replicas as usize);
        for replica in 0..replicas {
            channels.push(link.endpoint(replica)?.connect_lazy());
            urls.push(link.url.replica(replica).unwrap_or_default());
        }
        Ok(Peers { channels, urls, me })
    }

    /// How many replicas there are.
    pub fn replicas(&self) -> u32 {
        u32::try_from(self.channels.len())
            .unwrap_or(u32::MAX)
            .max(1)
    }

    /// This replica's index.
    pub fn me(&self) -> u32 {
        self.me
    }

    /// The replica that owns `partition` (partition mod replicas) and a channel to it.
    pub fn owner(&self, partition: u32) -> Result<(u32, Channel), Status> {
        let replica = partition % self.replicas();
        let channel = self.channel(replica).ok_or_else(|| {
            Status::failed_precondition(format!(
                "--peers names no replica {replica}, which owns partition {partition}"
            ))
        })?;
        Ok((replica, channel))
    }

    /// A channel to `replica`.
    pub fn channel(&self, replica: u32) -> Option<Channel> {
        self.channels.get(replica as usize).cloned()
    }

    /// The URL of `replica`, for messages.
    pub fn url(&self, replica: u32) -> &str {
        self.urls.get(replica as usize).map_or("", String::as_str)
    }

    /// `message` as a call forwarded by this replica, in the current span's trace, with the
    /// caller's `authorization` (an admin call stays one).
    pub fn forwarded<T>(&self, message: T, caller: Option<&MetadataMap>) -> Request<T> {
        let mut request = Request::new(message);
        *request.metadata_mut() = self.forwarded_metadata(caller);
        request
    }

    /// The metadata of a call forwarded by this replica ([`Peers::forwarded`]).
    pub fn forwarded_metadata(&self, caller: Option<&MetadataMap>) -> MetadataMap {
        let mut metadata = MetadataMap::new();
        if let Some(token) = caller.and_then(|m| m.get("authorization")) {
            metadata.insert("authorization", token.clone());
        }
        metadata.insert(FORWARDED, MetadataValue::from(self.me));
        for (key, value) in telemetry::current_context() {
            if let (Ok(key), Ok(value)) = (
                MetadataKey::from_bytes(key.as_bytes()),
                MetadataValue::try_from(value.as_str()),
            ) {
                metadata.insert(key, value);
            }
        }
        metadata
    }
}

impl crate::config::ServerArgs {
    /// This stage's replicas (`--peers`), checked against `--replicas`; `None` with one replica
    /// and no `--peers`.
    pub fn peer_replicas(&self) -> Result<Option<Peers>, String> {
        self.peers()?
            .map(|link| Peers::new(&link, self.replicas, self.replica_index()))
            .transpose()
    }
}

/// The replica that forwarded a call with `metadata` here, if another replica did.
pub fn forwarded_by(metadata: &MetadataMap) -> Option<String> {
    metadata
        .get(FORWARDED)
        .map(|value| value.to_str().unwrap_or("?").to_owned())
}

/// The replicas to forward a call for `partition`, which this replica does not own; refused if
/// the call was forwarded here already (`forwarded_by`) or there are no peers.
pub fn forward_to<'a, P>(
    peers: Option<&'a P>,
    partition: u32,
    forwarded_by: Option<&str>,
) -> Result<&'a P, Status> {
    match (peers, forwarded_by) {
        (Some(peers), None) => Ok(peers),
        (_, from) => Err(misrouted(partition, from.unwrap_or("(none)"))),
    }
}

/// `status` from a call to `replica` of `stage` (at `url`) about `what`, saying which replica did not
/// answer when it did not.
fn unavailable(stage: &str, replica: u32, url: &str, what: &str, status: Status) -> Status {
    if status.code() != tonic::Code::Unavailable || !status.details().is_empty() {
        return status;
    }
    Status::unavailable(format!(
        "replica {replica} of the {stage} stage ({url}), which owns {what}, is unavailable: {}",
        status.message()
    ))
}

/// Refuses a call another replica forwarded for a partition this one does not own either.
fn misrouted(partition: u32, from: &str) -> Status {
    Status::failed_precondition(format!(
        "replica {from} forwarded this call for partition {partition}, which this replica does not \
         own either: the replicas disagree about who owns what (check that --peers lists every \
         replica in replica order and that all run with the same --replicas and --partitions)"
    ))
}

/// The partitions of a stage as one replica sees them: the stores of those it owns, and the
/// replicas that own the rest (none when this replica owns every partition).
pub struct Partitions {
    stores: BTreeMap<u32, Store>,
    /// One of them, to answer a request that fails validation wherever it would go.
    first: Store,
    count: u32,
    peers: Option<Peers>,
}

/// Where a call about one partition is answered.
pub enum Owner<'a> {
    Here(&'a Store),
    /// At replica `replica`, through `channel`.
    Replica {
        peers: &'a Peers,
        replica: u32,
        channel: Channel,
    },
}

impl Partitions {
    /// `first` is this replica's first store, `stores` all of them; `peers`, the stage's replicas
    /// when it runs several.
    pub fn new(first: &Store, stores: &[Store], peers: Option<Peers>) -> Self {
        Partitions {
            stores: stores
                .iter()
                .map(|store| (store.partition().index, store.clone()))
                .collect(),
            first: first.clone(),
            count: first.partition().count,
            peers,
        }
    }

    /// How many partitions the stage has.
    pub fn count(&self) -> u32 {
        self.count
    }

    /// This replica's first store: where a request that fails validation is answered.
    pub fn first(&self) -> &Store {
        &self.first
    }

    /// The store of `partition`, if this replica owns it.
    pub fn local(&self, partition: u32) -> Option<&Store> {
        self.stores.get(&partition)
    }

    /// The stage's replicas, when it runs several.
    pub fn peers(&self) -> Option<&Peers> {
        self.peers.as_ref()
    }

    /// Where a call about `partition` is answered; `forwarded_by`: the replica that forwarded
    /// this call here, if one did ([`forward_to`]).
    pub fn owner(&self, partition: u32, forwarded_by: Option<&str>) -> Result<Owner<'_>, Status> {
        if let Some(store) = self.stores.get(&partition) {
            return Ok(Owner::Here(store));
        }
        let peers = forward_to(self.peers.as_ref(), partition, forwarded_by)?;
        let (replica, channel) = peers.owner(partition)?;
        Ok(Owner::Replica {
            peers,
            replica,
            channel,
        })
    }

    /// One page of the list `request` asks for, over every partition ([`paging::gather`]):
    /// `local` reads a partition this replica owns; `call` makes the same RPC, forwarded, at the
    /// replica that owns another one, which answers from that partition alone (with a token
    /// within it, or none). A call forwarded here is answered from its page's partition alone.
    pub async fn gather<L: PagedList>(
        &self,
        stage: &'static str,
        request: &L,
        forwarded_by: Option<&str>,
        local: impl Fn(
            Store,
            NumericPage,
        ) -> BoxFuture<'static, Result<(Vec<L::Row>, Option<u64>), Status>>,
        call: impl Fn(Channel, Request<L>) -> BoxFuture<'static, Result<Response<L::Response>, Status>>,
    ) -> Result<L::Response, Status> {
        let count = self.count;
        let page = PartitionedPage::parse(request.page_size(), request.page_token(), count)?;
        let end = if forwarded_by.is_some() {
            page.partition.saturating_add(1)
        } else {
            count
        };
        let (rows, next_page_token) =
            paging::gather(page, count, end, |partition, within: NumericPage| {
                let (peers, replica, channel) = match self.owner(partition, forwarded_by) {
                    Err(status) => return futures::future::ready(Err(status)).boxed(),
                    Ok(Owner::Here(store)) => return local(store.clone(), within),
                    Ok(Owner::Replica {
                        peers,
                        replica,
                        channel,
                    }) => (peers, replica, channel),
                };
                let size = u32::try_from(within.size).unwrap_or(paging::MAX_PAGE_SIZE);
                let token = paging::partitioned_token(count, partition, within.start);
                let asked = call(channel, peers.forwarded(request.at(size, token), None));
                let url = peers.url(replica).to_owned();
                async move {
                    let (rows, next) = asked
                        .await
                        .map(|response| L::rows(response.into_inner()))
                        .map_err(|status| {
                        unavailable(
                            stage,
                            replica,
                            &url,
                            &format!("partition {partition}"),
                            status,
                        )
                    })?;
                    if next.is_empty() {
                        return Ok((rows, None));
                    }
                    let next = PartitionedPage::parse(0, &next, count).map_err(|_| {
                        Status::internal(format!(
                            "replica {replica} of the {stage} stage answered a page token {next:?} \
                         this replica cannot read (do all run the same release?)"
                        ))
                    })?;
                    Ok((rows, Some(next.start)))
                }
                .boxed()
            })
            .await?;
        Ok(L::response(rows, next_page_token))
    }

    /// Every other replica with a channel to it, unless this call was forwarded here (it then
    /// answers for itself alone).
    pub fn others(&self, forwarded: bool) -> Vec<(&Peers, u32, Channel)> {
        let Some(peers) = self.peers.as_ref().filter(|_| !forwarded) else {
            return Vec::new();
        };
        (0..peers.replicas())
            .filter(|replica| *replica != peers.me())
            .filter_map(|replica| Some((peers, replica, peers.channel(replica)?)))
            .collect()
    }
}

impl Peers {
    /// `status` from a call forwarded to `replica` of `stage` about `what` ("partition 3"), saying
    /// which replica did not answer when it did not.
    pub fn failed(&self, stage: &str, replica: u32, what: &str, status: Status) -> Status {
        unavailable(stage, replica, self.url(replica), what, status)
    }
}
