//! Money arithmetic for invoices, in integer minor units only.
//!
//! Line totals and the subtotal are exact sums of `unit_price × quantity`. Tax is
//! `subtotal × rate_bps / 10000` rounded half up (away from zero) to a whole minor unit, computed in
//! `i128` so no intermediate can overflow. The stock stage bounds unit prices and the receiver bounds
//! quantities and lines, which keeps every total far inside `i64`; should a total still not fit, it
//! saturates rather than wrapping.

use orderflow_proto::v1::{InvoiceLine, Money, ReservedLine};

/// Highest tax rate: 100 %.
pub const MAX_TAX_RATE_BPS: u32 = 10_000;

/// The priced lines and totals of one invoice.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Priced {
    pub lines: Vec<InvoiceLine>,
    pub subtotal: Money,
    pub tax: Money,
    pub total: Money,
}

/// Prices `lines` (all in one currency: the stock stage rejects mixed ones) at `tax_rate_bps`.
pub(crate) fn price(lines: &[ReservedLine], tax_rate_bps: u32) -> Priced {
    let currency = lines
        .iter()
        .find_map(|l| l.unit_price.as_ref().map(|p| p.currency.clone()))
        .unwrap_or_default();
    let mut subtotal: i128 = 0;
    let priced = lines
        .iter()
        .map(|line| {
            let unit = line.unit_price.as_ref().map_or(0, |p| p.amount_minor);
            let total = i128::from(unit) * i128::from(line.quantity);
            subtotal += total;
            InvoiceLine {
                sku: line.sku.clone(),
                name: line.name.clone(),
                quantity: line.quantity,
                unit_price: Some(Money::new(unit, currency.clone())),
                line_total: Some(Money::new(saturate(total), currency.clone())),
            }
        })
        .collect();
    let tax = tax_half_up(subtotal, tax_rate_bps);
    Priced {
        lines: priced,
        subtotal: Money::new(saturate(subtotal), currency.clone()),
        tax: Money::new(saturate(tax), currency.clone()),
        total: Money::new(saturate(subtotal + tax), currency),
    }
}

/// `amount × bps / 10000`, rounded half away from zero.
fn tax_half_up(amount: i128, bps: u32) -> i128 {
    let scaled = amount * i128::from(bps);
    let (quotient, remainder) = (scaled / 10_000, scaled % 10_000);
    if remainder.abs() * 2 >= 10_000 {
        quotient + scaled.signum()
    } else {
        quotient
    }
}

fn saturate(value: i128) -> i64 {
    i64::try_from(value).unwrap_or(if value < 0 { i64::MIN } else { i64::MAX })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(sku: &str, unit: i64, quantity: u32) -> ReservedLine {
        ReservedLine {
            sku: sku.into(),
            name: sku.into(),
            quantity,
            unit_price: Some(Money::new(unit, "EUR")),
        }
    }

    #[test]
    fn totals_and_half_up_tax() {
        // (subtotal, bps, tax)
        let cases = [
            (1000, 2000, 200),
            (1, 5000, 1),     // 0.5 rounds up
            (1, 4999, 0),     // 0.4999 rounds down
            (999, 1900, 190), // 189.81
            (12345, 0, 0),
            (12345, 10_000, 12345),
        ];
        for (subtotal, bps, want) in cases {
            assert_eq!(tax_half_up(subtotal, bps), want, "{subtotal} at {bps}");
        }
        let priced = price(&[line("A", 1299, 3), line("B", 1, 1)], 2000);
        assert_eq!(priced.subtotal.amount_minor, 3898);
        assert_eq!(priced.tax.amount_minor, 780); // 779.6
        assert_eq!(priced.total.amount_minor, 4678);
        assert_eq!(
            priced.lines[0].line_total.as_ref().map(|m| m.amount_minor),
            Some(3897)
        );
        assert_eq!(priced.total.currency, "EUR");
    }

    #[test]
    fn largest_possible_order_fits() {
        let lines: Vec<_> = (0..100)
            .map(|i| line(&format!("S{i}"), 1_000_000_000_000, 10_000))
            .collect();
        let priced = price(&lines, MAX_TAX_RATE_BPS);
        assert_eq!(priced.subtotal.amount_minor, 1_000_000_000_000_000_000);
        assert_eq!(priced.total.amount_minor, 2_000_000_000_000_000_000);
    }
}
