//! The AWS clients, built once per process from the standard configuration chain.
//!
//! Owns: loading the shared SDK config (region, credentials and `AWS_ENDPOINT_URL` from the
//! standard chain, so tests point the same code at the emulator), the timeouts, and turning
//! the SDK's own retries off, and the one retry policy ([`retry`]) every caller retries
//! under instead; the SDK's retries stacked on ours would multiply the waits during an
//! outage.
//!
//! Must not touch: jobs, files, or what is sent; callers own their calls.

pub mod retry;

use std::time::Duration;

use aws_config::retry::RetryConfig;
use aws_config::timeout::TimeoutConfig;
use aws_config::BehaviorVersion;

/// How long one HTTP attempt may take before it counts as failed. A callback or an audit
/// write is small; anything slower than this is an outage, and the caller's retry policy
/// decides what happens next.
pub const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(10);
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// The SQS long poll waits up to 20 s on the server; its attempts need that much more.
pub const LONG_POLL_ATTEMPT_TIMEOUT: Duration = Duration::from_secs(30);

/// Every client the daemon uses. Cloning a client is cheap (it shares the connection pool).
#[derive(Debug, Clone)]
pub struct AwsClients {
    pub sfn: aws_sdk_sfn::Client,
    pub sqs: aws_sdk_sqs::Client,
    pub dynamodb: aws_sdk_dynamodb::Client,
    pub logs: aws_sdk_cloudwatchlogs::Client,
    pub secrets: aws_sdk_secretsmanager::Client,
    pub autoscaling: aws_sdk_autoscaling::Client,
}

/// Loads the shared SDK config from the standard chain, with our timeouts and with the SDK's
/// retries off.
pub async fn load_config() -> aws_config::SdkConfig {
    aws_config::defaults(BehaviorVersion::latest())
        .retry_config(RetryConfig::disabled())
        .timeout_config(
            TimeoutConfig::builder()
                .connect_timeout(CONNECT_TIMEOUT)
                .operation_attempt_timeout(ATTEMPT_TIMEOUT)
                .build(),
        )
        .load()
        .await
}

impl AwsClients {
    pub fn new(config: &aws_config::SdkConfig) -> AwsClients {
        let sqs = aws_sdk_sqs::config::Builder::from(config)
            .timeout_config(
                TimeoutConfig::builder()
                    .connect_timeout(CONNECT_TIMEOUT)
                    .operation_attempt_timeout(LONG_POLL_ATTEMPT_TIMEOUT)
                    .build(),
            )
            .build();
        AwsClients {
            sfn: aws_sdk_sfn::Client::new(config),
            sqs: aws_sdk_sqs::Client::from_conf(sqs),
            dynamodb: aws_sdk_dynamodb::Client::new(config),
            logs: aws_sdk_cloudwatchlogs::Client::new(config),
            secrets: aws_sdk_secretsmanager::Client::new(config),
            autoscaling: aws_sdk_autoscaling::Client::new(config),
        }
    }
}
