//! Which entries of a log a subscriber is sent ([`EventFilter`], from `SubscribeRequest.filter`).
//!
//! The log serves entries as stored, so the filter reads each encoded event no further than its
//! kind (the field number of `Event.kind`), and for the stock shards' holds the shard they are
//! addressed to: protobuf skips everything else without allocating.

use orderflow_proto::v1::EntryFilter;

use crate::{status::FieldViolations, subscription::Skipped};

/// The kinds of `Event.kind`, by field name and number (eventlog.proto).
const KINDS: [(&str, u32); 11] = [
    ("order_placed", 10),
    ("stock_reserved", 11),
    ("order_rejected", 12),
    ("invoice_created", 13),
    ("customer_notified", 14),
    ("payment_failed", 15),
    ("stock_released", 16),
    ("notification_dead_lettered", 17),
    ("hold_requested", 18),
    ("hold_answered", 19),
    ("hold_released", 20),
];

/// What a subscription keeps of a log: the kinds it names (all, if none), and of the holds between
/// stock shards only those addressed to one shard.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EventFilter {
    /// Bit `n` set: the kind with field number `n` is kept. 0: every kind.
    kinds: u32,
    addressed_to: Option<u32>,
}

impl EventFilter {
    /// Only events of these kinds (field names of `Event.kind`); every kind if `kinds` is empty.
    ///
    /// # Panics
    /// On a name that is not a kind: the names a stage filters on are constants of its own.
    pub fn kinds(kinds: &[&str]) -> Self {
        let mut filter = Self::default();
        for name in kinds {
            match kind_number(name) {
                Some(number) => filter.kinds |= 1 << number,
                None => panic!("{name} is not a kind of Event.kind"),
            }
        }
        filter
    }

    /// Of the holds between stock shards, only those addressed to `shard`.
    pub fn addressed_to(mut self, shard: u32) -> Self {
        self.addressed_to = Some(shard);
        self
    }

    /// The filter a request asks for (`None`: every entry), or the violations of its fields, named
    /// under `field`, for a pipeline of `partitions` partitions (its shards).
    pub fn from_request(
        request: Option<&EntryFilter>,
        field: &str,
        partitions: u32,
        violations: &mut FieldViolations,
    ) -> Option<Self> {
        let request = request?;
        let mut filter = Self {
            kinds: 0,
            addressed_to: request.addressed_to,
        };
        if request
            .addressed_to
            .is_some_and(|shard| shard >= partitions)
        {
            violations.add(
                format!("{field}.addressed_to"),
                format!(
                    "the pipeline has {partitions} partitions (shards 0 to {})",
                    partitions.saturating_sub(1)
                ),
            );
        }
        for (i, name) in request.kinds.iter().enumerate() {
            match kind_number(name) {
                Some(number) => filter.kinds |= 1 << number,
                None => violations.add(
                    format!("{field}.kinds[{i}]"),
                    format!(
                        "not a kind of event; the kinds are {}",
                        KINDS.map(|(name, _)| name).join(", ")
                    ),
                ),
            }
        }
        Some(filter)
    }

    /// The request field that asks for this filter.
    pub fn to_request(self) -> EntryFilter {
        EntryFilter {
            kinds: KINDS
                .iter()
                .filter(|(_, number)| self.kinds & (1 << number) != 0)
                .map(|(name, _)| (*name).to_owned())
                .collect(),
            addressed_to: self.addressed_to,
        }
    }

    /// Whether the encoded event `bytes` passes. One that cannot be read this far passes: its
    /// reader reports it as it would unfiltered.
    pub fn keeps(&self, bytes: &[u8]) -> bool {
        let Ok(probe) = <Probe as prost::Message>::decode(bytes) else {
            return true;
        };
        let Some(kind) = probe.kind else {
            return self.kinds == 0;
        };
        if self.kinds != 0 && self.kinds & (1 << kind.number()) == 0 {
            return false;
        }
        match (self.addressed_to, kind.addressee()) {
            (Some(shard), Some(addressee)) => shard == addressee,
            _ => true,
        }
    }
}

fn kind_number(name: &str) -> Option<u32> {
    KINDS
        .iter()
        .find(|(kind, _)| *kind == name)
        .map(|(_, number)| *number)
}

/// Just enough of an `Event` to filter it: its kind, and whom a hold is addressed to.
#[derive(Clone, PartialEq, prost::Message)]
struct Probe {
    #[prost(
        oneof = "ProbeKind",
        tags = "10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20"
    )]
    kind: Option<ProbeKind>,
}

#[derive(Clone, PartialEq, prost::Oneof)]
enum ProbeKind {
    #[prost(message, tag = "10")]
    OrderPlaced(Skipped),
    #[prost(message, tag = "11")]
    StockReserved(Skipped),
    #[prost(message, tag = "12")]
    OrderRejected(Skipped),
    #[prost(message, tag = "13")]
    InvoiceCreated(Skipped),
    #[prost(message, tag = "14")]
    CustomerNotified(Skipped),
    #[prost(message, tag = "15")]
    PaymentFailed(Skipped),
    #[prost(message, tag = "16")]
    StockReleased(Skipped),
    #[prost(message, tag = "17")]
    NotificationDeadLettered(Skipped),
    /// `HoldRequested.shard`.
    #[prost(message, tag = "18")]
    HoldRequested(ToShard),
    /// `HoldAnswered.home`.
    #[prost(message, tag = "19")]
    HoldAnswered(ToHome),
    /// `HoldReleased.shard`.
    #[prost(message, tag = "20")]
    HoldReleased(ToShard),
}

/// The shard a `HoldRequested` or `HoldReleased` is for (field 1 of both).
#[derive(Clone, Copy, PartialEq, prost::Message)]
struct ToShard {
    #[prost(uint32, tag = "1")]
    shard: u32,
}

/// The home shard a `HoldAnswered` goes back to (its field 2).
#[derive(Clone, Copy, PartialEq, prost::Message)]
struct ToHome {
    #[prost(uint32, tag = "2")]
    home: u32,
}

impl ProbeKind {
    fn number(&self) -> u32 {
        match self {
            ProbeKind::OrderPlaced(_) => 10,
            ProbeKind::StockReserved(_) => 11,
            ProbeKind::OrderRejected(_) => 12,
            ProbeKind::InvoiceCreated(_) => 13,
            ProbeKind::CustomerNotified(_) => 14,
            ProbeKind::PaymentFailed(_) => 15,
            ProbeKind::StockReleased(_) => 16,
            ProbeKind::NotificationDeadLettered(_) => 17,
            ProbeKind::HoldRequested(_) => 18,
            ProbeKind::HoldAnswered(_) => 19,
            ProbeKind::HoldReleased(_) => 20,
        }
    }

    /// The shard a hold is addressed to; `None` for every other kind.
    fn addressee(&self) -> Option<u32> {
        match self {
            ProbeKind::HoldRequested(to) | ProbeKind::HoldReleased(to) => Some(to.shard),
            ProbeKind::HoldAnswered(to) => Some(to.home),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use orderflow_proto::v1::{
        CustomerNotified, Event, HoldAnswered, HoldReleased, HoldRequested, InvoiceCreated,
        NotificationDeadLettered, OrderPlaced, OrderRejected, PaymentFailed, StockReleased,
        StockReserved, event::Kind,
    };
    use prost::Message;

    use super::*;

    /// One event of every kind, with the name its field has in `Event.kind`.
    fn every_kind() -> Vec<(&'static str, Event)> {
        let kinds = [
            ("order_placed", Kind::OrderPlaced(OrderPlaced::default())),
            (
                "stock_reserved",
                Kind::StockReserved(StockReserved::default()),
            ),
            (
                "order_rejected",
                Kind::OrderRejected(OrderRejected::default()),
            ),
            (
                "invoice_created",
                Kind::InvoiceCreated(InvoiceCreated::default()),
            ),
            (
                "customer_notified",
                Kind::CustomerNotified(CustomerNotified::default()),
            ),
            (
                "payment_failed",
                Kind::PaymentFailed(PaymentFailed::default()),
            ),
            (
                "stock_released",
                Kind::StockReleased(StockReleased::default()),
            ),
            (
                "notification_dead_lettered",
                Kind::NotificationDeadLettered(NotificationDeadLettered::default()),
            ),
            (
                "hold_requested",
                Kind::HoldRequested(HoldRequested {
                    shard: 2,
                    home: 1,
                    ..Default::default()
                }),
            ),
            (
                "hold_answered",
                Kind::HoldAnswered(HoldAnswered {
                    shard: 1,
                    home: 2,
                    ..Default::default()
                }),
            ),
            (
                "hold_released",
                Kind::HoldReleased(HoldReleased {
                    shard: 2,
                    ..Default::default()
                }),
            ),
        ];
        kinds
            .into_iter()
            .map(|(name, kind)| {
                let event = Event {
                    order_id: "p0-o-1".into(),
                    customer_id: "c-1".into(),
                    trace_context: [("traceparent".to_owned(), "00-ab-cd-01".to_owned())].into(),
                    kind: Some(kind),
                    ..Default::default()
                };
                (name, event)
            })
            .collect()
    }

    #[test]
    fn each_name_keeps_its_own_kind_and_only_it() {
        let events = every_kind();
        assert_eq!(events.len(), KINDS.len());
        for (name, _) in &events {
            let filter = EventFilter::kinds(&[name]);
            for (other, event) in &events {
                assert_eq!(
                    filter.keeps(&event.encode_to_vec()),
                    name == other,
                    "{name} against {other}"
                );
            }
        }
        // No kinds named: every kind, and an event with none.
        let all = EventFilter::default();
        assert!(events.iter().all(|(_, e)| all.keeps(&e.encode_to_vec())));
        assert!(all.keeps(&Event::default().encode_to_vec()));
        assert!(!EventFilter::kinds(&["order_placed"]).keeps(&Event::default().encode_to_vec()));
    }

    #[test]
    fn holds_reach_only_the_shard_they_are_addressed_to() {
        let holds = EventFilter::kinds(&["hold_requested", "hold_answered", "hold_released"]);
        let kept = |filter: EventFilter| -> Vec<&str> {
            every_kind()
                .into_iter()
                .filter(|(_, event)| filter.keeps(&event.encode_to_vec()))
                .map(|(name, _)| name)
                .collect()
        };
        // Every hold above is addressed to shard 2.
        assert_eq!(
            kept(holds.addressed_to(2)),
            ["hold_requested", "hold_answered", "hold_released"]
        );
        assert!(kept(holds.addressed_to(1)).is_empty());
        // Other kinds are not addressed: the address leaves them as they are.
        assert_eq!(kept(EventFilter::default().addressed_to(1)).len(), 8);
    }

    #[test]
    fn a_request_names_kinds_and_a_shard_and_every_bad_one_is_a_violation() {
        let mut violations = FieldViolations::new();
        assert_eq!(
            EventFilter::from_request(None, "filter", 4, &mut violations),
            None
        );
        let asked = EventFilter::kinds(&["stock_reserved", "order_rejected"]).addressed_to(3);
        let request = asked.to_request();
        assert_eq!(request.kinds, ["stock_reserved", "order_rejected"]);
        assert_eq!(
            EventFilter::from_request(Some(&request), "filter", 4, &mut violations),
            Some(asked)
        );
        assert!(violations.check().is_ok());

        let mut violations = FieldViolations::new();
        let bad = EntryFilter {
            kinds: vec!["stock_reserved".into(), "StockReserved".into()],
            addressed_to: Some(4),
        };
        EventFilter::from_request(Some(&bad), "filter", 4, &mut violations);
        let status = violations.check().unwrap_err();
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        assert!(status.message().contains("filter.kinds[1]"), "{status:?}");
        assert!(
            status.message().contains("filter.addressed_to"),
            "{status:?}"
        );
    }

    #[test]
    fn an_event_that_cannot_be_read_passes_for_its_reader_to_report() {
        assert!(EventFilter::kinds(&["order_placed"]).keeps(&[0xff, 0xff]));
    }
}
