//! The EC2 instance metadata service (IMDSv2), read through the SDK's own client.
//!
//! Owns: the client's settings for a resident agent (short timeouts, one attempt, so a host
//! with no metadata service, on premises or a laptop, never waits), honouring
//! `AWS_EC2_METADATA_DISABLED` as the SDK's credential chain does, and telling "not there"
//! (404) from "cannot ask" (no service, or it failed).
//!
//! The endpoint is the SDK's: `AWS_EC2_METADATA_SERVICE_ENDPOINT`, the profile, else
//! `http://169.254.169.254`. Session tokens are fetched and cached by the client.
//!
//! Must not touch: what the answers mean (`identity`, `fleet`).

use std::time::Duration;

use aws_config::imds::client::error::ImdsError;

/// On EC2 the service answers in well under a millisecond; anything slower means none.
const CONNECT_TIMEOUT: Duration = Duration::from_millis(300);
const READ_TIMEOUT: Duration = Duration::from_millis(500);
const OPERATION_TIMEOUT: Duration = Duration::from_secs(1);

/// Why a metadata read gave no answer.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// No service answered (nothing listens, no route, or it timed out): not on EC2.
    #[error("no instance metadata service answered: {0}")]
    Unreachable(String),
    /// The service answered with an error status other than 404.
    #[error("the instance metadata service answered {status} for {path}")]
    Status { path: String, status: u16 },
    #[error("the instance metadata service failed: {0}")]
    Other(String),
}

/// A client of the instance metadata service. Cloning shares the cached token.
#[derive(Debug, Clone)]
pub struct Imds {
    client: aws_config::imds::Client,
}

impl Imds {
    /// The service at the SDK's endpoint, or `None` where `AWS_EC2_METADATA_DISABLED=true`.
    pub fn from_env() -> Option<Imds> {
        let disabled = std::env::var("AWS_EC2_METADATA_DISABLED")
            .map(|v| v.eq_ignore_ascii_case("true"))
            .unwrap_or(false);
        if disabled {
            return None;
        }
        let client = aws_config::imds::Client::builder()
            .max_attempts(1)
            .connect_timeout(CONNECT_TIMEOUT)
            .read_timeout(READ_TIMEOUT)
            .operation_attempt_timeout(OPERATION_TIMEOUT)
            .operation_timeout(OPERATION_TIMEOUT)
            .build();
        Some(Imds { client })
    }

    /// Reads `path` (e.g. `/latest/meta-data/instance-id`): `Ok(None)` when the service says
    /// there is no such item (404), as for `spot/instance-action` until a notice comes.
    pub async fn get(&self, path: &str) -> Result<Option<String>, ReadError> {
        match self.client.get(path).await {
            Ok(value) => Ok(Some(value.as_ref().trim().to_string())),
            Err(ImdsError::ErrorResponse(e)) => match e.response().status().as_u16() {
                404 => Ok(None),
                status => Err(ReadError::Status {
                    path: path.to_string(),
                    status,
                }),
            },
            Err(e @ ImdsError::FailedToLoadToken(_)) if is_dispatch_failure(&e) => {
                Err(ReadError::Unreachable(error_text(&e)))
            }
            Err(e @ ImdsError::IoError(_)) => Err(ReadError::Unreachable(error_text(&e))),
            Err(e) => Err(ReadError::Other(error_text(&e))),
        }
    }
}

fn is_dispatch_failure(e: &ImdsError) -> bool {
    matches!(e, ImdsError::FailedToLoadToken(t) if t.is_dispatch_failure())
}

fn error_text(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}
