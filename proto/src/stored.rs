//! `EventLog` as stages serve and consume it: `Subscribe` sends each outbox entry's event exactly as
//! the outbox stores it (already encoded) instead of decoding it only to encode it again, and a
//! downstream stage decodes each event itself, into only as much of it as the stage reads.
//!
//! [`StoredEventBatch`] is the same message as [`v1::EventBatch`](crate::v1::EventBatch) on the
//! wire: an embedded message and a `bytes` field are both length-delimited, so a field `bytes event
//! = 2` holding an encoded `Event` is byte for byte what `Event event = 2` would be. Other clients
//! (the CLI, tests) and reflection keep the generated `EventBatch`.

/// [`v1::EventBatch`](crate::v1::EventBatch) with its events already encoded.
#[derive(Clone, PartialEq, prost::Message)]
pub struct StoredEventBatch {
    #[prost(message, repeated, tag = "1")]
    pub entries: Vec<StoredLogEntry>,
    /// The log's next offset when this batch was read.
    #[prost(uint64, tag = "2")]
    pub head: u64,
    /// Where the next batch starts (one past the last entry read for this one, sent or filtered
    /// out).
    #[prost(uint64, tag = "3")]
    pub next_offset: u64,
}

/// [`v1::LogEntry`](crate::v1::LogEntry) with its event already encoded.
#[derive(Clone, PartialEq, prost::Message)]
pub struct StoredLogEntry {
    #[prost(uint64, tag = "1")]
    pub offset: u64,
    /// An encoded [`v1::Event`](crate::v1::Event), as the outbox stores it. A `Vec` of its own
    /// rather than a slice of the receive buffer: a subscriber holding a batch's events must not
    /// keep the whole buffer it came in alive (that raised a stage's peak RSS under load by ~10 MiB).
    #[prost(bytes = "vec", tag = "2")]
    pub event: Vec<u8>,
}

impl StoredLogEntry {
    /// The event, decoded.
    pub fn decode_event(&self) -> Result<crate::v1::Event, prost::DecodeError> {
        <crate::v1::Event as prost::Message>::decode(self.event.as_ref())
    }
}

/// The server and client of `orderflow.v1.EventLog` (same service name and routes as the generated
/// ones in [`v1`](crate::v1)), with `Subscribe` answering [`StoredEventBatch`].
#[allow(clippy::all, clippy::pedantic, missing_docs)]
mod generated {
    include!(concat!(env!("OUT_DIR"), "/orderflow.v1.EventLog.rs"));
}
pub use generated::{event_log_client, event_log_server};

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use prost::Message;

    use super::*;
    use crate::v1::{Event, EventBatch, LogEntry, OrderPlaced, event::Kind};

    fn event(order_id: &str) -> Event {
        Event {
            order_id: order_id.into(),
            customer_id: "c-1".into(),
            trace_context: [("traceparent".to_owned(), "00-ab-cd-01".to_owned())].into(),
            kind: Some(Kind::OrderPlaced(OrderPlaced::default())),
            ..Default::default()
        }
    }

    #[test]
    fn a_stored_batch_is_an_event_batch_on_the_wire() {
        let generated = EventBatch {
            entries: [event("o-1"), event("o-2")]
                .into_iter()
                .enumerate()
                .map(|(i, e)| LogEntry {
                    // Offset 0 is left out on the wire by both.
                    offset: i as u64,
                    event: Some(e),
                })
                .collect(),
            head: 7,
            next_offset: 2,
        };
        let stored = StoredEventBatch {
            entries: generated
                .entries
                .iter()
                .map(|e| StoredLogEntry {
                    offset: e.offset,
                    event: e.event.as_ref().unwrap().encode_to_vec(),
                })
                .collect(),
            head: generated.head,
            next_offset: generated.next_offset,
        };
        assert_eq!(stored.encode_to_vec(), generated.encode_to_vec());
        assert_eq!(
            EventBatch::decode(stored.encode_to_vec().as_slice()).unwrap(),
            generated
        );
        assert_eq!(stored.entries[1].decode_event().unwrap(), event("o-2"));
    }
}
