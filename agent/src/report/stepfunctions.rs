//! Step Functions task callbacks: heartbeat, success and failure for a `waitForTaskToken`
//! task.
//!
//! Owns: the three calls and what their errors mean. A closed token (`TaskTimedOut`,
//! `TaskDoesNotExist`, `InvalidToken`) is [`CallbackError::TaskClosed`]: the task is already
//! over upstream (stopped, timed out, or answered by an earlier attempt of ours), which is
//! not a failure of the agent and never worth retrying. Everything else is classified by
//! [`crate::aws::retry`].
//!
//! Each method makes exactly one attempt. Retrying belongs to the caller under the one
//! [`crate::aws::retry::RetryPolicy`] (the outbox for outcomes, the heartbeat tick for
//! heartbeats), because the SDK's own retries are off.
//!
//! Must not touch: the outbox, the audit, or job state; and never log a task token (use
//! [`crate::lock::token_hash`]).

use std::fmt;

use aws_sdk_sfn::config::http::HttpResponse;
use aws_sdk_sfn::error::{BoxError, ProvideErrorMetadata, SdkError};
use aws_sdk_sfn::operation::send_task_failure::SendTaskFailureError;
use aws_sdk_sfn::operation::send_task_heartbeat::SendTaskHeartbeatError;
use aws_sdk_sfn::operation::send_task_success::SendTaskSuccessError;

use crate::aws::retry::{classify, ErrorClass};

/// The error codes with which Step Functions says a task token no longer names an open task.
const CLOSED_CODES: &[&str] = &["TaskTimedOut", "TaskDoesNotExist", "InvalidToken"];

/// Which callback failed; part of every [`CallbackError`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CallbackOp {
    Heartbeat,
    Success,
    Failure,
}

impl CallbackOp {
    /// The Step Functions API name, as operators know it from CloudTrail.
    pub fn api_name(self) -> &'static str {
        match self {
            CallbackOp::Heartbeat => "SendTaskHeartbeat",
            CallbackOp::Success => "SendTaskSuccess",
            CallbackOp::Failure => "SendTaskFailure",
        }
    }
}

impl fmt::Display for CallbackOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.api_name())
    }
}

/// A failed callback attempt.
#[derive(Debug, thiserror::Error)]
pub enum CallbackError {
    /// The token names a task that is already closed: the execution was stopped, the task
    /// timed out, or it was already answered. Not the agent's failure; do not retry. A
    /// heartbeat that gets this means the job should be cancelled.
    #[error("{op}: the task is already closed upstream ({reason})")]
    TaskClosed { op: CallbackOp, reason: String },
    /// Throttling, a 5xx, a timeout or a network failure: try again under the retry policy.
    #[error("{op} failed, worth retrying: {detail}")]
    Retryable {
        op: CallbackOp,
        detail: String,
        #[source]
        source: BoxError,
    },
    /// Step Functions refused the request (a 4xx that is not a closed token): a bug or
    /// missing permissions. Worth a loud log and slow retries, since permissions get fixed.
    #[error("{op} was rejected: {detail}")]
    Rejected {
        op: CallbackOp,
        code: Option<String>,
        detail: String,
        #[source]
        source: BoxError,
    },
}

impl CallbackError {
    pub fn op(&self) -> CallbackOp {
        match self {
            CallbackError::TaskClosed { op, .. }
            | CallbackError::Retryable { op, .. }
            | CallbackError::Rejected { op, .. } => *op,
        }
    }

    pub fn is_task_closed(&self) -> bool {
        matches!(self, CallbackError::TaskClosed { .. })
    }

    /// How the retry policy treats this error; `None` for a closed task, which is final.
    pub fn class(&self) -> Option<ErrorClass> {
        match self {
            CallbackError::TaskClosed { .. } => None,
            CallbackError::Retryable { .. } => Some(ErrorClass::Retryable),
            CallbackError::Rejected { .. } => Some(ErrorClass::Rejected),
        }
    }

    fn from_sdk<E>(op: CallbackOp, err: SdkError<E, HttpResponse>) -> CallbackError
    where
        E: ClosedTaskError + ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    {
        let failed = classify(&err);
        let closed = err.as_service_error().and_then(|service| {
            service
                .closed_code()
                .or_else(|| service.code().filter(|c| CLOSED_CODES.contains(c)))
        });
        if let Some(code) = closed {
            let reason = match err.message() {
                Some(message) if !message.is_empty() => format!("{code}: {message}"),
                _ => code.to_string(),
            };
            return CallbackError::TaskClosed { op, reason };
        }
        match failed.class {
            ErrorClass::Retryable => CallbackError::Retryable {
                op,
                detail: failed.detail,
                source: Box::new(err),
            },
            ErrorClass::Rejected => CallbackError::Rejected {
                op,
                code: failed.code,
                detail: failed.detail,
                source: Box::new(err),
            },
        }
    }
}

/// The typed "closed token" variants of each callback operation's error. The code check in
/// [`CallbackError::from_sdk`] covers the same errors when they arrive unmodelled.
trait ClosedTaskError {
    fn closed_code(&self) -> Option<&'static str>;
}

macro_rules! closed_task_error {
    ($($error:ty),+) => {$(
        impl ClosedTaskError for $error {
            fn closed_code(&self) -> Option<&'static str> {
                if self.is_task_timed_out() {
                    Some("TaskTimedOut")
                } else if self.is_task_does_not_exist() {
                    Some("TaskDoesNotExist")
                } else if self.is_invalid_token() {
                    Some("InvalidToken")
                } else {
                    None
                }
            }
        }
    )+};
}

closed_task_error!(
    SendTaskHeartbeatError,
    SendTaskSuccessError,
    SendTaskFailureError
);

/// The Step Functions callbacks, over one client built once per process.
#[derive(Debug, Clone)]
pub struct StepFunctions {
    client: aws_sdk_sfn::Client,
}

impl StepFunctions {
    /// Wraps the process's client (see [`crate::aws::AwsClients`]); cloning is cheap and
    /// shares its connection pool.
    pub fn new(client: aws_sdk_sfn::Client) -> StepFunctions {
        StepFunctions { client }
    }

    /// `SendTaskHeartbeat`, one attempt. [`CallbackError::TaskClosed`] means the task is
    /// over upstream and the job should be stopped.
    pub async fn heartbeat(&self, token: &str) -> Result<(), CallbackError> {
        self.client
            .send_task_heartbeat()
            .task_token(token)
            .send()
            .await
            .map(drop)
            .map_err(|e| CallbackError::from_sdk(CallbackOp::Heartbeat, e))
    }

    /// `SendTaskSuccess`, one attempt. `output_json` must already be within the size limit
    /// ([`crate::outcome::SuccessOutput::output_json`]).
    pub async fn succeed(&self, token: &str, output_json: &str) -> Result<(), CallbackError> {
        self.client
            .send_task_success()
            .task_token(token)
            .output(output_json)
            .send()
            .await
            .map(drop)
            .map_err(|e| CallbackError::from_sdk(CallbackOp::Success, e))
    }

    /// `SendTaskFailure`, one attempt. `error` and `cause` must already be within the limits
    /// ([`crate::outcome::Failure::error_field`] and [`crate::outcome::Failure::cause_json`]).
    pub async fn fail(&self, token: &str, error: &str, cause: &str) -> Result<(), CallbackError> {
        self.client
            .send_task_failure()
            .task_token(token)
            .error(error)
            .cause(cause)
            .send()
            .await
            .map(drop)
            .map_err(|e| CallbackError::from_sdk(CallbackOp::Failure, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use aws_sdk_sfn::error::{ConnectorError, ErrorMetadata};
    use aws_sdk_sfn::types::error::{InvalidToken, TaskTimedOut};

    fn response(status: u16) -> HttpResponse {
        HttpResponse::new(status.try_into().expect("valid status"), "".into())
    }

    #[test]
    fn closed_tokens_are_task_closed_never_retried() {
        let timed_out = SdkError::service_error(
            SendTaskHeartbeatError::TaskTimedOut(TaskTimedOut::builder().message("late").build()),
            response(400),
        );
        let err = CallbackError::from_sdk(CallbackOp::Heartbeat, timed_out);
        assert!(err.is_task_closed(), "{err}");
        assert_eq!(err.class(), None);
        assert!(err.to_string().contains("TaskTimedOut"), "{err}");

        let invalid = SdkError::service_error(
            SendTaskSuccessError::InvalidToken(InvalidToken::builder().build()),
            response(400),
        );
        assert!(CallbackError::from_sdk(CallbackOp::Success, invalid).is_task_closed());

        // An unmodelled error that still carries the code counts the same.
        let generic = SdkError::service_error(
            SendTaskSuccessError::generic(
                ErrorMetadata::builder().code("TaskDoesNotExist").build(),
            ),
            response(400),
        );
        assert!(CallbackError::from_sdk(CallbackOp::Success, generic).is_task_closed());
    }

    #[test]
    fn other_errors_follow_the_retry_classification() {
        let throttled = SdkError::service_error(
            SendTaskSuccessError::generic(
                ErrorMetadata::builder().code("ThrottlingException").build(),
            ),
            response(400),
        );
        let err = CallbackError::from_sdk(CallbackOp::Success, throttled);
        assert_eq!(err.class(), Some(ErrorClass::Retryable), "{err}");

        let denied = SdkError::service_error(
            SendTaskSuccessError::generic(
                ErrorMetadata::builder()
                    .code("AccessDeniedException")
                    .build(),
            ),
            response(400),
        );
        let err = CallbackError::from_sdk(CallbackOp::Success, denied);
        let CallbackError::Rejected { code, .. } = &err else {
            panic!("expected Rejected, got {err}");
        };
        assert_eq!(code.as_deref(), Some("AccessDeniedException"));

        let refused: SdkError<SendTaskSuccessError, HttpResponse> =
            SdkError::dispatch_failure(ConnectorError::io(Box::new(std::io::Error::from(
                std::io::ErrorKind::ConnectionRefused,
            ))));
        let err = CallbackError::from_sdk(CallbackOp::Success, refused);
        assert_eq!(err.class(), Some(ErrorClass::Retryable), "{err}");
        assert_eq!(err.op(), CallbackOp::Success);
    }
}
