//! The job audit table in DynamoDB, in the legacy layout: key `job_name` (hash) +
//! `workflow_execution_id` (range), one item per job of a workflow execution.
//!
//! Owns: turning a [`JobAuditRecord`] into an item (in the configured
//! [`AuditFormat`]) and the conditional write that keeps a replay from rolling a final status
//! back. The write is an `UpdateItem`: it sets the record's attributes and removes the agent's
//! own optional attributes the record leaves out (an earlier attempt's error must not linger on
//! a retry's item), so attributes that others write (the replaced framework's invoke Lambda
//! writes `ssm_command_id` first) survive. A write is accepted when
//! - no item exists yet, or the item predates the `attempt` attribute (legacy writers), or
//! - the item belongs to an earlier attempt (a Step Functions Retry starts over), or
//! - the item is the same attempt and still `running` (running -> running is an idempotent
//!   replay; running -> completed/failed/cancelled is progress).
//!
//! Anything else means the table already holds this attempt's final state, or a later
//! attempt's: [`AuditWrite::AlreadyNewer`], which is success for the caller.
//!
//! Each call makes one attempt; the outbox retries under [`crate::aws::retry`]. No
//! `DescribeTable` before writes: a missing table shows up as a rejected write.
//!
//! Must not touch: the local audit file, Step Functions, or job state.

use std::collections::HashMap;

use aws_sdk_dynamodb::config::http::HttpResponse;
use aws_sdk_dynamodb::error::{BoxError, SdkError};
use aws_sdk_dynamodb::operation::update_item::UpdateItemError;
use aws_sdk_dynamodb::types::{AttributeValue, ReturnValuesOnConditionCheckFailure};

use super::JobAuditRecord;
use crate::aws::retry::{classify, ErrorClass};
use crate::config::AuditFormat;

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
    format: AuditFormat,
}

/// The agent's own optional attributes: removed from the item when a record leaves them out.
/// `ssm_command_id` is not among them: the old invoke Lambda writes it.
const OWN_OPTIONAL: &[&str] = &[
    "execution_end_ts",
    "exit_code",
    "error_message",
    "sql_state",
    "log_group",
    "log_stream",
    "log_file",
    "duration_ms",
    "cpu_ms",
    "max_rss_mb",
    "stage",
    "log_complete",
];

impl JobAuditTable {
    /// `client` is the process's client (see [`crate::aws::AwsClients`]); `table` is
    /// `[report.audit] job_table`.
    pub fn new(client: aws_sdk_dynamodb::Client, table: impl Into<String>) -> JobAuditTable {
        JobAuditTable {
            client,
            table: table.into(),
            format: AuditFormat::Standard,
        }
    }

    /// Writes items in `format` (`[report.audit] format`).
    pub fn with_format(mut self, format: AuditFormat) -> JobAuditTable {
        self.format = format;
        self
    }

    pub fn table_name(&self) -> &str {
        &self.table
    }

    /// Writes `record` unless the table already holds this attempt's final state or a later
    /// attempt (then [`AuditWrite::AlreadyNewer`]). One attempt.
    pub async fn put(&self, record: &JobAuditRecord) -> Result<AuditWrite, DynamoAuditError> {
        let update = Update::of(item(record, self.format));
        let result = self
            .client
            .update_item()
            .table_name(&self.table)
            .set_key(Some(update.key))
            .update_expression(update.expression)
            .set_expression_attribute_names(Some(update.names))
            .set_expression_attribute_values(Some(update.values))
            .condition_expression(CONDITION)
            .expression_attribute_names("#attempt", "attempt")
            .expression_attribute_values(":attempt", number(record.attempt))
            .expression_attribute_values(
                ":running",
                AttributeValue::S(status_name("running", self.format).to_string()),
            )
            // Only to say in the log what the replay lost to; the decision is DynamoDB's.
            .return_values_on_condition_check_failure(ReturnValuesOnConditionCheckFailure::AllOld)
            .send()
            .await;
        match result {
            Ok(_) => Ok(AuditWrite::Written),
            Err(SdkError::ServiceError(service))
                if matches!(
                    service.err(),
                    UpdateItemError::ConditionalCheckFailedException(_)
                ) =>
            {
                let existing = match service.err() {
                    UpdateItemError::ConditionalCheckFailedException(e) => e.item(),
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

    fn error(&self, err: SdkError<UpdateItemError, HttpResponse>) -> DynamoAuditError {
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

/// An `UpdateItem` that makes the item hold exactly an item's attributes, except attributes
/// that others write.
struct Update {
    key: HashMap<String, AttributeValue>,
    expression: String,
    names: HashMap<String, String>,
    values: HashMap<String, AttributeValue>,
}

impl Update {
    fn of(mut item: HashMap<String, AttributeValue>) -> Update {
        let mut key = HashMap::new();
        for name in ["job_name", "workflow_execution_id"] {
            if let Some(value) = item.remove(name) {
                key.insert(name.to_string(), value);
            }
        }
        let mut attributes: Vec<_> = item.into_iter().collect();
        attributes.sort_by(|a, b| a.0.cmp(&b.0));
        let (mut names, mut values) = (HashMap::new(), HashMap::new());
        let mut set = Vec::new();
        for (i, (name, value)) in attributes.iter().enumerate() {
            set.push(format!("#s{i} = :s{i}"));
            names.insert(format!("#s{i}"), name.clone());
            values.insert(format!(":s{i}"), value.clone());
        }
        let mut remove = Vec::new();
        for (i, name) in OWN_OPTIONAL
            .iter()
            .filter(|n| !attributes.iter().any(|(a, _)| a == *n))
            .enumerate()
        {
            remove.push(format!("#r{i}"));
            names.insert(format!("#r{i}"), name.to_string());
        }
        let mut expression = format!("SET {}", set.join(", "));
        if !remove.is_empty() {
            expression.push_str(&format!(" REMOVE {}", remove.join(", ")));
        }
        Update {
            key,
            expression,
            names,
            values,
        }
    }
}

/// `execution_status` as `format` writes it. Legacy: `running` is the old `triggered`,
/// `completed` is `successful`, and a cancelled job (its task closed upstream) is `failed`,
/// the only other final value the old dashboards know.
pub fn status_name(status: &str, format: AuditFormat) -> &str {
    match (format, status) {
        (AuditFormat::Standard, status) => status,
        (AuditFormat::Legacy, "running") => "triggered",
        (AuditFormat::Legacy, "completed") => "successful",
        (AuditFormat::Legacy, "cancelled") => "failed",
        (AuditFormat::Legacy, status) => status,
    }
}

/// A timestamp as `format` writes it: the record's ISO 8601 UTC, or for the legacy format
/// `%m-%d-%y-%H-%M-%S` in UTC (a timestamp that does not parse is kept as it is).
pub fn timestamp(iso: &str, format: AuditFormat) -> String {
    if format == AuditFormat::Standard {
        return iso.to_string();
    }
    let Ok(at) = humantime::parse_rfc3339_weak(iso.trim_end_matches('Z')) else {
        return iso.to_string();
    };
    // "YYYY-MM-DDTHH:MM:SSZ"
    let text = humantime::format_rfc3339_seconds(at).to_string();
    let part = |range: std::ops::Range<usize>| text.get(range).unwrap_or("00");
    format!(
        "{}-{}-{}-{}-{}-{}",
        part(5..7),
        part(8..10),
        part(2..4),
        part(11..13),
        part(14..16),
        part(17..19)
    )
}

/// The item for a record: the legacy attribute names, `None` fields left out (DynamoDB has
/// no use for nulls and the legacy readers test for absence), numbers as `N`; the status and
/// timestamps in `format`.
pub fn item(record: &JobAuditRecord, format: AuditFormat) -> HashMap<String, AttributeValue> {
    let mut item = HashMap::new();
    let status = status_name(&record.execution_status, format).to_string();
    let start = timestamp(&record.execution_start_ts, format);
    let end = record
        .execution_end_ts
        .as_deref()
        .map(|ts| timestamp(ts, format));
    let mut s = |name: &str, value: Option<&String>| {
        if let Some(value) = value {
            item.insert(name.to_string(), AttributeValue::S(value.clone()));
        }
    };
    s("job_name", Some(&record.job_name));
    s("workflow_execution_id", Some(&record.workflow_execution_id));
    s("workflow_id", Some(&record.workflow_id));
    s("execution_status", Some(&status));
    s("execution_start_ts", Some(&start));
    s("execution_end_ts", end.as_ref());
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
        let item = item(&record, AuditFormat::Standard);
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
        item(&record, AuditFormat::Standard)
    }

    #[test]
    fn legacy_format_writes_the_old_values_and_timestamps() {
        let legacy = |status: &str| status_name(status, AuditFormat::Legacy).to_string();
        assert_eq!(legacy("running"), "triggered");
        assert_eq!(legacy("completed"), "successful");
        assert_eq!(legacy("failed"), "failed");
        assert_eq!(legacy("cancelled"), "failed");
        assert_eq!(status_name("completed", AuditFormat::Standard), "completed");
        assert_eq!(
            timestamp("2026-03-07T21:04:05.678Z", AuditFormat::Legacy),
            "03-07-26-21-04-05"
        );
        assert_eq!(
            timestamp("2026-03-07T21:04:05.678Z", AuditFormat::Standard),
            "2026-03-07T21:04:05.678Z"
        );
    }

    #[test]
    fn the_update_sets_the_record_and_removes_only_the_agents_own_leftovers() {
        let mut item = HashMap::new();
        for (k, v) in [
            ("job_name", "j"),
            ("workflow_execution_id", "e"),
            ("execution_status", "running"),
            ("error_message", "x"),
        ] {
            item.insert(k.to_string(), AttributeValue::S(v.to_string()));
        }
        let update = Update::of(item);
        assert_eq!(update.key.len(), 2);
        let set = update.expression.split(" REMOVE ").next().unwrap();
        assert_eq!(set.matches(" = ").count(), 2, "{}", update.expression);
        let removed: Vec<&String> = update
            .names
            .iter()
            .filter(|(k, _)| k.starts_with("#r"))
            .map(|(_, v)| v)
            .collect();
        assert!(removed.iter().any(|n| *n == "exit_code"), "{removed:?}");
        assert!(
            !removed.iter().any(|n| *n == "error_message"),
            "{removed:?}"
        );
        assert!(
            !removed.iter().any(|n| *n == "ssm_command_id"),
            "{removed:?}"
        );
    }
}
