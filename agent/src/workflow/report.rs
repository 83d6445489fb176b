//! The timeline of one workflow execution, behind `rsql-agent workflow report`: where the
//! night went, job by job.
//!
//! Owns:
//! - the data model: stages (in config order) → job rows → attempts, each attempt with the
//!   time its task was scheduled, the time the job really started on an instance, its end,
//!   its outcome and what a person needs to find it (instance, exit code, `sql_state`,
//!   log stream or file);
//! - the critical path ([`Timeline::critical_path`]);
//! - the sources that build it: [`local`] (the local audit of `workflow run`) and
//!   [`stepfunctions`] (the execution history plus the DynamoDB job audit);
//! - the renderers: [`html`] (one self-contained file, inline SVG and CSS, no script) and
//!   [`text`] (a terminal view listing the same jobs).
//!
//! The queue wait of an attempt is the time from its task being scheduled (Step Functions'
//! `TaskScheduled`, or, in a local run, the moment the runner made the job ready) to the job
//! starting on an instance (the audit's `execution_start_ts`).
//!
//! Must not touch: jobs, locks, the agent's state or the audit; it only reads.

use std::time::SystemTime;

use crate::workflow::ExecutionType;

pub mod html;
pub mod local;
pub mod stepfunctions;
pub mod text;

/// Milliseconds since the Unix epoch.
pub type Ms = i64;

/// How an attempt ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Completed,
    /// Failed with this error name (`Rsql.ScriptFailed`, `Rsql.ConnectionFailed`, ...).
    Failed {
        error: String,
    },
    /// Killed after its timeout (`Rsql.Timeout`), or its task timed out (`States.Timeout`).
    TimedOut {
        error: String,
    },
    /// Its runner died while it ran (`Rsql.Interrupted`).
    Interrupted,
    /// Stopped because its task was closed (a sibling failed, the execution was stopped).
    Cancelled,
    /// Still running when the report was made.
    Running,
}

impl Outcome {
    /// The outcome a failure's error name means.
    pub fn from_error(error: &str) -> Outcome {
        match error {
            "Rsql.Timeout" | "States.Timeout" | "States.HeartbeatTimeout" => Outcome::TimedOut {
                error: error.to_string(),
            },
            "Rsql.Interrupted" => Outcome::Interrupted,
            _ => Outcome::Failed {
                error: error.to_string(),
            },
        }
    }

    /// The stable status key (`data-status` in the HTML).
    pub fn key(&self) -> &'static str {
        match self {
            Outcome::Completed => "completed",
            Outcome::Failed { .. } => "failed",
            Outcome::TimedOut { .. } => "timed_out",
            Outcome::Interrupted => "interrupted",
            Outcome::Cancelled => "cancelled",
            Outcome::Running => "running",
        }
    }

    /// What a person reads: the status, with the error name of a failure.
    pub fn label(&self) -> String {
        match self {
            Outcome::Completed => "completed".to_string(),
            Outcome::Failed { error } => format!("failed: {error}"),
            Outcome::TimedOut { error } => format!("timed out: {error}"),
            Outcome::Interrupted => "interrupted: Rsql.Interrupted".to_string(),
            Outcome::Cancelled => "cancelled".to_string(),
            Outcome::Running => "running".to_string(),
        }
    }

    /// The error name, for failures, time-outs and interruptions.
    pub fn error(&self) -> Option<&str> {
        match self {
            Outcome::Failed { error } | Outcome::TimedOut { error } => Some(error),
            Outcome::Interrupted => Some("Rsql.Interrupted"),
            _ => None,
        }
    }
}

/// One attempt of a job: one task token, one run on an instance (when it got that far).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attempt {
    /// 1-based, in the order the attempts were scheduled.
    pub number: u32,
    /// When the task was scheduled; `None` when not known.
    pub scheduled: Option<Ms>,
    /// When the job started on an instance; `None` when no source recorded it (Step
    /// Functions' history does not say; the DynamoDB audit keeps only the last attempt).
    pub started: Option<Ms>,
    /// When the job (or, without a job end, its task) ended; `None` while running.
    pub ended: Option<Ms>,
    pub outcome: Outcome,
    pub instance_id: Option<String>,
    pub exit_code: Option<i64>,
    pub sql_state: Option<String>,
    pub message: Option<String>,
    /// The CloudWatch log stream, or the local log file.
    pub log: Option<String>,
}

impl Attempt {
    /// Where the attempt's bar begins: scheduled, else started.
    pub fn begin(&self) -> Option<Ms> {
        self.scheduled.or(self.started)
    }

    /// Time waiting for a slot: scheduled → started.
    pub fn queue_wait(&self) -> Option<Ms> {
        match (self.scheduled, self.started) {
            (Some(s), Some(t)) => Some((t - s).max(0)),
            _ => None,
        }
    }

    /// The job's run time: started → ended.
    pub fn run_time(&self) -> Option<Ms> {
        match (self.started, self.ended) {
            (Some(s), Some(e)) => Some((e - s).max(0)),
            _ => None,
        }
    }
}

/// One job of a stage, with its attempts in order (none when it never ran).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobRow {
    pub job_name: String,
    pub attempts: Vec<Attempt>,
}

impl JobRow {
    /// First attempt's begin to last attempt's end.
    pub fn span(&self) -> Option<(Ms, Ms)> {
        let begin = self.attempts.iter().filter_map(Attempt::begin).min()?;
        let end = self
            .attempts
            .iter()
            .filter_map(|a| a.ended.or(a.started))
            .max()?;
        Some((begin, end.max(begin)))
    }

    /// The outcome that decided the job: its last attempt's.
    pub fn outcome(&self) -> Option<&Outcome> {
        self.attempts.last().map(|a| &a.outcome)
    }
}

/// One stage of the workflow config, in config order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StageBlock {
    /// 1-based.
    pub number: usize,
    pub description: String,
    pub execution_type: ExecutionType,
    pub enabled: bool,
    pub jobs: Vec<JobRow>,
}

impl StageBlock {
    /// Earliest begin to latest end of its jobs; `None` when none ran.
    pub fn span(&self) -> Option<(Ms, Ms)> {
        let spans: Vec<_> = self.jobs.iter().filter_map(JobRow::span).collect();
        Some((
            spans.iter().map(|s| s.0).min()?,
            spans.iter().map(|s| s.1).max()?,
        ))
    }
}

/// Where the timeline came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// `rsql-agent workflow run` and its local audit.
    Local,
    /// Step Functions' execution history and the DynamoDB job audit.
    StepFunctions,
}

/// One execution.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Timeline {
    pub source: Source,
    pub workflow_id: String,
    pub execution_id: String,
    pub execution_arn: Option<String>,
    /// As the source says it: `SUCCEEDED`/`FAILED`/... (Step Functions) or
    /// `completed`/`failed`/`running` (local audit).
    pub status: String,
    pub started: Option<Ms>,
    pub ended: Option<Ms>,
    /// The execution's error and cause, when it failed.
    pub error: Option<String>,
    pub cause: Option<String>,
    pub stages: Vec<StageBlock>,
}

/// The chain of jobs that decided the execution's length.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CriticalPath {
    /// `(stage number, job name)`, first to last.
    pub jobs: Vec<(usize, String)>,
    /// From the first job's scheduling to the last job's end.
    pub length_ms: Ms,
    /// The part of it the chain's jobs spent waiting for a slot.
    pub queue_wait_ms: Ms,
}

impl CriticalPath {
    pub fn contains(&self, stage: usize, job: &str) -> bool {
        self.jobs.iter().any(|(s, j)| *s == stage && j == job)
    }
}

impl Timeline {
    /// The left edge of the picture: the execution's start, or the first attempt's begin.
    pub fn origin(&self) -> Option<Ms> {
        let first = self
            .stages
            .iter()
            .filter_map(|s| s.span())
            .map(|s| s.0)
            .min();
        match (self.started, first) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// The right edge: the execution's end, or the last attempt's end.
    pub fn end(&self) -> Option<Ms> {
        let last = self
            .stages
            .iter()
            .filter_map(|s| s.span())
            .map(|s| s.1)
            .max();
        match (self.ended, last) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        }
    }

    /// Origin to end.
    pub fn duration_ms(&self) -> Option<Ms> {
        Some(self.end()? - self.origin()?)
    }

    /// Every attempt, with its stage and job, in stage, job and attempt order.
    pub fn attempts(&self) -> impl Iterator<Item = (&StageBlock, &JobRow, &Attempt)> {
        self.stages.iter().flat_map(|s| {
            s.jobs
                .iter()
                .flat_map(move |j| j.attempts.iter().map(move |a| (s, j, a)))
        })
    }

    /// The critical path: the job that ended last, then, going back, whatever it waited for:
    /// in a sequential stage the job before it, else the job of the previous stage that
    /// ended last (a stage starts when its previous stage has ended). A job's part of the
    /// path runs from its first scheduling to its last attempt's end, queue waits and
    /// retries included: that is where the time went.
    pub fn critical_path(&self) -> CriticalPath {
        let ran: Vec<&StageBlock> = self.stages.iter().filter(|s| s.span().is_some()).collect();
        let last_of = |stage: &StageBlock| -> Option<usize> {
            stage
                .jobs
                .iter()
                .enumerate()
                .filter_map(|(i, j)| j.span().map(|s| (i, s.1)))
                // The latest end; on a tie, the later job in config order.
                .max_by_key(|(i, end)| (*end, *i))
                .map(|(i, _)| i)
        };
        let mut chain: Vec<(&StageBlock, &JobRow)> = Vec::new();
        let mut stage_idx = ran.len();
        let mut job: Option<usize> = None;
        while stage_idx > 0 {
            let stage = ran[stage_idx - 1];
            let current = match job {
                Some(j) => j,
                None => match last_of(stage) {
                    Some(j) => j,
                    None => break,
                },
            };
            chain.push((stage, &stage.jobs[current]));
            // What it waited for.
            let before = if stage.execution_type == ExecutionType::Sequential {
                (0..current).rev().find(|&i| stage.jobs[i].span().is_some())
            } else {
                None
            };
            match before {
                Some(i) => job = Some(i),
                None => {
                    stage_idx -= 1;
                    job = None;
                }
            }
        }
        chain.reverse();
        let (Some(first), Some(last)) = (chain.first(), chain.last()) else {
            return CriticalPath::default();
        };
        let begin = first.1.span().map(|s| s.0).unwrap_or_default();
        let end = last.1.span().map(|s| s.1).unwrap_or_default();
        CriticalPath {
            queue_wait_ms: chain
                .iter()
                .flat_map(|(_, j)| j.attempts.iter())
                .filter_map(Attempt::queue_wait)
                .sum(),
            jobs: chain
                .iter()
                .map(|(s, j)| (s.number, j.job_name.clone()))
                .collect(),
            length_ms: end - begin,
        }
    }

    /// Jobs whose last attempt completed, and all jobs.
    pub fn completed_jobs(&self) -> (usize, usize) {
        let jobs = self.stages.iter().flat_map(|s| s.jobs.iter());
        let total = jobs.clone().count();
        let done = jobs
            .filter(|j| j.outcome() == Some(&Outcome::Completed))
            .count();
        (done, total)
    }
}

/// An RFC 3339 time (`Z` or `+00:00`, with or without fractions) as ms since the epoch.
pub fn parse_ts(text: &str) -> Option<Ms> {
    let text = text.trim();
    let text = text
        .strip_suffix("+00:00")
        .map(|t| format!("{t}Z"))
        .unwrap_or_else(|| text.to_string());
    let time = humantime::parse_rfc3339_weak(text.trim_end_matches('Z')).ok()?;
    Some(to_ms(time))
}

pub(crate) fn to_ms(time: SystemTime) -> Ms {
    match time.duration_since(SystemTime::UNIX_EPOCH) {
        Ok(d) => d.as_millis() as Ms,
        Err(e) => -(e.duration().as_millis() as Ms),
    }
}

/// `2026-11-25 19:42:19Z` (UTC, to the second).
pub fn format_utc(ms: Ms) -> String {
    let time = SystemTime::UNIX_EPOCH + std::time::Duration::from_millis(ms.max(0) as u64);
    humantime::format_rfc3339_seconds(time)
        .to_string()
        .replacen('T', " ", 1)
}

/// A duration as a person reads it: `850ms`, `12.3s`, `4m 05s`, `2h 03m`.
pub fn format_duration(ms: Ms) -> String {
    let ms = ms.max(0);
    if ms < 1000 {
        format!("{ms}ms")
    } else if ms < 60_000 {
        format!("{:.1}s", ms as f64 / 1000.0)
    } else if ms < 3_600_000 {
        format!("{}m {:02}s", ms / 60_000, (ms / 1000) % 60)
    } else {
        format!("{}h {:02}m", ms / 3_600_000, (ms / 60_000) % 60)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub fn attempt(scheduled: Ms, started: Ms, ended: Ms, outcome: Outcome) -> Attempt {
        Attempt {
            number: 1,
            scheduled: Some(scheduled),
            started: Some(started),
            ended: Some(ended),
            outcome,
            instance_id: Some("i-0a".into()),
            exit_code: Some(0),
            sql_state: None,
            message: None,
            log: Some("stream".into()),
        }
    }

    pub fn job(name: &str, attempts: Vec<Attempt>) -> JobRow {
        JobRow {
            job_name: name.into(),
            attempts,
        }
    }

    pub fn stage(number: usize, kind: ExecutionType, jobs: Vec<JobRow>) -> StageBlock {
        StageBlock {
            number,
            description: format!("stage {number}"),
            execution_type: kind,
            enabled: true,
            jobs,
        }
    }

    pub fn timeline(stages: Vec<StageBlock>) -> Timeline {
        Timeline {
            source: Source::Local,
            workflow_id: "wf".into(),
            execution_id: "ex".into(),
            execution_arn: None,
            status: "completed".into(),
            started: Some(0),
            ended: None,
            error: None,
            cause: None,
            stages,
        }
    }

    use ExecutionType::{Parallel, Sequential};
    use Outcome::Completed;

    /// The blog workflow's shape: two sequential jobs, then two parallel stages of two.
    fn blog() -> Timeline {
        timeline(vec![
            stage(
                1,
                Sequential,
                vec![
                    job("s1", vec![attempt(0, 10, 1000, Completed)]),
                    job("s2", vec![attempt(1000, 1010, 3000, Completed)]),
                ],
            ),
            stage(
                2,
                Parallel,
                vec![
                    // One slot: s4 waits for s3.
                    job("s3", vec![attempt(3000, 3010, 5000, Completed)]),
                    job("s4", vec![attempt(3000, 5010, 6000, Completed)]),
                ],
            ),
            stage(
                3,
                Parallel,
                vec![
                    job("s5", vec![attempt(6000, 6010, 9000, Completed)]),
                    job("s6", vec![attempt(6000, 6020, 7000, Completed)]),
                ],
            ),
        ])
    }

    #[test]
    fn critical_path_follows_sequential_jobs_and_each_stages_last_job() {
        let path = blog().critical_path();
        let names: Vec<&str> = path.jobs.iter().map(|(_, j)| j.as_str()).collect();
        assert_eq!(names, ["s1", "s2", "s4", "s5"]);
        assert_eq!(path.length_ms, 9000);
        // s1 10, s2 10, s4 2010 (waited for s3's slot), s5 10.
        assert_eq!(path.queue_wait_ms, 2040);
        assert!(path.contains(2, "s4"));
        assert!(!path.contains(2, "s3"));
    }

    #[test]
    fn a_failed_stage_ends_the_path_and_retries_count_in_full() {
        let mut retried = attempt(3000, 3010, 4000, Outcome::from_error("Rsql.Interrupted"));
        retried.exit_code = None;
        let second = Attempt {
            number: 2,
            ..attempt(9000, 9500, 12000, Outcome::from_error("Rsql.ScriptFailed"))
        };
        let t = timeline(vec![
            stage(
                1,
                Sequential,
                vec![job("s1", vec![attempt(0, 10, 3000, Completed)])],
            ),
            stage(
                2,
                Parallel,
                vec![
                    job("s3", vec![attempt(3000, 3010, 5000, Completed)]),
                    job("fail", vec![retried, second]),
                ],
            ),
            // Never ran: not on the path.
            stage(3, Parallel, vec![job("s5", vec![])]),
        ]);
        let path = t.critical_path();
        assert_eq!(
            path.jobs,
            vec![(1, "s1".to_string()), (2, "fail".to_string())]
        );
        assert_eq!(path.length_ms, 12000);
        assert_eq!(path.queue_wait_ms, 10 + 10 + 500);
        assert_eq!(t.duration_ms(), Some(12000));
        assert_eq!(t.completed_jobs(), (2, 4));
        assert_eq!(t.stages[1].span(), Some((3000, 12000)));
        assert_eq!(t.stages[2].span(), None);
    }

    #[test]
    fn an_execution_with_no_job_run_has_an_empty_path() {
        let t = timeline(vec![stage(1, Parallel, vec![job("a", vec![])])]);
        assert_eq!(t.critical_path(), CriticalPath::default());
        assert_eq!(t.duration_ms(), None);
    }

    #[test]
    fn outcomes_from_error_names() {
        assert_eq!(Outcome::from_error("States.Timeout").key(), "timed_out");
        assert_eq!(Outcome::from_error("Rsql.Timeout").key(), "timed_out");
        assert_eq!(Outcome::from_error("Rsql.Interrupted").key(), "interrupted");
        let failed = Outcome::from_error("Rsql.ConnectionFailed");
        assert_eq!(failed.key(), "failed");
        assert_eq!(failed.error(), Some("Rsql.ConnectionFailed"));
        assert_eq!(failed.label(), "failed: Rsql.ConnectionFailed");
    }

    #[test]
    fn times_parse_and_format() {
        let a = parse_ts("2026-01-01T00:00:01.250Z").unwrap();
        assert_eq!(parse_ts("2026-01-01T00:00:01.250+00:00"), Some(a));
        assert_eq!(parse_ts("2026-01-01T00:00:00Z"), Some(a - 1250));
        assert_eq!(parse_ts("yesterday"), None);
        assert_eq!(format_utc(a), "2026-01-01 00:00:01Z");
        assert_eq!(format_duration(850), "850ms");
        assert_eq!(format_duration(12_340), "12.3s");
        assert_eq!(format_duration(245_000), "4m 05s");
        assert_eq!(format_duration(7_380_000), "2h 03m");
    }
}
