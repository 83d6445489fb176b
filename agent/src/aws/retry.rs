//! The one retry policy for every AWS call the agent makes (reports, CloudWatch Logs), and
//! what an AWS error means for it.
//!
//! Owns: the backoff schedule (exponential, capped, jittered) and the classification of an
//! SDK failure into "try again soon" ([`ErrorClass::Retryable`]: throttling, 5xx, network,
//! timeouts) or "the request itself was refused" ([`ErrorClass::Rejected`]: other 4xx,
//! which is a bug or missing permissions).
//!
//! The SDK's own retries are off (see [`super`]), so this is the only retry layer: a
//! caller makes one attempt, asks this module how long to wait, and tries again. Stacking
//! the SDK's three attempts under ours would triple every wait during an outage and hide
//! how many calls were really made.
//!
//! Must not touch: the network, files or clocks other than for jitter; callers sleep.

use std::error::Error;
use std::time::Duration;

use aws_sdk_sfn::config::http::HttpResponse;
use aws_sdk_sfn::error::{ProvideErrorMetadata, SdkError};

/// How randomness spreads the delays. Without it, every agent of a fleet that lost the
/// endpoint at the same moment would come back at the same moment, in lockstep, forever.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Jitter {
    /// Uniform in `[0, ceiling]` ("full jitter" in the AWS Architecture Blog's "Exponential
    /// Backoff and Jitter"): the least total load on a recovering service.
    Full,
    /// Uniform in `[ceiling / 2, ceiling]`: never retries almost at once, still spreads.
    Equal,
    /// Exactly `ceiling`; for tests that want a predictable schedule.
    None,
}

/// Exponential backoff: the ceiling doubles from `initial` each attempt up to `max`, and
/// [`Jitter`] picks the actual delay below it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// The ceiling of the first retry's delay.
    pub initial: Duration,
    /// No delay is ever longer than this, whatever the attempt.
    pub max: Duration,
    pub jitter: Jitter,
}

impl Default for RetryPolicy {
    fn default() -> RetryPolicy {
        RetryPolicy {
            initial: Duration::from_millis(200),
            max: Duration::from_secs(30),
            jitter: Jitter::Full,
        }
    }
}

impl RetryPolicy {
    /// The upper bound of the delay before retry number `attempt + 1` (attempt 0 is the
    /// first retry): `min(max, initial * 2^attempt)`, saturating rather than overflowing.
    pub fn ceiling(&self, attempt: u32) -> Duration {
        let factor = 1u32.checked_shl(attempt.min(31)).unwrap_or(u32::MAX);
        self.initial
            .checked_mul(factor)
            .unwrap_or(self.max)
            .min(self.max)
    }

    /// How long to wait after `attempt` failed attempts (0 = after the first failure).
    pub fn delay(&self, attempt: u32) -> Duration {
        jittered(self.ceiling(attempt), self.jitter)
    }

    /// The delay after a [`ErrorClass::Rejected`] error: near the cap whatever the attempt.
    /// A refused request is usually missing permissions that an operator will fix; retrying
    /// slowly keeps the outcome without hammering the service with calls that cannot work.
    pub fn rejected_delay(&self) -> Duration {
        jittered(self.max, Jitter::Equal)
    }

    /// The delay for a failure of the given class after `attempt` failed attempts.
    pub fn delay_for(&self, class: ErrorClass, attempt: u32) -> Duration {
        match class {
            ErrorClass::Retryable => self.delay(attempt),
            ErrorClass::Rejected => self.rejected_delay(),
        }
    }
}

fn jittered(ceiling: Duration, jitter: Jitter) -> Duration {
    let nanos = u64::try_from(ceiling.as_nanos()).unwrap_or(u64::MAX);
    let picked = match jitter {
        Jitter::None => nanos,
        Jitter::Full => uniform(nanos),
        Jitter::Equal => nanos / 2 + uniform(nanos - nanos / 2),
    };
    Duration::from_nanos(picked)
}

/// Uniform in `[0, bound]`, from `fastrand` (seeded per thread from the OS): plenty for
/// spreading retries, which nothing needs to be unpredictable to an attacker.
fn uniform(bound: u64) -> u64 {
    fastrand::u64(0..=bound)
}

/// What a failed AWS call means for the retry policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// Throttling, a 5xx, a timeout or a network failure: try again after [`RetryPolicy::delay`].
    Retryable,
    /// The service refused the request (a 4xx that is not throttling): a bug or missing
    /// permissions. Log it loudly; retry after [`RetryPolicy::rejected_delay`].
    Rejected,
}

/// Error codes that mean "slow down" or "transient trouble on the service side", whatever
/// HTTP status they come with. Taken from the codes the AWS SDKs' standard retry strategy
/// treats as throttling or transient, plus the DynamoDB and KMS ones our calls can meet.
const RETRYABLE_CODES: &[&str] = &[
    "Throttling",
    "ThrottlingException",
    "ThrottledException",
    "RequestThrottledException",
    "TooManyRequestsException",
    "ProvisionedThroughputExceededException",
    "RequestLimitExceeded",
    "BandwidthLimitExceeded",
    "SlowDown",
    "PriorRequestNotComplete",
    "RequestTimeout",
    "RequestTimeoutException",
    "InternalError",
    "InternalFailure",
    "InternalServerError",
    "ServiceUnavailable",
    "KmsThrottlingException",
    "TransactionConflictException",
    "ReplicatedWriteConflictException",
    // Temporary credentials expired between the cache's refresh and the call; the next
    // attempt signs with fresh ones.
    "ExpiredToken",
    "ExpiredTokenException",
    "RequestExpired",
];

/// One failed SDK call, reduced to what reporting needs: the class, the service's error
/// code when it answered, and a one-line description for logs and error messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct FailedCall {
    pub(crate) class: ErrorClass,
    /// The service's error code (`ThrottlingException`, `TaskDoesNotExist`, ...), when the
    /// service answered with one.
    pub(crate) code: Option<String>,
    pub(crate) detail: String,
}

/// Classifies an SDK failure. Services answer with typed errors whose `code()` is the AWS
/// error code; everything that never got a parseable answer (dispatch failures, timeouts, a
/// torn response) is transport trouble and worth retrying.
pub(crate) fn classify<E>(err: &SdkError<E, HttpResponse>) -> FailedCall
where
    E: ProvideErrorMetadata + Error + 'static,
{
    match err {
        SdkError::ServiceError(service) => {
            let status = service.raw().status().as_u16();
            let code = service.err().code().map(str::to_string);
            let message = service.err().message().unwrap_or("");
            let retryable = status == 429
                || status >= 500
                || code
                    .as_deref()
                    .is_some_and(|c| RETRYABLE_CODES.contains(&c));
            FailedCall {
                class: if retryable {
                    ErrorClass::Retryable
                } else {
                    ErrorClass::Rejected
                },
                detail: format!(
                    "HTTP {status} {}: {message}",
                    code.as_deref().unwrap_or("(no error code)")
                ),
                code,
            }
        }
        SdkError::TimeoutError(_) => FailedCall {
            class: ErrorClass::Retryable,
            code: None,
            detail: "the attempt timed out".to_string(),
        },
        SdkError::DispatchFailure(dispatch) => FailedCall {
            class: ErrorClass::Retryable,
            code: None,
            detail: format!(
                "the request could not be sent ({}): {}",
                if dispatch.is_timeout() {
                    "timeout"
                } else if dispatch.is_io() {
                    "network"
                } else if dispatch.is_user() {
                    "client configuration"
                } else {
                    "other"
                },
                source_chain(err)
            ),
        },
        SdkError::ResponseError(response) => FailedCall {
            // The service (or something in between) answered with bytes we could not read,
            // such as a response torn by a dropped connection; another attempt may fare better.
            class: ErrorClass::Retryable,
            code: None,
            detail: format!(
                "unreadable response (HTTP {}): {}",
                response.raw().status().as_u16(),
                source_chain(err)
            ),
        },
        SdkError::ConstructionFailure(_) => FailedCall {
            class: ErrorClass::Rejected,
            code: None,
            detail: format!("the request could not be built: {}", source_chain(err)),
        },
        // SdkError is non-exhaustive; an unknown kind is treated as transient, which at
        // worst costs a few retries.
        _ => FailedCall {
            class: ErrorClass::Retryable,
            code: None,
            detail: source_chain(err),
        },
    }
}

/// The error's sources joined with ": ", skipping the SDK's terse top level ("dispatch
/// failure") that says less than what follows it.
fn source_chain(err: &dyn Error) -> String {
    let mut parts = Vec::new();
    let mut next = err.source();
    while let Some(e) = next {
        parts.push(e.to_string());
        next = e.source();
    }
    if parts.is_empty() {
        err.to_string()
    } else {
        parts.join(": ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(jitter: Jitter) -> RetryPolicy {
        RetryPolicy {
            initial: Duration::from_millis(200),
            max: Duration::from_secs(30),
            jitter,
        }
    }

    #[test]
    fn ceiling_doubles_then_caps_without_overflow() {
        let p = policy(Jitter::None);
        assert_eq!(p.delay(0), Duration::from_millis(200));
        assert_eq!(p.delay(1), Duration::from_millis(400));
        assert_eq!(p.delay(4), Duration::from_millis(3200));
        assert_eq!(p.delay(7), Duration::from_millis(25_600));
        assert_eq!(p.delay(8), Duration::from_secs(30));
        for attempt in [9, 31, 32, 64, u32::MAX] {
            assert_eq!(
                p.delay(attempt),
                Duration::from_secs(30),
                "attempt {attempt}"
            );
        }
    }

    #[test]
    fn full_jitter_stays_within_zero_and_ceiling_and_varies() {
        let p = policy(Jitter::Full);
        for attempt in 0..40 {
            let ceiling = p.ceiling(attempt);
            let delays: Vec<_> = (0..200).map(|_| p.delay(attempt)).collect();
            assert!(delays.iter().all(|d| *d <= ceiling), "attempt {attempt}");
            let distinct: std::collections::HashSet<_> = delays.iter().collect();
            assert!(
                distinct.len() > 100,
                "jitter should spread: {}",
                distinct.len()
            );
        }
    }

    #[test]
    fn equal_jitter_stays_in_upper_half() {
        let p = policy(Jitter::Equal);
        for attempt in 0..12 {
            let ceiling = p.ceiling(attempt);
            for _ in 0..200 {
                let d = p.delay(attempt);
                assert!(d >= ceiling / 2 && d <= ceiling, "attempt {attempt}: {d:?}");
            }
        }
    }

    #[test]
    fn rejected_errors_wait_near_the_cap() {
        let p = policy(Jitter::Full);
        for _ in 0..100 {
            let d = p.delay_for(ErrorClass::Rejected, 0);
            assert!(
                d >= Duration::from_secs(15) && d <= Duration::from_secs(30),
                "{d:?}"
            );
        }
        assert!(p.delay_for(ErrorClass::Retryable, 0) <= Duration::from_millis(200));
    }

    #[test]
    fn zero_initial_is_allowed() {
        let p = RetryPolicy {
            initial: Duration::ZERO,
            max: Duration::from_secs(1),
            jitter: Jitter::Full,
        };
        assert_eq!(p.delay(5), Duration::ZERO);
    }

    mod classification {
        use super::super::*;
        use aws_sdk_sfn::error::{ConnectorError, ErrorMetadata};
        use aws_sdk_sfn::operation::send_task_heartbeat::SendTaskHeartbeatError;

        // The SDK re-exports enough to build its errors by hand; the body type is reached
        // through `From<&str>` so no smithy crate needs to be a dependency.
        fn response(status: u16) -> HttpResponse {
            HttpResponse::new(status.try_into().expect("valid status"), "".into())
        }

        fn service(code: &str, status: u16) -> SdkError<SendTaskHeartbeatError, HttpResponse> {
            let meta = ErrorMetadata::builder().code(code).message("m").build();
            SdkError::service_error(SendTaskHeartbeatError::generic(meta), response(status))
        }

        #[test]
        fn throttling_and_server_errors_are_retryable() {
            assert_eq!(
                classify(&service("ThrottlingException", 400)).class,
                ErrorClass::Retryable
            );
            assert_eq!(
                classify(&service("Whatever", 503)).class,
                ErrorClass::Retryable
            );
            assert_eq!(
                classify(&service("Whatever", 429)).class,
                ErrorClass::Retryable
            );
        }

        #[test]
        fn other_client_errors_are_rejected_with_their_code() {
            let failed = classify(&service("AccessDeniedException", 400));
            assert_eq!(failed.class, ErrorClass::Rejected);
            assert_eq!(failed.code.as_deref(), Some("AccessDeniedException"));
            assert!(
                failed.detail.contains("HTTP 400 AccessDeniedException"),
                "{}",
                failed.detail
            );
        }

        #[test]
        fn network_and_timeouts_are_retryable() {
            let io: SdkError<SendTaskHeartbeatError, HttpResponse> =
                SdkError::dispatch_failure(ConnectorError::io(Box::new(std::io::Error::from(
                    std::io::ErrorKind::ConnectionRefused,
                ))));
            let failed = classify(&io);
            assert_eq!(failed.class, ErrorClass::Retryable);
            assert!(failed.detail.contains("network"), "{}", failed.detail);
            let timeout: SdkError<SendTaskHeartbeatError, HttpResponse> =
                SdkError::timeout_error("slow");
            assert_eq!(classify(&timeout).class, ErrorClass::Retryable);
            let torn: SdkError<SendTaskHeartbeatError, HttpResponse> =
                SdkError::response_error("eof", response(200));
            assert_eq!(classify(&torn).class, ErrorClass::Retryable);
            let bad: SdkError<SendTaskHeartbeatError, HttpResponse> =
                SdkError::construction_failure("missing field");
            assert_eq!(classify(&bad).class, ErrorClass::Rejected);
        }
    }
}
