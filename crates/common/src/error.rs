//! The one place where errors become `tonic::Status`.
//!
//! Services return [`ServiceError`] (or their own `thiserror` enum converted into it); the gRPC adapter calls
//! `.into()` at the edge. Every status carries `google.rpc.Status` details (`ErrorInfo` with a reason and the
//! service's domain; `BadRequest` for invalid fields; `RetryInfo` for temporary failures), so a client can tell
//! a temporary failure from a permanent one without parsing strings ([`is_retryable`], or [`Failure`] for
//! every detail at once).
//! Unexpected errors are logged in full, with their cause chain, and reach the client only as an opaque
//! INTERNAL with the trace id to look for.

use std::time::Duration;

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

/// Domain of the `ErrorInfo` details this platform emits.
pub const ERROR_DOMAIN: &str = "keel";

/// What went wrong, in the small set of kinds clients act on.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    /// A request field is invalid: INVALID_ARGUMENT with a `BadRequest` field violation.
    #[error("{field}: {description}")]
    InvalidArgument {
        /// Field path, e.g. `user_id`.
        field: String,
        /// What is wrong with it.
        description: String,
    },
    /// NOT_FOUND.
    #[error("{0}")]
    NotFound(String),
    /// ALREADY_EXISTS.
    #[error("{0}")]
    AlreadyExists(String),
    /// FAILED_PRECONDITION.
    #[error("{0}")]
    FailedPrecondition(String),
    /// ABORTED: the operation lost to a concurrent one (a reservation cancelled before it arrived, say); the
    /// caller decides whether to start over.
    #[error("{0}")]
    Aborted(String),
    /// A quota would be exceeded: FAILED_PRECONDITION with a `QuotaFailure` violation (retrying the same call
    /// cannot help until something is released).
    #[error("{description}")]
    QuotaExceeded {
        /// What the quota is on, e.g. `account:<id>`.
        subject: String,
        /// Which limit and by how much, e.g. `max_cache_keys 100 reached`.
        description: String,
    },
    /// UNAUTHENTICATED: no credential, or one nobody issued.
    #[error("{0}")]
    Unauthenticated(String),
    /// PERMISSION_DENIED: a valid credential that may not do this (another tenant's account, an operator's
    /// call).
    #[error("{0}")]
    PermissionDenied(String),
    /// UNIMPLEMENTED.
    #[error("{0}")]
    Unimplemented(String),
    /// A dependency is down or overloaded: UNAVAILABLE with `RetryInfo`.
    #[error("{message}")]
    Unavailable {
        /// What is unavailable.
        message: String,
        /// Suggested wait before retrying.
        retry_after: Duration,
    },
    /// The caller is over a limit for now (too many failed logins, say): RESOURCE_EXHAUSTED with `RetryInfo`.
    #[error("{message}")]
    ResourceExhausted {
        /// Which limit.
        message: String,
        /// When trying again can succeed.
        retry_after: Duration,
    },
    /// Anything unexpected: logged in full, INTERNAL with an opaque message.
    #[error(transparent)]
    Internal(#[from] anyhow::Error),
}

impl ServiceError {
    /// Shorthand for [`ServiceError::InvalidArgument`].
    pub fn invalid(field: impl Into<String>, description: impl Into<String>) -> Self {
        Self::InvalidArgument {
            field: field.into(),
            description: description.into(),
        }
    }

    fn reason(&self) -> &'static str {
        match self {
            Self::InvalidArgument { .. } => "INVALID_ARGUMENT",
            Self::NotFound(_) => "NOT_FOUND",
            Self::AlreadyExists(_) => "ALREADY_EXISTS",
            Self::FailedPrecondition(_) => "FAILED_PRECONDITION",
            Self::Aborted(_) => "ABORTED",
            Self::QuotaExceeded { .. } => "QUOTA_EXCEEDED",
            Self::Unauthenticated(_) => "UNAUTHENTICATED",
            Self::PermissionDenied(_) => "PERMISSION_DENIED",
            Self::Unimplemented(_) => "UNIMPLEMENTED",
            Self::Unavailable { .. } => "UNAVAILABLE",
            Self::ResourceExhausted { .. } => "RESOURCE_EXHAUSTED",
            Self::Internal(_) => "INTERNAL",
        }
    }
}

impl From<ServiceError> for Status {
    fn from(err: ServiceError) -> Status {
        let (code, message, details) = status_parts(&err);
        Status::with_error_details(code, bounded(&message), details)
    }
}

/// Most characters of a status message or detail text; longer ones are cut with `…`, so a caller's input
/// echoed in an error (a 200,000-character id, say) never turns into a huge `grpc-message` trailer.
pub const MAX_ERROR_TEXT: usize = 256;

/// `text`, cut to at most [`MAX_ERROR_TEXT`] characters (on a character boundary) with `…` when longer.
pub fn bounded(text: &str) -> String {
    match text.char_indices().nth(MAX_ERROR_TEXT) {
        None => text.to_owned(),
        Some((cut, _)) => format!("{}…", &text[..cut]),
    }
}

fn status_parts(err: &ServiceError) -> (Code, String, ErrorDetails) {
    let mut details = ErrorDetails::new();
    details.set_error_info(err.reason(), ERROR_DOMAIN, std::collections::HashMap::new());
    let (code, message) = match err {
        ServiceError::InvalidArgument { field, description } => {
            details.add_bad_request_violation(bounded(field), bounded(description));
            (Code::InvalidArgument, err.to_string())
        }
        ServiceError::NotFound(m) => (Code::NotFound, m.clone()),
        ServiceError::AlreadyExists(m) => (Code::AlreadyExists, m.clone()),
        ServiceError::FailedPrecondition(m) => (Code::FailedPrecondition, m.clone()),
        ServiceError::Aborted(m) => (Code::Aborted, m.clone()),
        ServiceError::QuotaExceeded {
            subject,
            description,
        } => {
            details.add_quota_failure_violation(bounded(subject), bounded(description));
            (Code::FailedPrecondition, description.clone())
        }
        ServiceError::Unauthenticated(m) => (Code::Unauthenticated, m.clone()),
        ServiceError::PermissionDenied(m) => (Code::PermissionDenied, m.clone()),
        ServiceError::Unimplemented(m) => (Code::Unimplemented, m.clone()),
        ServiceError::Unavailable {
            message,
            retry_after,
        } => {
            details.set_retry_info(Some(*retry_after));
            (Code::Unavailable, message.clone())
        }
        ServiceError::ResourceExhausted {
            message,
            retry_after,
        } => {
            details.set_retry_info(Some(*retry_after));
            (Code::ResourceExhausted, message.clone())
        }
        ServiceError::Internal(e) => {
            let trace_id = crate::context::current()
                .map(|c| c.trace_id)
                .unwrap_or_default();
            tracing::error!(error = ?e, "unexpected error");
            (
                Code::Internal,
                format!("internal error (trace id {trace_id})"),
            )
        }
    };
    (code, message, details)
}

/// The statuses the platform's layers ([`crate::layers`], [`crate::routing`]) answer with when a call never
/// reaches a handler or never reaches an instance. Bare statuses, as gRPC's own transports give them (no
/// details, so a client's reading of them is unchanged), built here so this stays the one place statuses are
/// made.
pub(crate) mod layer_status {
    use tonic::Status;

    /// DEADLINE_EXCEEDED: the caller's deadline passed before or during the call.
    pub(crate) fn deadline_exceeded(message: impl Into<String>) -> Status {
        Status::deadline_exceeded(message)
    }

    /// UNAVAILABLE: no instance, or the transport to it failed; the caller may retry.
    pub(crate) fn unavailable(message: impl Into<String>) -> Status {
        Status::unavailable(message)
    }

    /// UNAVAILABLE: discovery lists no healthy instance of `service`, so the call was sent nowhere. It carries
    /// `grpc-retry-pushback-ms: -1` (gRPC proposal A6's "do not retry"), which the call-site retries
    /// ([`crate::retry`]) and the service config's retries honour: another attempt could only find the same
    /// empty list (discovery looks again 100 ms later at the soonest), after a backoff that made a failure
    /// that should be fast take ~45 ms (the chaos test's PostgreSQL outage: the cache's token lookups once
    /// accounts had left DNS). The caller gets the failure at once.
    pub(crate) fn no_instance(service: &str) -> Status {
        let mut status = Status::unavailable(format!("no healthy instance of service {service:?}"));
        status.metadata_mut().insert(
            "grpc-retry-pushback-ms",
            tonic::metadata::MetadataValue::from_static("-1"),
        );
        status
    }

    /// RESOURCE_EXHAUSTED: shed at the concurrency limit before any handler ran.
    pub(crate) fn overloaded(message: impl Into<String>) -> Status {
        Status::resource_exhausted(message)
    }

    /// A message the client cannot compress or decompress (gzip), with what went wrong: INTERNAL, or
    /// RESOURCE_EXHAUSTED for an answer that would decompress past the limit.
    pub(crate) fn compression(message: impl Into<String>, too_large: bool) -> Status {
        if too_large {
            Status::resource_exhausted(message)
        } else {
            Status::internal(message)
        }
    }

    /// An unexpected failure of the server stack itself: logged in full, opaque INTERNAL to the caller.
    pub(crate) fn internal(error: anyhow::Error) -> Status {
        super::ServiceError::Internal(error).into()
    }
}

/// Whether a failed call may succeed if tried again: UNAVAILABLE, RESOURCE_EXHAUSTED or ABORTED, or any status
/// whose details carry `RetryInfo`.
pub fn is_retryable(status: &Status) -> bool {
    matches!(
        status.code(),
        Code::Unavailable | Code::ResourceExhausted | Code::Aborted
    ) || status.get_details_retry_info().is_some()
}

/// A failed call as its `google.rpc.Status` details describe it: the client-side reading of what
/// [`ServiceError`] writes (and of any other server's standard details).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Failure {
    /// `ErrorInfo.reason` (`QUOTA_EXCEEDED`, `INVALID_ARGUMENT`…), when given.
    pub reason: Option<String>,
    /// `ErrorInfo.domain` (this platform's: [`ERROR_DOMAIN`]).
    pub domain: Option<String>,
    /// `BadRequest` violations: (field, description).
    pub bad_fields: Vec<(String, String)>,
    /// `QuotaFailure` violations: (subject, description).
    pub quota_violations: Vec<(String, String)>,
    /// `RetryInfo.retry_delay`: wait at least this long before trying again.
    pub retry_after: Option<Duration>,
    /// Whether trying again may succeed ([`is_retryable`]); false: fix the request or give up.
    pub temporary: bool,
}

impl From<&Status> for Failure {
    fn from(status: &Status) -> Self {
        let d = status.get_error_details();
        Self {
            reason: d.error_info().map(|i| i.reason.clone()),
            domain: d.error_info().map(|i| i.domain.clone()),
            bad_fields: d
                .bad_request()
                .map(|b| {
                    b.field_violations
                        .iter()
                        .map(|v| (v.field.clone(), v.description.clone()))
                        .collect()
                })
                .unwrap_or_default(),
            quota_violations: d
                .quota_failure()
                .map(|q| {
                    q.violations
                        .iter()
                        .map(|v| (v.subject.clone(), v.description.clone()))
                        .collect()
                })
                .unwrap_or_default(),
            retry_after: d.retry_info().and_then(|r| r.retry_delay),
            temporary: is_retryable(status),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_client_reads_every_detail_without_parsing_the_message() {
        let quota: Status = ServiceError::QuotaExceeded {
            subject: "account:a1".into(),
            description: "max_cache_keys 100 reached".into(),
        }
        .into();
        let f = Failure::from(&quota);
        assert_eq!(f.reason.as_deref(), Some("QUOTA_EXCEEDED"));
        assert_eq!(f.domain.as_deref(), Some(ERROR_DOMAIN));
        assert_eq!(
            f.quota_violations,
            vec![("account:a1".into(), "max_cache_keys 100 reached".into())]
        );
        assert!(!f.temporary && f.retry_after.is_none());
        let busy: Status = ServiceError::Unavailable {
            message: "accounts down".into(),
            retry_after: Duration::from_millis(200),
        }
        .into();
        let f = Failure::from(&busy);
        assert!(f.temporary);
        assert_eq!(f.retry_after, Some(Duration::from_millis(200)));
        let bad = Failure::from(&Status::from(ServiceError::invalid("key", "required")));
        assert_eq!(bad.bad_fields, vec![("key".into(), "required".into())]);
        assert!(!bad.temporary);
        assert_eq!(
            Failure::from(&Status::unavailable("plain")),
            Failure {
                temporary: true,
                ..Default::default()
            },
            "a status without details: only its code speaks"
        );
    }

    #[test]
    fn invalid_argument_carries_bad_request_and_error_info() {
        let status: Status = ServiceError::invalid("user_id", "must be a UUID").into();
        assert_eq!(status.code(), Code::InvalidArgument);
        assert_eq!(status.message(), "user_id: must be a UUID");
        let d = status.get_error_details();
        let v = &d.bad_request().unwrap().field_violations[0];
        assert_eq!(
            (v.field.as_str(), v.description.as_str()),
            ("user_id", "must be a UUID")
        );
        assert_eq!(d.error_info().unwrap().domain, ERROR_DOMAIN);
        assert!(!is_retryable(&status));
    }

    #[test]
    fn error_texts_never_echo_more_than_a_short_prefix_of_the_input() {
        let id = "é".repeat(200_000);
        let status: Status =
            ServiceError::invalid("user_id", format!("{id:?} is not a UUID")).into();
        assert!(status.message().chars().count() <= MAX_ERROR_TEXT + 1);
        assert!(status.message().starts_with("user_id: \"éé"));
        let details = status.get_error_details();
        let v = &details.bad_request().unwrap().field_violations[0];
        assert!(v.description.chars().count() <= MAX_ERROR_TEXT + 1);
        assert!(v.description.ends_with('…'));
        let status: Status =
            ServiceError::NotFound(format!("account {id:?} does not exist")).into();
        assert!(status.message().len() < 1024, "{}", status.message().len());
        assert_eq!(bounded("short"), "short");
    }

    #[test]
    fn quota_exceeded_is_failed_precondition_with_quota_failure() {
        let status: Status = ServiceError::QuotaExceeded {
            subject: "account:a1".into(),
            description: "max_cache_keys 100 reached".into(),
        }
        .into();
        assert_eq!(status.code(), Code::FailedPrecondition);
        let d = status.get_error_details();
        let v = &d.quota_failure().unwrap().violations[0];
        assert_eq!(
            (v.subject.as_str(), v.description.as_str()),
            ("account:a1", "max_cache_keys 100 reached")
        );
        assert_eq!(d.error_info().unwrap().reason, "QUOTA_EXCEEDED");
        assert!(!is_retryable(&status));
    }

    #[test]
    fn internal_errors_are_opaque_and_unavailable_is_retryable() {
        let status: Status =
            ServiceError::Internal(anyhow::anyhow!("db password is hunter2")).into();
        assert_eq!(status.code(), Code::Internal);
        assert!(!status.message().contains("hunter2"));
        let status: Status = ServiceError::Unavailable {
            message: "accounts down".into(),
            retry_after: Duration::from_millis(200),
        }
        .into();
        assert!(is_retryable(&status));
        assert_eq!(
            status.get_details_retry_info().unwrap().retry_delay,
            Some(Duration::from_millis(200))
        );
    }
}
