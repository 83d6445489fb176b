//! `[report.audit]`: the DynamoDB audit tables and the values their items carry.

use serde::Deserialize;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawReport {
    pub(super) audit: Option<RawAudit>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAudit {
    job_table: Option<String>,
    workflow_table: Option<String>,
    format: Option<AuditFormat>,
}

/// `[report.audit] format`: which values the DynamoDB job audit item carries.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AuditFormat {
    /// `execution_status` `running|completed|failed|cancelled`, ISO 8601 UTC timestamps.
    #[default]
    Standard,
    /// The replaced framework's values, for dashboards written against its table:
    /// `triggered|successful|failed` and `%m-%d-%y-%H-%M-%S` (UTC) timestamps.
    Legacy,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct AuditSettings {
    pub job_table: Option<String>,
    pub workflow_table: Option<String>,
    pub format: AuditFormat,
}

impl AuditSettings {
    pub(super) fn from_raw(raw: RawAudit) -> AuditSettings {
        AuditSettings {
            job_table: raw.job_table,
            workflow_table: raw.workflow_table,
            format: raw.format.unwrap_or_default(),
        }
    }
}
