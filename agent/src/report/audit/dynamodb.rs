//! The job audit table in DynamoDB, in the legacy layout: key `job_name` (hash) +
//! `workflow_execution_id` (range), one item per job of a workflow execution.
//!
//! Owns: turning a [`JobAuditRecord`] into an item and the conditional write that keeps a
//! replay from rolling a final status back. A write is accepted when
//! - no item exists yet, or the item predates the `attempt` attribute (legacy writers), or
//! - the item belongs to an earlier attempt (a Step Functions Retry starts over), or
//! - the item is the same attempt and still `running` (running -> running is an idempotent
//!   replay; running -> completed/failed/cancelled is progress).
//!
//! Anything else means the table already holds this attempt's final state, or a later
//! attempt's: [`AuditWrite::AlreadyNewer`], which is success for the caller.
//!
//! Each call makes one attempt; the outbox retries under [`crate::report::retry`]. No
//! `DescribeTable` before writes: a missing table shows up as a rejected write.
//!
//! Must not touch: the local audit file, Step Functions, or job state.

use std::collections::HashMap;

use aws_sdk_dynamodb::config::http::HttpResponse;
use aws_sdk_dynamodb::error::{BoxError, SdkError};
use aws_sdk_dynamodb::operation::put_item::PutItemError;
use aws_sdk_dynamodb::types::{AttributeValue, ReturnValuesOnConditionCheckFailure};

use super::JobAuditRecord;
use crate::report::retry::{classify, ErrorClass};

/// The condition described in the module doc. `attribute_not_exists(job_name)` is "no item".
const CONDITION: &str = "attribute_not_exists(job_name) OR attribute_not_exists(#attempt) \
     OR #attempt < :attempt OR (#attempt = :attempt AND execution_status = :running)";

/// What a write did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuditWrite {
    /// The item now holds this record.
    Written,
    /// The table already holds this attempt at or past this state, or a later attempt: the
    /// record was a replay and the item is unchanged. The fields tell what is there, when
    /// DynamoDB returned the item.
    AlreadyNewer {
        existing_status: Option<String>,
        existing_attempt: Option<u32>,
    },
}

/// A failed audit write.
#[derive(Debug, thiserror::Error)]
pub enum DynamoAuditError {
    /// Throttling, a 5xx, a timeout or a network failure: try again under the retry policy.
    #[error("audit write to {table} failed, worth retrying: {detail}")]
    Retryable {
        table: String,
        detail: String,
        #[source]
        source: BoxError,
    },
    /// DynamoDB refused the write (missing table, permissions, a bad item): log loudly and
    /// retry slowly, since tables and permissions get fixed.
    #[error("audit write to {table} was rejected: {detail}")]
    Rejected {
        table: String,
        code: Option<String>,
        detail: String,
        #[source]
        source: BoxError,
    },
}

impl DynamoAuditError {
    pub fn class(&self) -> ErrorClass {
        match self {
            DynamoAuditError::Retryable { .. } => ErrorClass::Retryable,
            DynamoAuditError::Rejected { .. } => ErrorClass::Rejected,
        }
    }
}

/// The legacy job audit table.
#[derive(Debug, Clone)]
pub struct JobAuditTable {
    client: aws_sdk_dynamodb::Client,
    table: String,
}

impl JobAuditTable {
    /// `client` is the process's client (see [`crate::aws::AwsClients`]); `table` is
    /// `[report.audit] job_table`.
    pub fn new(client: aws_sdk_dynamodb::Client, table: impl Into<String>) -> JobAuditTable {
        JobAuditTable {
            client,
            table: table.into(),
        }
    }

    pub fn table_name(&self) -> &str {
        &self.table
    }

    /// Writes `record` unless the table already holds this attempt's final state or a later
    /// attempt (then [`AuditWrite::AlreadyNewer`]). One attempt.
    pub async fn put(&self, record: &JobAuditRecord) -> Result<AuditWrite, DynamoAuditError> {
        let result = self
            .client
            .put_item()
            .table_name(&self.table)
            .set_item(Some(item(record)))
            .condition_expression(CONDITION)
            .expression_attribute_names("#attempt", "attempt")
            .expression_attribute_values(":attempt", number(record.attempt))
            .expression_attribute_values(":running", AttributeValue::S("running".to_string()))
            // Only to say in the log what the replay lost to; the decision is DynamoDB's.
            .return_values_on_condition_check_failure(ReturnValuesOnConditionCheckFailure::AllOld)
            .send()
            .await;
        match result {
            Ok(_) => Ok(AuditWrite::Written),
            Err(SdkError::ServiceError(service))
                if matches!(
                    service.err(),
                    PutItemError::ConditionalCheckFailedException(_)
                ) =>
            {
                let existing = match service.err() {
                    PutItemError::ConditionalCheckFailedException(e) => e.item(),
                    _ => None,
                };
                Ok(AuditWrite::AlreadyNewer {
                    existing_status: existing
                        .and_then(|item| item.get("execution_status"))
                        .and_then(|v| v.as_s().ok())
                        .cloned(),
                    existing_attempt: existing
                        .and_then(|item| item.get("attempt"))
                        .and_then(|v| v.as_n().ok())
                        .and_then(|n| n.parse().ok()),
                })
            }
            Err(err) => Err(self.error(err)),
        }
    }

    fn error(&self, err: SdkError<PutItemError, HttpResponse>) -> DynamoAuditError {
        let failed = classify(&err);
        match failed.class {
            ErrorClass::Retryable => DynamoAuditError::Retryable {
                table: self.table.clone(),
                detail: failed.detail,
                source: Box::new(err),
            },
            ErrorClass::Rejected => DynamoAuditError::Rejected {
                table: self.table.clone(),
                code: failed.code,
                detail: failed.detail,
                source: Box::new(err),
            },
        }
    }
}

fn number(n: impl ToString) -> AttributeValue {
    AttributeValue::N(n.to_string())
}

/// The item for a record: the legacy attribute names, `None` fields left out (DynamoDB has
/// no use for nulls and the legacy readers test for absence), numbers as `N`.
pub fn item(record: &JobAuditRecord) -> HashMap<String, AttributeValue> {
    let mut item = HashMap::new();
    let mut s = |name: &str, value: Option<&String>| {
        if let Some(value) = value {
            item.insert(name.to_string(), AttributeValue::S(value.clone()));
        }
    };
    s("job_name", Some(&record.job_name));
    s("workflow_execution_id", Some(&record.workflow_execution_id));
    s("workflow_id", Some(&record.workflow_id));
    s("execution_status", Some(&record.execution_status));
    s("execution_start_ts", Some(&record.execution_start_ts));
    s("execution_end_ts", record.execution_end_ts.as_ref());
    s("instance_id", Some(&record.instance_id));
    s("error_message", record.error_message.as_ref());
    s("sql_state", record.sql_state.as_ref());
    s("log_group", record.log_group.as_ref());
    s("log_stream", record.log_stream.as_ref());
    s("log_file", record.log_file.as_ref());
    s("ssm_command_id", record.ssm_command_id.as_ref());
    s("stage", record.stage.as_ref());
    item.insert("attempt".to_string(), number(record.attempt));
    if let Some(code) = record.exit_code {
        item.insert("exit_code".to_string(), number(code));
    }
    if let Some(ms) = record.duration_ms {
        item.insert("duration_ms".to_string(), number(ms));
    }
    if let Some(ms) = record.cpu_ms {
        item.insert("cpu_ms".to_string(), number(ms));
    }
    if let Some(mb) = record.max_rss_mb {
        item.insert("max_rss_mb".to_string(), number(mb));
    }
    if let Some(complete) = record.log_complete {
        item.insert("log_complete".to_string(), AttributeValue::Bool(complete));
    }
    item
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn item_uses_legacy_names_skips_none_and_types_numbers() {
        let record = JobAuditRecord {
            job_name: "rsql_blog_script_1.sh".into(),
            workflow_execution_id: "demo_test_26".into(),
            workflow_id: "blog_test_workflow".into(),
            execution_status: "failed".into(),
            execution_start_ts: "2026-01-01T00:00:00.000Z".into(),
            execution_end_ts: Some("2026-01-01T00:00:05.000Z".into()),
            instance_id: "i-0abc".into(),
            exit_code: Some(-3),
            error_message: Some("Rsql.ScriptFailed: boom".into()),
            sql_state: None,
            log_group: Some("/ops/rsql-logs/".into()),
            log_stream: None,
            log_file: None,
            attempt: 2,
            duration_ms: Some(5000),
            cpu_ms: None,
            max_rss_mb: None,
            log_complete: None,
            ssm_command_id: None,
            stage: None,
        };
        let item = item(&record);
        assert_eq!(
            item["job_name"],
            AttributeValue::S("rsql_blog_script_1.sh".into())
        );
        assert_eq!(
            item["workflow_execution_id"],
            AttributeValue::S("demo_test_26".into())
        );
        assert_eq!(item["attempt"], AttributeValue::N("2".into()));
        assert_eq!(item["exit_code"], AttributeValue::N("-3".into()));
        assert_eq!(item["duration_ms"], AttributeValue::N("5000".into()));
        assert_eq!(
            item["execution_end_ts"],
            AttributeValue::S("2026-01-01T00:00:05.000Z".into())
        );
        for absent in [
            "sql_state",
            "log_stream",
            "log_file",
            "ssm_command_id",
            "stage",
            "cpu_ms",
            "max_rss_mb",
        ] {
            assert!(!item.contains_key(absent), "{absent} should be left out");
        }
        assert_eq!(item.len(), 12);
        let measured = item_of(JobAuditRecord {
            cpu_ms: Some(1042),
            max_rss_mb: Some(87),
            ..record
        });
        assert_eq!(measured["cpu_ms"], AttributeValue::N("1042".into()));
        assert_eq!(measured["max_rss_mb"], AttributeValue::N("87".into()));
    }

    fn item_of(record: JobAuditRecord) -> HashMap<String, AttributeValue> {
        item(&record)
    }
}
