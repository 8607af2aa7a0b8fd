//! The other replicas of a stage (`--peers`): where a call about a partition (or a stock shard)
//! this replica does not own goes.
//!
//! A forwarded call says so in its metadata ([`FORWARDED`]) and carries the caller's trace context.
//! A replica never forwards a forwarded call again: if it does not own the partition either, the
//! replicas disagree about who owns what (a `--peers` list out of replica order, a replica started
//! with another `--replicas`), and it answers `FAILED_PRECONDITION` saying so ([`forward_to`]).

use tonic::{
    Request, Status,
    metadata::{MetadataKey, MetadataMap, MetadataValue},
    transport::Channel,
};

use crate::{config::Link, telemetry};

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
        let metadata = request.metadata_mut();
        if let Some(token) = caller.and_then(|m| m.get("authorization")) {
            metadata.insert("authorization", token.clone());
        }
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

/// Refuses a call another replica forwarded for a partition this one does not own either.
fn misrouted(partition: u32, from: &str) -> Status {
    Status::failed_precondition(format!(
        "replica {from} forwarded this call for partition {partition}, which this replica does not \
         own either: the replicas disagree about who owns what (check that --peers lists every \
         replica in replica order and that all run with the same --replicas and --partitions)"
    ))
}
