//! The SQS intake: long-polls the job queue, keeps in-flight messages hidden, deletes them.
//!
//! Owns: `ReceiveMessage` (only as many as there are free job slots), `ChangeMessageVisibility`
//! and `DeleteMessage`. SQS is transport only: a message is deleted once its outcome is
//! durable in the outbox, never before.
//!
//! Must not touch: job parsing, locks or reporting.

use std::time::Duration;

use aws_sdk_sqs::error::DisplayErrorContext;
use aws_sdk_sqs::types::MessageSystemAttributeName;

use crate::config::SqsSettings;

#[derive(Debug, thiserror::Error)]
pub enum SqsError {
    #[error("SQS {op} on {queue_url} failed: {message}")]
    Call {
        op: &'static str,
        queue_url: String,
        message: String,
    },
}

/// One received message.
#[derive(Debug, Clone)]
pub struct Delivery {
    pub message_id: String,
    pub receipt_handle: String,
    pub body: String,
    /// How many times SQS has handed this message out, this time included.
    pub receive_count: u32,
    /// When the message was sent (its `SentTimestamp`, ms since the epoch): for a Step
    /// Functions job, when its task was scheduled. A job's queue wait starts here.
    pub sent_at_ms: Option<u64>,
}

#[derive(Debug, Clone)]
pub struct SqsIntake {
    client: aws_sdk_sqs::Client,
    settings: SqsSettings,
}

impl SqsIntake {
    pub fn new(client: aws_sdk_sqs::Client, settings: SqsSettings) -> SqsIntake {
        SqsIntake { client, settings }
    }

    pub fn queue_url(&self) -> &str {
        &self.settings.queue_url
    }

    pub fn visibility_timeout(&self) -> Duration {
        self.settings.visibility_timeout
    }

    fn err<E: std::error::Error>(&self, op: &'static str, e: E) -> SqsError {
        SqsError::Call {
            op,
            queue_url: self.settings.queue_url.clone(),
            message: DisplayErrorContext(e).to_string(),
        }
    }

    /// Long-polls for at most `max` messages (1..=10).
    pub async fn receive(&self, max: usize) -> Result<Vec<Delivery>, SqsError> {
        let out = self
            .client
            .receive_message()
            .queue_url(&self.settings.queue_url)
            .max_number_of_messages(max.clamp(1, 10) as i32)
            .wait_time_seconds(self.settings.wait_time.as_secs() as i32)
            .visibility_timeout(self.settings.visibility_timeout.as_secs() as i32)
            .message_system_attribute_names(MessageSystemAttributeName::ApproximateReceiveCount)
            .message_system_attribute_names(MessageSystemAttributeName::SentTimestamp)
            .send()
            .await
            .map_err(|e| self.err("ReceiveMessage", e))?;
        Ok(out
            .messages
            .unwrap_or_default()
            .into_iter()
            .filter_map(|m| {
                let receive_count = m
                    .attributes()
                    .and_then(|a| a.get(&MessageSystemAttributeName::ApproximateReceiveCount))
                    .and_then(|c| c.parse().ok())
                    .unwrap_or(1);
                let sent_at_ms = m
                    .attributes()
                    .and_then(|a| a.get(&MessageSystemAttributeName::SentTimestamp))
                    .and_then(|t| t.parse().ok());
                Some(Delivery {
                    message_id: m.message_id.unwrap_or_default(),
                    receipt_handle: m.receipt_handle?,
                    body: m.body.unwrap_or_default(),
                    receive_count,
                    sent_at_ms,
                })
            })
            .collect())
    }

    /// Keeps a message hidden for another visibility timeout while its job runs.
    pub async fn keep_hidden(&self, receipt_handle: &str) -> Result<(), SqsError> {
        self.client
            .change_message_visibility()
            .queue_url(&self.settings.queue_url)
            .receipt_handle(receipt_handle)
            .visibility_timeout(self.settings.visibility_timeout.as_secs() as i32)
            .send()
            .await
            .map_err(|e| self.err("ChangeMessageVisibility", e))?;
        Ok(())
    }

    /// Makes a message visible again soon, for a copy this agent will not run now (its job
    /// is running elsewhere): the copy comes back after `delay` to find the job finished.
    pub async fn release(&self, receipt_handle: &str, delay: Duration) -> Result<(), SqsError> {
        self.client
            .change_message_visibility()
            .queue_url(&self.settings.queue_url)
            .receipt_handle(receipt_handle)
            .visibility_timeout(delay.as_secs().min(43_200) as i32)
            .send()
            .await
            .map_err(|e| self.err("ChangeMessageVisibility", e))?;
        Ok(())
    }

    pub async fn delete(&self, receipt_handle: &str) -> Result<(), SqsError> {
        self.client
            .delete_message()
            .queue_url(&self.settings.queue_url)
            .receipt_handle(receipt_handle)
            .send()
            .await
            .map_err(|e| self.err("DeleteMessage", e))?;
        Ok(())
    }
}
