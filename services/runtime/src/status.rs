//! Turning failures into precise gRPC statuses, and the request checks every stage shares.

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

use crate::store::{self, Store, StoreError};

/// How long a caller refused because the store cannot commit is told to wait.
pub const STORE_RETRY_AFTER: std::time::Duration = std::time::Duration::from_secs(2);

/// `google.rpc.ErrorInfo` reason of an `UNAVAILABLE` for a store that was refusing writes before
/// this request: nothing of it was stored.
pub const NOT_STORED_REASON: &str = "NOT_STORED";
/// `google.rpc.ErrorInfo` reason of an `UNAVAILABLE` for a commit that failed: it may still have
/// been stored, which a retry with the same idempotency key answers.
pub const MAYBE_STORED_REASON: &str = "MAYBE_STORED";

impl From<StoreError> for Status {
    /// Offsets outside the log are the caller's doing (`OUT_OF_RANGE`), and so are acknowledgements
    /// the log cannot take (`FAILED_PRECONDITION`). A full or failing data volume is `UNAVAILABLE`
    /// with a `google.rpc.RetryInfo`, and the stage recovers by itself. Its `google.rpc.ErrorInfo`
    /// says what became of the request: refused before it was written (`NOT_STORED`), or its own
    /// commit failed (`MAYBE_STORED`: as with any database, a commit that errs may have reached the
    /// disk all the same). Everything else is ours, logged once here with its cause and answered
    /// `INTERNAL` without details.
    fn from(e: StoreError) -> Self {
        if let Some(fault) = e.fault() {
            let maybe_stored = matches!(e, StoreError::CommitFailed(_));
            let mut details = ErrorDetails::new();
            details.set_retry_info(Some(STORE_RETRY_AFTER));
            details.set_error_info(
                if maybe_stored {
                    MAYBE_STORED_REASON
                } else {
                    NOT_STORED_REASON
                },
                "orderflow",
                [("fault".to_owned(), fault.kind.as_str().to_owned())],
            );
            let outcome = if maybe_stored {
                format!(
                    "the commit of this request failed and may still have been stored: retry in {} s \
                     with the same idempotency key, which answers what was stored",
                    STORE_RETRY_AFTER.as_secs()
                )
            } else {
                format!(
                    "nothing of this request was stored, retry in {} s",
                    STORE_RETRY_AFTER.as_secs()
                )
            };
            let message = match fault.kind {
                crate::store::FaultKind::DiskFull => format!(
                    "data volume full: this stage cannot store anything until space is freed; {outcome} ({})",
                    fault.error
                ),
                crate::store::FaultKind::Io => {
                    format!("storage unavailable: {outcome} ({})", fault.error)
                }
            };
            return Status::with_error_details(Code::Unavailable, message, details);
        }
        match e {
            StoreError::Truncated { .. } | StoreError::BeyondHead { .. } => {
                Status::out_of_range(e.to_string())
            }
            StoreError::UnknownConsumer { .. } | StoreError::NotSent { .. } => {
                Status::failed_precondition(e.to_string())
            }
            StoreError::ShuttingDown => Status::unavailable(e.to_string()),
            e => {
                tracing::error!(error = %e, "store failure");
                Status::internal("internal storage error")
            }
        }
    }
}

impl Store {
    /// Runs blocking store work `f` from an RPC handler: store failures, and whatever else `f`
    /// answers, become the matching gRPC status.
    pub async fn call<T, E>(
        &self,
        f: impl FnOnce(&Store) -> Result<T, E> + Send + 'static,
    ) -> Result<T, Status>
    where
        T: Send + 'static,
        E: Into<Status> + Send + 'static,
    {
        let store = self.clone();
        store::blocking(move || f(&store))
            .await?
            .map_err(Into::into)
    }
}

/// Collects field violations and turns them into one `INVALID_ARGUMENT` with a google.rpc.BadRequest.
#[derive(Debug, Default)]
pub struct FieldViolations {
    violations: Vec<(String, String)>,
}

impl FieldViolations {
    pub fn new() -> Self {
        Self::default()
    }

    /// Records that `field` (a path such as `lines[2].sku`) is bad because of `description`.
    pub fn add(&mut self, field: impl Into<String>, description: impl Into<String>) {
        self.violations.push((field.into(), description.into()));
    }

    /// `Ok(())` when nothing was recorded, else `INVALID_ARGUMENT` naming the bad fields: the first
    /// [`MAX_LISTED_VIOLATIONS`] of them, then how many more there are. gRPC carries both the message
    /// and the details in response headers, which common clients cap at 8–16 KiB; a bounded list
    /// keeps the answer `INVALID_ARGUMENT` for every client, however bad the request.
    pub fn check(self) -> Result<(), Status> {
        if self.violations.is_empty() {
            return Ok(());
        }
        let more = self.violations.len().saturating_sub(MAX_LISTED_VIOLATIONS);
        let listed = &self.violations[..self.violations.len() - more];
        let mut summary = listed
            .iter()
            .map(|(field, description)| format!("{field}: {description}"))
            .collect::<Vec<_>>()
            .join("; ");
        let mut details = ErrorDetails::new();
        for (field, description) in listed {
            details.add_bad_request_violation(field.clone(), description.clone());
        }
        if more > 0 {
            summary.push_str(&format!("; and {more} more"));
            details.add_bad_request_violation(
                "request",
                format!("and {more} more violations not listed"),
            );
        }
        Err(Status::with_error_details(
            Code::InvalidArgument,
            format!("invalid request: {summary}"),
            details,
        ))
    }

    /// Checks a caller-supplied identifier (an id, a sku, a name): present, at most `max_chars`
    /// characters, and free of control characters (which would forge lines in text logs and
    /// terminals). Records a violation under `field` otherwise; returns whether it is fine.
    pub fn check_identifier(
        &mut self,
        field: impl Into<String>,
        value: &str,
        max_chars: usize,
    ) -> bool {
        let why = if value.trim().is_empty() {
            "required".to_owned()
        } else if value.chars().count() > max_chars {
            format!("must be at most {max_chars} characters")
        } else if value.chars().any(char::is_control) {
            "must not contain control characters".to_owned()
        } else {
            return true;
        };
        self.add(field, why);
        false
    }
}

/// Longest order id accepted in a request (ours are 36-character UUIDs).
pub const MAX_ORDER_ID_CHARS: usize = 128;

/// Violations listed in one `INVALID_ARGUMENT` at most; the rest are counted.
pub const MAX_LISTED_VIOLATIONS: usize = 20;

/// Longest consumer name of an outbox.
pub const MAX_CONSUMER_NAME: usize = 64;

/// Whether `name` can name a consumer of an outbox: 1 to [`MAX_CONSUMER_NAME`] of `A–Z a–z 0–9 . _ -`.
/// Returns why not.
pub fn check_name(name: &str) -> Result<(), &'static str> {
    if name.is_empty() {
        return Err("is empty");
    }
    if name.len() > MAX_CONSUMER_NAME {
        return Err("is longer than 64 bytes");
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        return Err("may only contain letters, digits, '.', '_' and '-'");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn violations_become_bad_request_details() {
        let mut v = FieldViolations::new();
        v.add("customer_id", "required");
        v.add("lines[0].quantity", "must be 1 to 10000");
        let status = v.check().unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument);
        let fields: Vec<_> = status
            .get_details_bad_request()
            .unwrap()
            .field_violations
            .into_iter()
            .map(|v| v.field)
            .collect();
        assert_eq!(fields, vec!["customer_id", "lines[0].quantity"]);
    }

    #[test]
    fn long_violation_lists_are_capped_and_counted() {
        let mut v = FieldViolations::new();
        for i in 0..250 {
            v.add(format!("lines[{i}].sku"), "required");
        }
        let status = v.check().unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument);
        let listed = status.get_details_bad_request().unwrap().field_violations;
        assert_eq!(listed.len(), MAX_LISTED_VIOLATIONS + 1);
        assert_eq!(
            listed[MAX_LISTED_VIOLATIONS].description,
            "and 230 more violations not listed"
        );
        assert!(
            status.message().ends_with("; and 230 more"),
            "{}",
            status.message()
        );
        assert!(status.message().len() < 2048);
    }

    #[test]
    fn identifiers_refuse_control_characters() {
        let cases = [
            ("alice", true),
            ("", false),
            ("  ", false),
            ("al\nice", false),
            ("a\u{0}", false),
            ("a\u{7f}", false),
            ("a\u{85}", false),
            ("émile", true),
            (&*"x".repeat(11), false),
        ];
        for (value, ok) in cases {
            let mut v = FieldViolations::new();
            assert_eq!(
                v.check_identifier("customer_id", value, 10),
                ok,
                "{value:?}"
            );
            assert_eq!(v.check().is_ok(), ok, "{value:?}");
        }
    }

    #[test]
    fn storage_faults_say_whether_the_request_may_have_been_stored() {
        let full = || redb::Error::Io(std::io::Error::from_raw_os_error(28));
        let failed_commit = Status::from(StoreError::CommitFailed(full()));
        let refused_up_front = Status::from(StoreError::Unavailable(
            StoreError::Storage(full()).fault().unwrap(),
        ));
        let failed_before_commit = Status::from(StoreError::Storage(redb::Error::Io(
            std::io::Error::other("bad sector"),
        )));
        for (status, reason, says) in [
            (
                &failed_commit,
                MAYBE_STORED_REASON,
                "may still have been stored",
            ),
            (
                &refused_up_front,
                NOT_STORED_REASON,
                "nothing of this request",
            ),
            (
                &failed_before_commit,
                NOT_STORED_REASON,
                "storage unavailable",
            ),
        ] {
            assert_eq!(status.code(), Code::Unavailable, "{status:?}");
            assert!(status.message().contains(says), "{status:?}");
            assert_eq!(status.get_details_error_info().unwrap().reason, reason);
            assert_eq!(
                status.get_details_retry_info().unwrap().retry_delay,
                Some(STORE_RETRY_AFTER)
            );
        }
        assert!(failed_commit.message().starts_with("data volume full"));
        assert!(failed_commit.message().contains("same idempotency key"));
    }

    #[test]
    fn consumer_names_are_plain() {
        assert!(check_name("stock").is_ok());
        assert!(check_name("progress.stock-2_b").is_ok());
        for bad in ["", "\u{0}", "a b", "ü", &"x".repeat(65)] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
    }
}
