//! Human display of [`Money`]: minor units scaled by the currency's ISO 4217 exponent.
//!
//! Arithmetic on money happens in integer minor units in the stages; this module only formats.

use std::fmt;

use crate::v1::Money;

/// Number of decimal places of an ISO 4217 currency (2 unless listed otherwise).
pub fn minor_unit_exponent(currency: &str) -> u32 {
    match currency {
        "BIF" | "CLP" | "DJF" | "GNF" | "ISK" | "JPY" | "KMF" | "KRW" | "PYG" | "RWF" | "UGX"
        | "UYI" | "VND" | "VUV" | "XAF" | "XOF" | "XPF" => 0,
        "BHD" | "IQD" | "JOD" | "KWD" | "LYD" | "OMR" | "TND" => 3,
        _ => 2,
    }
}

/// `true` for three upper-case ASCII letters, the shape of an ISO 4217 alphabetic code.
pub fn is_currency_code(code: &str) -> bool {
    code.len() == 3 && code.bytes().all(|b| b.is_ascii_uppercase())
}

impl Money {
    /// `amount_minor` of `currency`.
    pub fn new(amount_minor: i64, currency: impl Into<String>) -> Self {
        Money {
            amount_minor,
            currency: currency.into(),
        }
    }
}

impl fmt::Display for Money {
    /// `12.99 EUR`, `-0.05 USD`, `1500 JPY`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let exponent = minor_unit_exponent(&self.currency);
        let sign = if self.amount_minor < 0 { "-" } else { "" };
        let abs = self.amount_minor.unsigned_abs();
        if exponent == 0 {
            return write!(f, "{sign}{abs} {}", self.currency);
        }
        let scale = 10u64.pow(exponent);
        write!(
            f,
            "{sign}{}.{:0width$} {}",
            abs / scale,
            abs % scale,
            self.currency,
            width = exponent as usize
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn displays_in_major_units() {
        let cases = [
            (1299, "EUR", "12.99 EUR"),
            (5, "USD", "0.05 USD"),
            (-5, "USD", "-0.05 USD"),
            (1500, "JPY", "1500 JPY"),
            (1234, "KWD", "1.234 KWD"),
            (i64::MIN, "EUR", "-92233720368547758.08 EUR"),
        ];
        for (amount, currency, want) in cases {
            assert_eq!(Money::new(amount, currency).to_string(), want);
        }
    }

    #[test]
    fn recognises_currency_codes() {
        assert!(is_currency_code("EUR"));
        assert!(!is_currency_code("eur"));
        assert!(!is_currency_code("EURO"));
        assert!(!is_currency_code(""));
    }
}
