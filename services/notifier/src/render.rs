//! The words the customer reads.

use std::fmt::Write as _;

use orderflow_proto::{
    v1::{LineRejection, Money, PaymentFailureReason, RejectionReason},
    views::{InvoiceView, PaymentFailedView},
};

/// "Your order … is confirmed: invoice #12, total 54.90 EUR (incl. 9.15 EUR tax)." With several
/// partitions (`partitions`) each numbers its own invoices: "invoice INV-2-12".
///
/// Written piece by piece into one string: every notification renders one, and formatting the
/// label and the amounts into strings of their own first took about half the rendering's work.
pub(crate) fn confirmation(order_id: &str, invoice: &InvoiceView, partitions: u32) -> String {
    let mut text = String::with_capacity(96 + order_id.len());
    // Writing into a `String` cannot fail.
    let _ = write!(text, "Your order {order_id} is confirmed: invoice ");
    let _ = if partitions > 1 {
        write!(text, "INV-{}-{}", invoice.partition, invoice.number)
    } else {
        write!(text, "#{}", invoice.number)
    };
    text.push_str(", total ");
    write_amount(&mut text, invoice.total.as_ref());
    text.push_str(" (incl. ");
    write_amount(&mut text, invoice.tax.as_ref());
    text.push_str(" tax).");
    text
}

/// An amount as the customer reads it ("54.90 EUR"), or "?" when the invoice has none.
fn write_amount(text: &mut String, amount: Option<&Money>) {
    match amount {
        Some(amount) => {
            let _ = write!(text, "{amount}");
        }
        None => text.push('?'),
    }
}

/// "We could not accept your order …: LAMP-05: only 2 left (you asked for 3); …."
pub(crate) fn rejection(order_id: &str, lines: &[LineRejection]) -> String {
    let reasons: Vec<String> = lines.iter().map(reason).collect();
    format!(
        "We could not accept your order {order_id}: {}. Nothing was charged.",
        reasons.join("; ")
    )
}

/// "We could not take payment for your order …: the card was declined. …"
pub(crate) fn payment_failure(order_id: &str, failed: &PaymentFailedView) -> String {
    match failed.reason() {
        PaymentFailureReason::Declined => format!(
            "We could not take payment for your order {order_id}: your payment was declined. The items were released and nothing was charged."
        ),
        _ => format!(
            "We could not take payment for your order {order_id}: our payment provider could not be reached. The items were released; should anything have been charged, it will be refunded."
        ),
    }
}

/// One line's reason, for the customer and for the CLI.
pub fn reason(line: &LineRejection) -> String {
    match line.reason() {
        RejectionReason::UnknownSku => format!("{}: no such item", line.sku),
        RejectionReason::OutOfStock if line.available == 0 => {
            format!("{}: out of stock", line.sku)
        }
        RejectionReason::OutOfStock => format!(
            "{}: only {} left (you asked for {})",
            line.sku, line.available, line.requested
        ),
        RejectionReason::MixedCurrency => {
            format!("{}: priced in another currency than the rest", line.sku)
        }
        RejectionReason::Unspecified => format!("{}: not available", line.sku),
    }
}

#[cfg(test)]
mod tests {
    use orderflow_proto::v1::Money;

    use super::*;

    #[test]
    fn messages_read_well() {
        let invoice = InvoiceView {
            number: 12,
            total: Some(Money::new(5490, "EUR")),
            tax: Some(Money::new(915, "EUR")),
            payment: None,
            partition: 2,
        };
        assert_eq!(
            confirmation("o1", &invoice, 1),
            "Your order o1 is confirmed: invoice #12, total 54.90 EUR (incl. 9.15 EUR tax)."
        );
        assert_eq!(
            confirmation("o1-p2", &invoice, 4),
            "Your order o1-p2 is confirmed: invoice INV-2-12, total 54.90 EUR (incl. 9.15 EUR tax)."
        );
        let unpriced = InvoiceView {
            total: None,
            tax: None,
            ..invoice.clone()
        };
        assert_eq!(
            confirmation("o1", &unpriced, 1),
            "Your order o1 is confirmed: invoice #12, total ? (incl. ? tax)."
        );
        let lines = [
            LineRejection {
                sku: "LAMP".into(),
                requested: 3,
                available: 2,
                reason: RejectionReason::OutOfStock.into(),
            },
            LineRejection {
                sku: "GPU".into(),
                requested: 1,
                available: 0,
                reason: RejectionReason::OutOfStock.into(),
            },
            LineRejection {
                sku: "X".into(),
                requested: 1,
                available: 0,
                reason: RejectionReason::UnknownSku.into(),
            },
        ];
        let declined = PaymentFailedView {
            reason: PaymentFailureReason::Declined.into(),
            ..Default::default()
        };
        assert_eq!(
            payment_failure("o3", &declined),
            "We could not take payment for your order o3: your payment was declined. The items were released and nothing was charged."
        );
        assert_eq!(
            rejection("o2", &lines),
            "We could not accept your order o2: LAMP: only 2 left (you asked for 3); GPU: out of stock; X: no such item. Nothing was charged."
        );
    }
}
