//! An invoice-stage event as the notifier reads it: how an order ended, and no more.
//!
//! The invoice stage's `InvoiceCreated` carries the whole invoice, every line priced, which the
//! customer's message does not show; decoding it, copying it into the delivery task and dropping it
//! again was about a fifth of the notifier's work per notification while catching up. This view
//! has the same field numbers as `Event` but only the fields the notifier reads (with the views of
//! `orderflow_proto::views`); protobuf skips the rest without allocating. Every event of another kind (none in that log today) decodes with no
//! `how`, and ends nothing.

use std::collections::HashMap;

use orderflow_proto::{
    v1::{Event, OrderRejected},
    views::{InvoiceCreatedView, PaymentFailedView},
};

/// An `Event` of the invoice stage's log, as far as a notification needs it.
#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct Ending {
    #[prost(string, tag = "1")]
    pub order_id: String,
    #[prost(string, tag = "2")]
    pub customer_id: String,
    #[prost(message, optional, tag = "3")]
    pub at: Option<prost_types::Timestamp>,
    #[prost(message, optional, tag = "4")]
    pub placed_at: Option<prost_types::Timestamp>,
    #[prost(map = "string, string", tag = "5")]
    pub trace_context: HashMap<String, String>,
    /// `Event.kind`, for the three kinds that end an order.
    #[prost(oneof = "How", tags = "12, 13, 15")]
    pub how: Option<How>,
}

/// How the order ended: the `Event.kind` variants with the same field numbers.
#[derive(Clone, PartialEq, prost::Oneof)]
pub(crate) enum How {
    /// `OrderRejected`, whole: the message gives every line's reason.
    #[prost(message, tag = "12")]
    Rejected(OrderRejected),
    /// `InvoiceCreated`, without the invoice's lines.
    #[prost(message, tag = "13")]
    Invoiced(InvoiceCreatedView),
    /// `PaymentFailed`, without the lines the stock stage gives back.
    #[prost(message, tag = "15")]
    PaymentFailed(PaymentFailedView),
}

impl Ending {
    /// The event without how the order ended or its trace context: what the notifier's own
    /// events follow up on (order, customer, times), kept with a delivery until it is settled.
    /// The delivery carries its trace context itself: that of the span that scheduled it.
    pub(crate) fn header(&self) -> Event {
        Event {
            order_id: self.order_id.clone(),
            customer_id: self.customer_id.clone(),
            at: self.at,
            placed_at: self.placed_at,
            trace_context: HashMap::new(),
            kind: None,
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use orderflow_proto::{
        v1::{
            Invoice, InvoiceCreated, InvoiceLine, LineRejection, PaymentFailed,
            PaymentFailureReason, ReservedLine, StockReserved, event::Kind,
        },
        views::InvoiceView,
    };
    use prost::Message;

    use super::*;

    fn event(kind: Kind) -> Event {
        Event {
            order_id: "o-1".into(),
            customer_id: "alice".into(),
            at: Some(prost_types::Timestamp {
                seconds: 1_796_000_001,
                nanos: 5,
            }),
            placed_at: Some(prost_types::Timestamp {
                seconds: 1_796_000_000,
                nanos: 7,
            }),
            trace_context: HashMap::from([("traceparent".to_owned(), "00-ab-cd-01".to_owned())]),
            kind: Some(kind),
        }
    }

    fn read(event: &Event) -> Ending {
        Ending::decode(event.encode_to_vec().as_slice()).unwrap()
    }

    #[test]
    fn an_invoice_is_read_without_its_lines() {
        let invoiced = event(Kind::InvoiceCreated(InvoiceCreated {
            invoice: Some(Invoice {
                number: 12,
                lines: vec![InvoiceLine::default(); 3],
                ..Default::default()
            }),
        }));
        let ending = read(&invoiced);
        assert!(matches!(
            ending.how,
            Some(How::Invoiced(InvoiceCreatedView {
                invoice: Some(InvoiceView { number: 12, .. })
            }))
        ));
        // The header is the event without its kind, whatever the kind was, and without its
        // trace context, which the delivery carries itself.
        assert_eq!(
            ending.header(),
            Event {
                kind: None,
                trace_context: HashMap::new(),
                ..invoiced
            }
        );
    }

    #[test]
    fn a_rejection_keeps_its_lines_and_a_failed_payment_its_reason() {
        let line = LineRejection {
            sku: "LAMP".into(),
            requested: 3,
            available: 2,
            ..Default::default()
        };
        let rejected = OrderRejected { lines: vec![line] };
        assert_eq!(
            read(&event(Kind::OrderRejected(rejected.clone()))).how,
            Some(How::Rejected(rejected))
        );
        let failed = event(Kind::PaymentFailed(PaymentFailed {
            reason: PaymentFailureReason::Declined.into(),
            attempts: 1,
            lines: vec![ReservedLine::default()],
            ..Default::default()
        }));
        let Some(How::PaymentFailed(failed)) = read(&failed).how else {
            panic!("a failed payment read as something else");
        };
        assert_eq!(failed.reason(), PaymentFailureReason::Declined);
    }

    #[test]
    fn an_event_of_another_kind_ends_nothing() {
        let reserved = read(&event(Kind::StockReserved(StockReserved::default())));
        assert_eq!(reserved.how, None);
        assert_eq!(reserved.order_id, "o-1");
    }
}
