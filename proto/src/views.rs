//! Partial views of `orderflow.v1` messages, for stages that read an event without needing all of
//! it: the same field numbers, only the fields a reader uses. Protobuf skips the rest unread, so an
//! invoice's priced lines, say, are neither decoded, copied nor dropped by a stage that shows only
//! its totals. Each view decodes any encoding of the message it mirrors.

use crate::v1::{Money, PaymentFailureReason};

/// `InvoiceCreated`: the invoice as [`InvoiceView`].
#[derive(Clone, PartialEq, prost::Message)]
pub struct InvoiceCreatedView {
    #[prost(message, optional, tag = "1")]
    pub invoice: Option<InvoiceView>,
}

/// `Invoice`: its number, amounts and payment attempts (not its lines, parties or dates).
#[derive(Clone, PartialEq, prost::Message)]
pub struct InvoiceView {
    #[prost(uint64, tag = "1")]
    pub number: u64,
    #[prost(message, optional, tag = "7")]
    pub tax: Option<Money>,
    #[prost(message, optional, tag = "8")]
    pub total: Option<Money>,
    #[prost(message, optional, tag = "10")]
    pub payment: Option<PaymentView>,
    #[prost(uint32, tag = "11")]
    pub partition: u32,
}

/// `Payment`: how many attempts it took.
#[derive(Clone, PartialEq, prost::Message)]
pub struct PaymentView {
    #[prost(uint32, tag = "2")]
    pub attempts: u32,
}

/// `PaymentFailed`: why, after how many attempts (not the lines or the amount).
#[derive(Clone, PartialEq, prost::Message)]
pub struct PaymentFailedView {
    #[prost(enumeration = "PaymentFailureReason", tag = "1")]
    pub reason: i32,
    #[prost(uint32, tag = "2")]
    pub attempts: u32,
    #[prost(string, tag = "3")]
    pub last_error: String,
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use prost::Message;

    use super::*;
    use crate::v1::{Invoice, InvoiceCreated, InvoiceLine, Payment, PaymentFailed, ReservedLine};

    #[test]
    fn a_view_reads_its_fields_of_the_whole_message() {
        let created = InvoiceCreated {
            invoice: Some(Invoice {
                number: 12,
                order_id: "o-1".into(),
                lines: vec![InvoiceLine {
                    sku: "LAMP".into(),
                    ..Default::default()
                }],
                subtotal: Some(Money::new(4575, "EUR")),
                tax: Some(Money::new(915, "EUR")),
                total: Some(Money::new(5490, "EUR")),
                payment: Some(Payment {
                    capture_id: "cap-1".into(),
                    attempts: 2,
                    ..Default::default()
                }),
                partition: 3,
                ..Default::default()
            }),
        };
        let view = InvoiceCreatedView::decode(created.encode_to_vec().as_slice()).unwrap();
        assert_eq!(
            view.invoice,
            Some(InvoiceView {
                number: 12,
                tax: Some(Money::new(915, "EUR")),
                total: Some(Money::new(5490, "EUR")),
                payment: Some(PaymentView { attempts: 2 }),
                partition: 3,
            })
        );
        let failed = PaymentFailed {
            reason: PaymentFailureReason::Declined.into(),
            attempts: 1,
            last_error: "card declined".into(),
            amount: Some(Money::new(5490, "EUR")),
            lines: vec![ReservedLine::default()],
        };
        let view = PaymentFailedView::decode(failed.encode_to_vec().as_slice()).unwrap();
        assert_eq!(view.reason(), PaymentFailureReason::Declined);
        assert_eq!(
            (view.attempts, view.last_error.as_str()),
            (1, "card declined")
        );
    }
}
