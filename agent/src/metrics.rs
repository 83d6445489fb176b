//! Metrics for alarms and dashboards, as CloudWatch Embedded Metric Format (EMF) records.
//!
//! Owns: the shape of every metric record, the agent's metrics files under `state_dir/metrics`,
//! and that file's shipment to a stream of the job log group. CloudWatch turns each record
//! into metrics as it arrives, so metrics cost no `PutMetricData` call, no extra IAM right
//! and no extra connection: they ride the shipper that already tails job logs.
//!
//! Must not touch: jobs, the outbox or the slots. The daemon hands in what happened
//! ([`JobEnd`]) and what it sees ([`Gauges`]); this module only writes it down.
//!
//! # Records
//!
//! Namespace `[metrics] namespace` (default `RsqlAgent`); every record carries the
//! dimensions `Fleet` (`[metrics] fleet`) and, for job metrics, `WorkflowId`.
//!
//! | metric | unit | when | dimension sets |
//! |---|---|---|---|
//! | `JobsCompleted` | Count | a job ended `completed` | `Fleet`; `Fleet, WorkflowId` |
//! | `JobsFailed` | Count | a job ended failed (`ErrorName` = the error, e.g. `Rsql.ScriptFailed`) | `Fleet`; `Fleet, ErrorName`; `Fleet, WorkflowId, ErrorName` |
//! | `JobsCancelled` | Count | a job was stopped because its task closed | `Fleet`; `Fleet, WorkflowId` |
//! | `JobDurationMs` | Milliseconds | every job end | `Fleet`; `Fleet, WorkflowId` |
//! | `QueueWaitMs` | Milliseconds | every job end of an SQS job: message sent (task scheduled) to job started | `Fleet`; `Fleet, WorkflowId` |
//! | `RunningJobs`, `FreeSlots`, `OutboxDepth` | Count | every `[metrics] interval` | `Fleet`; `Fleet, InstanceId` |
//!
//! Each record also has plain properties for CloudWatch Logs Insights (`InstanceId`,
//! `JobName`, `WorkflowExecutionId`, `Status`). A job end is written once per run, when
//! the agent reports it; a crash of the agent between that write and the report's
//! clean-up may write it a second time (metrics are not the audit).

use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{json, Map, Value};

use crate::config::MetricsSettings;
use crate::joblog::cloudwatch::{Shipment, Shipper, ShipperError};
use crate::joblog::{JobLog, JobLogError, Stream};

#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("cannot open the metrics file: {0}")]
    File(#[from] JobLogError),
    #[error("cannot ship the metrics file: {0}")]
    Ship(#[from] ShipperError),
}

/// How one job ended, as the metrics see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobStatus<'a> {
    Completed,
    /// Failed, with its error name (`Rsql.ScriptFailed`, ...).
    Failed(&'a str),
    Cancelled,
}

/// One job's end.
#[derive(Debug, Clone, Copy)]
pub struct JobEnd<'a> {
    pub workflow_id: &'a str,
    pub workflow_execution_id: &'a str,
    pub job_name: &'a str,
    pub status: JobStatus<'a>,
    pub duration_ms: Option<u64>,
    /// Task scheduled (message sent) to job started; `None` for a job that came from the
    /// local socket.
    pub queue_wait_ms: Option<u64>,
}

/// What one agent sees, every interval.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Gauges {
    pub running_jobs: usize,
    pub free_slots: usize,
    pub outbox_depth: usize,
}

fn millis(at: SystemTime) -> u64 {
    at.duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// One EMF metric directive: `metrics` as `(name, unit)` under `dimensions`.
fn directive(namespace: &str, dimensions: &[&[&str]], metrics: &[(&str, &str)]) -> Value {
    json!({
        "Namespace": namespace,
        "Dimensions": dimensions,
        "Metrics": metrics
            .iter()
            .map(|(name, unit)| json!({"Name": name, "Unit": unit}))
            .collect::<Vec<_>>(),
    })
}

fn record(at: SystemTime, directives: Vec<Value>, members: Map<String, Value>) -> Value {
    let mut root = Map::new();
    root.insert(
        "_aws".into(),
        json!({"Timestamp": millis(at), "CloudWatchMetrics": directives}),
    );
    root.extend(members);
    Value::Object(root)
}

/// The EMF record of one job's end.
pub fn job_end_record(
    settings: &MetricsSettings,
    instance_id: &str,
    end: &JobEnd<'_>,
    at: SystemTime,
) -> Value {
    let ns = settings.namespace.as_str();
    let per_workflow: &[&[&str]] = &[&["Fleet"], &["Fleet", "WorkflowId"]];
    let mut members = Map::new();
    members.insert("Fleet".into(), json!(settings.fleet));
    members.insert("WorkflowId".into(), json!(end.workflow_id));
    members.insert("InstanceId".into(), json!(instance_id));
    members.insert("JobName".into(), json!(end.job_name));
    members.insert(
        "WorkflowExecutionId".into(),
        json!(end.workflow_execution_id),
    );
    let mut directives = Vec::new();
    let status = match end.status {
        JobStatus::Completed => {
            directives.push(directive(ns, per_workflow, &[("JobsCompleted", "Count")]));
            members.insert("JobsCompleted".into(), json!(1));
            "completed"
        }
        JobStatus::Failed(error) => {
            directives.push(directive(
                ns,
                &[
                    &["Fleet"],
                    &["Fleet", "ErrorName"],
                    &["Fleet", "WorkflowId", "ErrorName"],
                ],
                &[("JobsFailed", "Count")],
            ));
            members.insert("JobsFailed".into(), json!(1));
            members.insert("ErrorName".into(), json!(error));
            "failed"
        }
        JobStatus::Cancelled => {
            directives.push(directive(ns, per_workflow, &[("JobsCancelled", "Count")]));
            members.insert("JobsCancelled".into(), json!(1));
            "cancelled"
        }
    };
    members.insert("Status".into(), json!(status));
    let mut timings = Vec::new();
    if let Some(ms) = end.duration_ms {
        timings.push(("JobDurationMs", "Milliseconds"));
        members.insert("JobDurationMs".into(), json!(ms));
    }
    if let Some(ms) = end.queue_wait_ms {
        timings.push(("QueueWaitMs", "Milliseconds"));
        members.insert("QueueWaitMs".into(), json!(ms));
    }
    if !timings.is_empty() {
        directives.push(directive(ns, per_workflow, &timings));
    }
    record(at, directives, members)
}

/// The EMF record of one agent's gauges.
pub fn gauges_record(
    settings: &MetricsSettings,
    instance_id: &str,
    gauges: &Gauges,
    at: SystemTime,
) -> Value {
    let mut members = Map::new();
    members.insert("Fleet".into(), json!(settings.fleet));
    members.insert("InstanceId".into(), json!(instance_id));
    members.insert("RunningJobs".into(), json!(gauges.running_jobs));
    members.insert("FreeSlots".into(), json!(gauges.free_slots));
    members.insert("OutboxDepth".into(), json!(gauges.outbox_depth));
    record(
        at,
        vec![directive(
            &settings.namespace,
            &[&["Fleet"], &["Fleet", "InstanceId"]],
            &[
                ("RunningJobs", "Count"),
                ("FreeSlots", "Count"),
                ("OutboxDepth", "Count"),
            ],
        )],
        members,
    )
}

/// The queue wait of a job: from its message's `SentTimestamp` to its start.
pub fn queue_wait_ms(sent_at_ms: Option<u64>, started_at: SystemTime) -> Option<u64> {
    sent_at_ms.map(|sent| millis(started_at).saturating_sub(sent))
}

/// The CloudWatch stream of one agent run's metrics:
/// `rsql-agent-metrics/<instance id>/<UTC start YYYYMMDDTHHMMSSZ>`.
pub fn stream_name(instance_id: &str, started_at: SystemTime) -> String {
    let id: String = instance_id
        .chars()
        .map(|c| {
            if c == ':' || c == '*' || c == '/' || c.is_control() {
                '_'
            } else {
                c
            }
        })
        .take(200)
        .collect();
    format!(
        "rsql-agent-metrics/{id}/{}",
        crate::joblog::compact_utc(started_at)
    )
}

/// How long the metrics files of earlier runs are kept (they are shipped within seconds).
pub const KEEP_FILES: Duration = Duration::from_secs(7 * 24 * 3600);

fn remove_old_files(dir: &Path, now: SystemTime) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let old = entry
            .metadata()
            .and_then(|m| m.modified())
            .is_ok_and(|at| now.duration_since(at).is_ok_and(|age| age > KEEP_FILES));
        if old && entry.path().extension().is_some_and(|x| x == "log") {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

/// The agent's metrics: a local file of EMF records, shipped to the job log group.
#[derive(Debug)]
pub struct Metrics {
    settings: MetricsSettings,
    instance_id: String,
    log: Mutex<JobLog>,
    shipment: Mutex<Option<Shipment>>,
}

impl Metrics {
    /// Opens this run's metrics file, `state_dir/metrics/<start>.<pid>.log` (out of the job
    /// log directory, which holds job logs only), removes files of earlier runs older than
    /// [`KEEP_FILES`], and starts shipping the new one. Must be called inside the tokio
    /// runtime, after the shipper has resumed what earlier runs left unshipped.
    pub fn open(
        settings: &MetricsSettings,
        state_dir: &Path,
        instance_id: &str,
        shipper: &Shipper,
    ) -> Result<Metrics, MetricsError> {
        let started_at = SystemTime::now();
        let dir = state_dir.join("metrics");
        remove_old_files(&dir, started_at);
        let log = JobLog::open(&dir.join(format!(
            "{}.{}.log",
            crate::joblog::compact_utc(started_at),
            std::process::id()
        )))?;
        let shipment = shipper.start(log.path(), &stream_name(instance_id, started_at))?;
        tracing::info!(
            file = %log.path().display(),
            log_stream = shipment.log_stream(),
            namespace = %settings.namespace,
            fleet = %settings.fleet,
            "writing metrics (CloudWatch embedded metric format)"
        );
        Ok(Metrics {
            settings: settings.clone(),
            instance_id: instance_id.to_string(),
            log: Mutex::new(log),
            shipment: Mutex::new(Some(shipment)),
        })
    }

    pub fn interval(&self) -> Duration {
        self.settings.interval
    }

    pub fn job_end(&self, end: &JobEnd<'_>) {
        let at = SystemTime::now();
        self.write(
            at,
            &job_end_record(&self.settings, &self.instance_id, end, at),
        );
    }

    pub fn gauges(&self, gauges: &Gauges) {
        let at = SystemTime::now();
        self.write(
            at,
            &gauges_record(&self.settings, &self.instance_id, gauges, at),
        );
    }

    fn write(&self, at: SystemTime, record: &Value) {
        let mut line = record.to_string();
        line.push('\n');
        // Every write is one append and a flush: a poisoned file is still consistent.
        let mut log = self.log.lock().unwrap_or_else(|e| e.into_inner());
        if let Err(e) = log
            .append(Stream::Stdout, at, line.as_bytes())
            .and_then(|()| log.flush())
        {
            tracing::warn!(error = %e, "cannot write a metrics record");
        }
    }

    /// Says this run's metrics are complete and waits at most `timeout` for them to ship
    /// (the rest ships after the next start).
    pub async fn finish(&self, timeout: Duration) {
        let shipment = self
            .shipment
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(shipment) = shipment {
            shipment.finish(timeout).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> MetricsSettings {
        MetricsSettings {
            enabled: true,
            namespace: "RsqlAgent".into(),
            fleet: "night-fleet".into(),
            interval: Duration::from_secs(60),
        }
    }

    /// The rules of the EMF specification a record must follow for CloudWatch to extract
    /// its metrics: `_aws.Timestamp` in ms; each directive a namespace, dimension sets of
    /// names that are top-level string members (at most 30 per set), and metrics whose
    /// values are top-level numbers, with a known unit.
    fn assert_valid_emf(record: &Value) -> Vec<(String, String)> {
        let aws = &record["_aws"];
        assert!(aws["Timestamp"]
            .as_u64()
            .is_some_and(|t| t > 1_600_000_000_000));
        let directives = aws["CloudWatchMetrics"].as_array().expect("directives");
        assert!(!directives.is_empty());
        let mut found = Vec::new();
        for d in directives {
            let ns = d["Namespace"].as_str().expect("namespace");
            assert!(!ns.is_empty() && ns.len() <= 255);
            for set in d["Dimensions"].as_array().expect("dimension sets") {
                let set = set.as_array().expect("a dimension set");
                assert!(!set.is_empty() && set.len() <= 30);
                for name in set {
                    let name = name.as_str().expect("dimension name");
                    assert!(
                        record[name].as_str().is_some_and(|v| !v.is_empty()),
                        "dimension {name} is not a top-level string: {record}"
                    );
                }
            }
            for m in d["Metrics"].as_array().expect("metrics") {
                let name = m["Name"].as_str().expect("metric name");
                let unit = m["Unit"].as_str().expect("unit");
                assert!(["Count", "Milliseconds"].contains(&unit), "{unit}");
                assert!(
                    record[name].is_number(),
                    "metric {name} has no numeric value: {record}"
                );
                found.push((name.to_string(), unit.to_string()));
            }
        }
        found
    }

    fn end(status: JobStatus<'_>) -> JobEnd<'_> {
        JobEnd {
            workflow_id: "blog_test_workflow",
            workflow_execution_id: "night_1",
            job_name: "rsql_blog_script_1.sh",
            status,
            duration_ms: Some(9_012),
            queue_wait_ms: Some(18_000),
        }
    }

    #[test]
    fn a_completed_job_counts_with_its_duration_and_queue_wait() {
        let r = job_end_record(
            &settings(),
            "i-1",
            &end(JobStatus::Completed),
            SystemTime::now(),
        );
        let metrics = assert_valid_emf(&r);
        let names: Vec<&str> = metrics.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["JobsCompleted", "JobDurationMs", "QueueWaitMs"]);
        assert_eq!(r["Fleet"], "night-fleet");
        assert_eq!(r["WorkflowId"], "blog_test_workflow");
        assert_eq!(r["JobDurationMs"], 9_012);
        assert_eq!(r["QueueWaitMs"], 18_000);
        assert_eq!(r["Status"], "completed");
        assert!(r.get("JobsFailed").is_none());
    }

    #[test]
    fn a_failed_job_counts_under_its_error_name_and_fleet_wide() {
        let r = job_end_record(
            &settings(),
            "i-1",
            &end(JobStatus::Failed("Rsql.ScriptFailed")),
            SystemTime::now(),
        );
        let metrics = assert_valid_emf(&r);
        assert_eq!(metrics[0].0, "JobsFailed");
        assert_eq!(r["ErrorName"], "Rsql.ScriptFailed");
        let sets = &r["_aws"]["CloudWatchMetrics"][0]["Dimensions"];
        // The alarm watches the fleet-wide set; dashboards split by error and workflow.
        assert!(sets.as_array().unwrap().contains(&json!(["Fleet"])));
        assert!(sets
            .as_array()
            .unwrap()
            .contains(&json!(["Fleet", "WorkflowId", "ErrorName"])));
        // Durations are not split by error name.
        assert_eq!(
            r["_aws"]["CloudWatchMetrics"][1]["Dimensions"],
            json!([["Fleet"], ["Fleet", "WorkflowId"]])
        );
    }

    #[test]
    fn a_socket_job_has_no_queue_wait() {
        let mut e = end(JobStatus::Cancelled);
        e.queue_wait_ms = None;
        let r = job_end_record(&settings(), "i-1", &e, SystemTime::now());
        let names: Vec<String> = assert_valid_emf(&r).into_iter().map(|(n, _)| n).collect();
        assert_eq!(names, ["JobsCancelled", "JobDurationMs"]);
    }

    #[test]
    fn gauges_carry_the_three_counts_per_fleet_and_instance() {
        let g = Gauges {
            running_jobs: 3,
            free_slots: 1,
            outbox_depth: 0,
        };
        let r = gauges_record(&settings(), "i-0abc", &g, SystemTime::now());
        let names: Vec<String> = assert_valid_emf(&r).into_iter().map(|(n, _)| n).collect();
        assert_eq!(names, ["RunningJobs", "FreeSlots", "OutboxDepth"]);
        assert_eq!(
            (r["RunningJobs"].as_u64(), r["FreeSlots"].as_u64()),
            (Some(3), Some(1))
        );
        assert_eq!(r["OutboxDepth"], 0);
        assert_eq!(r["InstanceId"], "i-0abc");
    }

    #[test]
    fn queue_wait_is_from_the_send_to_the_start_and_never_negative() {
        let start = UNIX_EPOCH + Duration::from_millis(1_000_500);
        assert_eq!(queue_wait_ms(Some(1_000_000), start), Some(500));
        assert_eq!(queue_wait_ms(Some(2_000_000), start), Some(0));
        assert_eq!(queue_wait_ms(None, start), None);
    }

    #[test]
    fn the_stream_name_is_a_valid_cloudwatch_name() {
        let name = stream_name("i-0:a*b/c", UNIX_EPOCH + Duration::from_secs(86_400));
        assert_eq!(name, "rsql-agent-metrics/i-0_a_b_c/19700102T000000Z");
    }
}
