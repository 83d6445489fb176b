//! The timeline for a terminal (`workflow report --format text`): the same header and the
//! same jobs as the HTML, one line per attempt, with a small bar on a shared time scale.
//!
//! Bar characters: `.` waiting for a slot, then the run: `=` completed, `X` failed,
//! `T` timed out, `I` interrupted, `C` cancelled, `>` running, `?` start not recorded.
//!
//! Must not touch: anything but the string it returns.

use std::fmt::Write as _;

use super::{format_duration, format_utc, Attempt, Ms, Outcome, Timeline};
use crate::workflow::{render_table, ExecutionType};

const BAR_WIDTH: usize = 40;

/// The whole report, with every control character a job or a message put in it escaped
/// ([`crate::workflow::terminal_text`]): it goes to a terminal.
pub fn render(t: &Timeline) -> String {
    let mut out = crate::workflow::terminal_text(&header(t));
    out.push('\n');
    out.push_str(&render_table(&HEADERS, &rows(t)));
    out.push_str(
        "\ntimeline: . waiting for a slot, = completed, X failed, T timed out, I interrupted, C cancelled, > running, ? start not recorded\n",
    );
    out
}

/// The execution's lines above the table: status, times, jobs done, critical path, error.
fn header(t: &Timeline) -> String {
    let mut out = String::new();
    let (done, total) = t.completed_jobs();
    let _ = writeln!(
        out,
        "workflow {}, execution {}: {}",
        if t.workflow_id.is_empty() {
            "?"
        } else {
            &t.workflow_id
        },
        t.execution_id,
        t.status
    );
    if let Some(arn) = &t.execution_arn {
        let _ = writeln!(out, "arn:           {arn}");
    }
    let _ = writeln!(
        out,
        "started:       {}",
        t.origin().map(format_utc).unwrap_or_else(|| "-".into())
    );
    let _ = writeln!(
        out,
        "ended:         {}",
        t.ended
            .map(format_utc)
            .unwrap_or_else(|| "still running".into())
    );
    let _ = writeln!(
        out,
        "total:         {}",
        t.duration_ms()
            .map(format_duration)
            .unwrap_or_else(|| "-".into())
    );
    let _ = writeln!(out, "jobs:          {done} of {total} completed");
    let path = t.critical_path();
    if path.jobs.is_empty() {
        let _ = writeln!(out, "critical path: no job ran");
    } else {
        let _ = writeln!(
            out,
            "critical path: {} ({}{})",
            path.jobs
                .iter()
                .map(|(_, j)| j.as_str())
                .collect::<Vec<_>>()
                .join(" -> "),
            format_duration(path.length_ms),
            if path.queue_wait_ms > 0 {
                format!(
                    ", {} waiting for a slot",
                    format_duration(path.queue_wait_ms)
                )
            } else {
                String::new()
            }
        );
    }
    if let Some(error) = &t.error {
        let _ = writeln!(
            out,
            "error:         {error}{}",
            t.cause
                .as_deref()
                .map(|c| {
                    let cause = super::html::readable_cause(c);
                    format!(": {}", cause.chars().take(300).collect::<String>())
                })
                .unwrap_or_default()
        );
    }
    out
}

const HEADERS: [&str; 11] = [
    "stage",
    "job",
    "try",
    "status",
    "instance",
    "exit",
    "sql_state",
    "waited",
    "ran",
    "timeline",
    "log",
];

/// The table's rows: per stage, a line for the stage, then one per attempt of each job (one
/// for a job that never ran), its bar on the execution's time scale.
fn rows(t: &Timeline) -> Vec<[String; 11]> {
    let origin = t.origin().unwrap_or_default();
    let scale = t.duration_ms().unwrap_or(0).max(1) as f64;
    let col = |ms: Ms| -> usize {
        (((ms - origin) as f64 / scale) * BAR_WIDTH as f64)
            .round()
            .clamp(0.0, BAR_WIDTH as f64) as usize
    };
    let dash = || "-".to_string();
    let mut rows: Vec<[String; 11]> = Vec::new();
    for stage in &t.stages {
        let kind = match stage.execution_type {
            ExecutionType::Sequential => "sequential",
            ExecutionType::Parallel => "parallel",
        };
        rows.push([
            stage.number.to_string(),
            format!("[{}, {kind}]", stage.description),
            String::new(),
            if stage.enabled {
                String::new()
            } else {
                "disabled".into()
            },
            String::new(),
            String::new(),
            String::new(),
            String::new(),
            stage
                .span()
                .map(|(b, e)| format_duration(e - b))
                .unwrap_or_default(),
            String::new(),
            String::new(),
        ]);
        for job in &stage.jobs {
            if job.attempts.is_empty() {
                rows.push([
                    stage.number.to_string(),
                    job.job_name.clone(),
                    dash(),
                    if stage.enabled {
                        "not run".into()
                    } else {
                        "disabled".into()
                    },
                    dash(),
                    dash(),
                    dash(),
                    dash(),
                    dash(),
                    format!("|{}|", " ".repeat(BAR_WIDTH)),
                    dash(),
                ]);
            }
            for a in &job.attempts {
                rows.push([
                    stage.number.to_string(),
                    job.job_name.clone(),
                    a.number.to_string(),
                    a.outcome.label(),
                    a.instance_id.clone().unwrap_or_else(dash),
                    a.exit_code.map(|c| c.to_string()).unwrap_or_else(dash),
                    a.sql_state.clone().unwrap_or_else(dash),
                    a.queue_wait().map(format_duration).unwrap_or_else(dash),
                    a.run_time().map(format_duration).unwrap_or_else(dash),
                    format!("|{}|", bar(a, &col)),
                    a.log.clone().unwrap_or_else(dash),
                ]);
            }
        }
    }
    rows
}

fn bar(a: &Attempt, col: &dyn Fn(Ms) -> usize) -> String {
    let mut cells = vec![' '; BAR_WIDTH];
    let run_char = match (&a.outcome, a.started.is_some()) {
        (_, false) => '?',
        (Outcome::Completed, _) => '=',
        (Outcome::Failed { .. }, _) => 'X',
        (Outcome::TimedOut { .. }, _) => 'T',
        (Outcome::Interrupted, _) => 'I',
        (Outcome::Cancelled, _) => 'C',
        (Outcome::Running, _) => '>',
    };
    if let (Some(s), Some(t)) = (a.scheduled, a.started) {
        for c in cells.iter_mut().take(col(t)).skip(col(s)) {
            *c = '.';
        }
    }
    if let Some(begin) = a.started.or(a.scheduled) {
        let end = a.ended.unwrap_or(begin);
        let from = col(begin).min(BAR_WIDTH - 1);
        let to = col(end).max(from + 1).min(BAR_WIDTH);
        for c in cells.iter_mut().take(to).skip(from) {
            *c = run_char;
        }
    }
    cells.into_iter().collect()
}

#[cfg(test)]
mod tests {
    use super::super::tests::{attempt, job, stage, timeline};
    use super::*;

    #[test]
    fn text_lists_every_job_with_its_bar() {
        let t = timeline(vec![stage(
            1,
            ExecutionType::Parallel,
            vec![
                job("a.sh", vec![attempt(0, 0, 5000, Outcome::Completed)]),
                job(
                    "b.sh",
                    vec![attempt(
                        0,
                        5000,
                        10000,
                        Outcome::from_error("Rsql.ScriptFailed"),
                    )],
                ),
                job("c.sh", vec![]),
            ],
        )]);
        let text = render(&t);
        let line = |job: &str| {
            let row = text
                .lines()
                .find(|l| l.starts_with("1 ") && l.contains(job));
            row.unwrap().to_string()
        };
        assert!(line("a.sh").contains(&format!("|{}{}|", "=".repeat(20), " ".repeat(20))));
        assert!(line("b.sh").contains(&format!("|{}{}|", ".".repeat(20), "X".repeat(20))));
        assert!(line("b.sh").contains("failed: Rsql.ScriptFailed"));
        assert!(line("c.sh").contains("not run"));
        assert!(text.contains("critical path: b.sh (10.0s, 5.0s waiting for a slot)"));
    }

    /// `workflow report --format text` once printed execution ids and SQL error text raw:
    /// a script's `ESC ]0;PWNED BEL` retitled the operator's terminal.
    #[test]
    fn text_escapes_what_jobs_and_messages_put_in_it() {
        let evil = "\u{1b}]0;PWNED\u{7}\u{1b}[31m";
        let mut t = timeline(vec![stage(
            1,
            ExecutionType::Sequential,
            vec![job(
                &format!("a{evil}.sh"),
                vec![attempt(0, 0, 5000, Outcome::Completed)],
            )],
        )]);
        t.execution_id = format!("exec{evil}");
        t.workflow_id = format!("wf{evil}");
        t.error = Some(format!("Rsql.ScriptFailed{evil}"));
        t.cause = Some(format!("{{\"errorMessage\":\"ERROR: {evil}\\nsecond\"}}"));
        let text = render(&t);
        assert!(
            !text.chars().any(|c| c.is_control() && c != '\n'),
            "{text:?}"
        );
        assert!(text.contains("exec\\u{1b}]0;PWNED\\u{7}"), "{text}");
    }
}
