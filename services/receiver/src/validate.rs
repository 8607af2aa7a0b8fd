//! What a well-formed order is. Every rule that fails becomes one field violation, so a client learns
//! everything wrong with a request in one round trip.

use std::collections::HashMap;

use orderflow_proto::v1::PlaceOrderRequest;
use orderflow_runtime::FieldViolations;

/// Longest customer id, in characters.
pub const MAX_CUSTOMER_ID: usize = 128;
/// Lines per order at most.
pub const MAX_LINES: usize = 100;
/// Units per line at most.
pub const MAX_QUANTITY: u32 = 10_000;
/// Longest sku, in characters.
pub const MAX_SKU_CHARS: usize = 64;
/// Longest idempotency key, in characters (visible ASCII only).
pub const MAX_IDEMPOTENCY_KEY: usize = 128;

/// Checks `request` against every rule; `Err` is INVALID_ARGUMENT naming each bad field.
pub fn validate(request: &PlaceOrderRequest) -> Result<(), tonic::Status> {
    let mut violations = FieldViolations::new();
    violations.check_identifier("customer_id", &request.customer_id, MAX_CUSTOMER_ID);
    if request.lines.is_empty() || request.lines.len() > MAX_LINES {
        violations.add(
            "lines",
            format!(
                "must have 1 to {MAX_LINES} lines, got {}",
                request.lines.len()
            ),
        );
    }
    let mut seen: HashMap<&str, usize> = HashMap::new();
    for (i, line) in request.lines.iter().enumerate().take(MAX_LINES) {
        if !violations.check_identifier(format!("lines[{i}].sku"), &line.sku, MAX_SKU_CHARS) {
            // Named already.
        } else if let Some(first) = seen.insert(line.sku.as_str(), i) {
            violations.add(
                format!("lines[{i}].sku"),
                format!("repeats the sku of lines[{first}]; put the whole quantity on one line"),
            );
        }
        if line.quantity == 0 || line.quantity > MAX_QUANTITY {
            violations.add(
                format!("lines[{i}].quantity"),
                format!("must be 1 to {MAX_QUANTITY}, got {}", line.quantity),
            );
        }
    }
    let key = &request.idempotency_key;
    if key.len() > MAX_IDEMPOTENCY_KEY {
        violations.add(
            "idempotency_key",
            format!("must be at most {MAX_IDEMPOTENCY_KEY} characters"),
        );
    } else if !key.bytes().all(|b| b.is_ascii_graphic()) {
        violations.add(
            "idempotency_key",
            "may only contain visible ASCII characters",
        );
    }
    violations.check()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use orderflow_proto::v1::OrderLine;
    use tonic_types::StatusExt;

    use super::*;

    fn line(sku: &str, quantity: u32) -> OrderLine {
        OrderLine {
            sku: sku.into(),
            quantity,
        }
    }

    fn fields(request: PlaceOrderRequest) -> Vec<String> {
        match validate(&request) {
            Ok(()) => vec![],
            Err(status) => status
                .get_details_bad_request()
                .unwrap()
                .field_violations
                .into_iter()
                .map(|v| v.field)
                .collect(),
        }
    }

    #[test]
    fn rules_name_the_bad_fields() {
        let ok = || PlaceOrderRequest {
            customer_id: "alice".into(),
            lines: vec![line("A", 1), line("B", MAX_QUANTITY)],
            idempotency_key: String::new(),
        };
        let cases: Vec<(&str, PlaceOrderRequest, Vec<&str>)> = vec![
            ("valid", ok(), vec![]),
            (
                "no customer",
                PlaceOrderRequest {
                    customer_id: " ".into(),
                    ..ok()
                },
                vec!["customer_id"],
            ),
            (
                "long customer",
                PlaceOrderRequest {
                    customer_id: "c".repeat(MAX_CUSTOMER_ID + 1),
                    ..ok()
                },
                vec!["customer_id"],
            ),
            (
                "no lines",
                PlaceOrderRequest {
                    lines: vec![],
                    ..ok()
                },
                vec!["lines"],
            ),
            (
                "too many lines",
                PlaceOrderRequest {
                    lines: (0..=MAX_LINES).map(|i| line(&format!("S{i}"), 1)).collect(),
                    ..ok()
                },
                vec!["lines"],
            ),
            (
                "bad quantities and sku",
                PlaceOrderRequest {
                    lines: vec![
                        line("", 0),
                        line("B", MAX_QUANTITY + 1),
                        line(&"x".repeat(65), 1),
                    ],
                    ..ok()
                },
                vec![
                    "lines[0].sku",
                    "lines[0].quantity",
                    "lines[1].quantity",
                    "lines[2].sku",
                ],
            ),
            (
                "repeated sku",
                PlaceOrderRequest {
                    lines: vec![line("A", 1), line("B", 1), line("A", 2)],
                    ..ok()
                },
                vec!["lines[2].sku"],
            ),
            (
                "control characters in ids",
                PlaceOrderRequest {
                    customer_id: "alice\nINFO forged line".into(),
                    lines: vec![line("A\u{0}", 1), line("B\u{1b}[31m", 1)],
                    ..ok()
                },
                vec!["customer_id", "lines[0].sku", "lines[1].sku"],
            ),
            (
                "idempotency key too long",
                PlaceOrderRequest {
                    idempotency_key: "k".repeat(MAX_IDEMPOTENCY_KEY + 1),
                    ..ok()
                },
                vec!["idempotency_key"],
            ),
            (
                "idempotency key with a space",
                PlaceOrderRequest {
                    idempotency_key: "a b".into(),
                    ..ok()
                },
                vec!["idempotency_key"],
            ),
            (
                "128-character idempotency key is fine",
                PlaceOrderRequest {
                    idempotency_key: "k".repeat(MAX_IDEMPOTENCY_KEY),
                    ..ok()
                },
                vec![],
            ),
            (
                "64 multibyte characters is fine",
                PlaceOrderRequest {
                    lines: vec![line(&"é".repeat(64), 1)],
                    ..ok()
                },
                vec![],
            ),
        ];
        for (name, request, want) in cases {
            assert_eq!(fields(request), want, "{name}");
        }
    }
}
