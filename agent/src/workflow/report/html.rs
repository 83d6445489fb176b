//! The timeline as one self-contained HTML page: inline CSS and SVG, no script, no external
//! asset, so it opens anywhere and can be mailed or attached to a ticket.
//!
//! What a person sees: a header (workflow, execution, status, start, end, total duration,
//! critical path), a legend, then the chart: one row per job, grouped by stage in config
//! order, on a time axis with the stages' boundaries. Each attempt is a bar coloured by its
//! outcome, preceded by its queue wait (hatched); retries are further bars on the same row;
//! the critical path's jobs are bold with outlined bars. Hovering a bar shows its `<title>`:
//! instance, exit code, `sql_state`, duration and log. A table below repeats every attempt.
//!
//! Stable hooks for tests and scripts: `class="job"` rows with `data-stage`, `data-job` and
//! `data-critical`; `class="bar"` with `data-status`, `data-error`, `data-attempt` and a
//! `fill`; `class="queue-wait"` with `data-wait-ms`; legend items with `data-status`,
//! `data-error` and `data-colour`.

use std::fmt::Write as _;

use super::{
    format_duration, format_utc, Attempt, CriticalPath, JobRow, Ms, Outcome, Source, StageBlock,
    Timeline,
};
use crate::workflow::ExecutionType;

/// The colour of an outcome; failures by error name.
pub fn colour(outcome: &Outcome) -> &'static str {
    match outcome {
        Outcome::Completed => "#2f9e44",
        Outcome::Failed { error } => match error.as_str() {
            "Rsql.ScriptFailed" => "#e03131",
            "Rsql.ConnectionFailed" => "#f76707",
            "Rsql.Killed" => "#c2255c",
            "Rsql.InvalidJob" => "#9c36b5",
            _ => "#a61e4d",
        },
        Outcome::TimedOut { .. } => "#f59f00",
        Outcome::Interrupted => "#7048e8",
        Outcome::Cancelled => "#adb5bd",
        Outcome::Running => "#1c7ed6",
    }
}

fn status_colour(status: &str) -> &'static str {
    match status.to_ascii_lowercase().as_str() {
        "succeeded" | "completed" => "#2f9e44",
        "failed" => "#e03131",
        "timed_out" => "#f59f00",
        "aborted" | "cancelled" => "#868e96",
        _ => "#1c7ed6",
    }
}

/// Escapes text for HTML and SVG, in text and in attribute values.
pub fn esc(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

const WIDTH: f64 = 1200.0;
const GUTTER: f64 = 290.0;
const RIGHT: f64 = 70.0;
const AXIS: f64 = 34.0;
const STAGE_ROW: f64 = 30.0;
const JOB_ROW: f64 = 26.0;
const BAR: f64 = 14.0;
const WAIT_BAR: f64 = 10.0;

/// The page.
pub fn render(t: &Timeline) -> String {
    let path = t.critical_path();
    let mut out = String::new();
    let title = format!("{} · {}", t.workflow_id, t.execution_id);
    let _ = write!(
        out,
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>{}</title><style>{CSS}</style></head><body>\n",
        esc(&format!("rsql-agent report: {title}"))
    );
    header(&mut out, t, &path);
    legend(&mut out, t);
    chart(&mut out, t, &path);
    details(&mut out, t);
    let _ = write!(
        out,
        "<footer>Made by <code>rsql-agent workflow report</code> from {}. Times are UTC.</footer>\n</body></html>\n",
        match t.source {
            Source::Local => "the local audit of <code>rsql-agent workflow run</code>",
            Source::StepFunctions => "the Step Functions execution history and the job audit table",
        }
    );
    out
}

const CSS: &str = "
:root{--ink:#212529;--muted:#6c757d;--line:#dee2e6;--band:#f8f9fa}
*{box-sizing:border-box}
body{margin:0 auto;max-width:1248px;padding:24px;font:14px/1.45 system-ui,-apple-system,'Segoe UI',Roboto,'DejaVu Sans',sans-serif;color:var(--ink);background:#fff}
header h1{font-size:22px;margin:0 0 2px;font-weight:650}
header .exec{color:var(--muted);font-size:13px;word-break:break-all}
.pill{display:inline-block;padding:1px 10px;border-radius:999px;color:#fff;font-size:12px;font-weight:650;letter-spacing:.04em;vertical-align:3px;margin-left:8px}
dl.facts{display:grid;grid-template-columns:repeat(4,auto);justify-content:start;gap:2px 28px;margin:14px 0 6px}
dl.facts div{min-width:120px}
dl.facts dt{color:var(--muted);font-size:12px;text-transform:uppercase;letter-spacing:.05em}
dl.facts dd{margin:0;font-weight:600;font-variant-numeric:tabular-nums}
p.critical{margin:8px 0 0}
p.critical b{font-weight:650}
p.error{margin:8px 0 0;padding:8px 12px;background:#fff5f5;border-left:4px solid #e03131;border-radius:4px;font-size:13px;word-break:break-word}
ul.legend{list-style:none;padding:0;margin:16px 0 8px;display:flex;flex-wrap:wrap;gap:6px 18px;font-size:13px;color:#495057}
ul.legend li{display:flex;align-items:center;gap:6px}
.swatch{display:inline-block;width:22px;height:12px;border-radius:3px}
.swatch.wait{background:repeating-linear-gradient(135deg,#ced4da 0 2px,#f1f3f5 2px 5px);border:1px solid #ced4da}
.swatch.critical{background:#fff;border:2px solid var(--ink)}
svg.chart{display:block;width:100%;height:auto;border:1px solid var(--line);border-radius:6px;background:#fff}
svg text{font-family:system-ui,-apple-system,'Segoe UI',Roboto,'DejaVu Sans',sans-serif}
table{border-collapse:collapse;width:100%;margin-top:22px;font-size:12.5px;font-variant-numeric:tabular-nums}
th{text-align:left;color:var(--muted);font-weight:600;border-bottom:2px solid var(--line);padding:4px 8px}
td{border-bottom:1px solid var(--line);padding:4px 8px;vertical-align:top}
td{white-space:nowrap}
td.log{white-space:normal}
td.log{word-break:break-all;color:#495057}
tr.stage td{background:var(--band);font-weight:600}
.chip{display:inline-block;width:10px;height:10px;border-radius:2px;margin-right:6px;vertical-align:-1px}
footer{margin-top:18px;color:var(--muted);font-size:12px}
";

fn header(out: &mut String, t: &Timeline, path: &CriticalPath) {
    let (done, total) = t.completed_jobs();
    let _ = write!(
        out,
        "<header><h1>{}<span class=\"pill\" data-execution-status=\"{}\" style=\"background:{}\">{}</span></h1>\
         <div class=\"exec\">execution <b>{}</b>{}</div>\n<dl class=\"facts\">",
        esc(if t.workflow_id.is_empty() { "(unknown workflow)" } else { &t.workflow_id }),
        esc(&t.status),
        status_colour(&t.status),
        esc(&t.status.to_uppercase()),
        esc(&t.execution_id),
        t.execution_arn
            .as_ref()
            .map(|a| format!(" · {}", esc(a)))
            .unwrap_or_default(),
    );
    let fact = |out: &mut String, name: &str, value: String| {
        let _ = write!(out, "<div><dt>{name}</dt><dd>{value}</dd></div>");
    };
    fact(
        out,
        "Started",
        t.origin().map(format_utc).unwrap_or_else(|| "-".into()),
    );
    fact(
        out,
        "Ended",
        t.ended
            .map(format_utc)
            .unwrap_or_else(|| "still running".into()),
    );
    fact(
        out,
        "Total",
        t.duration_ms()
            .map(format_duration)
            .unwrap_or_else(|| "-".into()),
    );
    fact(out, "Jobs completed", format!("{done} of {total}"));
    out.push_str("</dl>\n");
    if path.jobs.is_empty() {
        out.push_str("<p class=\"critical\">Critical path: no job ran.</p>\n");
    } else {
        let chain: Vec<String> = path
            .jobs
            .iter()
            .map(|(_, j)| format!("<b>{}</b>", esc(j)))
            .collect();
        let _ = writeln!(
            out,
            "<p class=\"critical\" data-critical-path=\"{}\">Critical path: {} &nbsp;<span style=\"color:var(--muted)\">{} of {}{}</span></p>",
            esc(&path.jobs.iter().map(|(_, j)| j.as_str()).collect::<Vec<_>>().join(" ")),
            chain.join(" → "),
            format_duration(path.length_ms),
            t.duration_ms().map(format_duration).unwrap_or_default(),
            if path.queue_wait_ms > 0 {
                format!(", {} of it waiting for a slot", format_duration(path.queue_wait_ms))
            } else {
                String::new()
            }
        );
    }
    if let Some(error) = &t.error {
        let cause = readable_cause(t.cause.as_deref().unwrap_or_default());
        let cause: String = cause.chars().take(400).collect();
        let _ = writeln!(
            out,
            "<p class=\"error\"><b>{}</b>{}</p>",
            esc(error),
            if cause.is_empty() {
                String::new()
            } else {
                format!(" — {}", esc(&cause))
            }
        );
    }
    out.push_str("</header>\n");
}

/// The agent's JSON cause (`{exit_code, sql_state, message, ...}`) as a sentence; any other
/// cause as it is.
pub(crate) fn readable_cause(cause: &str) -> String {
    let Ok(json) = serde_json::from_str::<serde_json::Value>(cause) else {
        return cause.to_string();
    };
    let Some(message) = json["message"].as_str() else {
        return cause.to_string();
    };
    let mut text = String::new();
    if let Some(state) = json["sql_state"].as_str() {
        let _ = write!(text, "[{state}] ");
    }
    text.push_str(message);
    if let Some(code) = json["exit_code"].as_i64() {
        let _ = write!(text, " (exit code {code})");
    }
    if let Some(stream) = json["log_stream"].as_str() {
        let _ = write!(text, "; log stream {stream}");
    }
    text
}

fn legend(out: &mut String, t: &Timeline) {
    // Every outcome the chart shows, in a fixed order, then the markers.
    let mut seen: Vec<Outcome> = Vec::new();
    for (_, _, a) in t.attempts() {
        if !seen.contains(&a.outcome) {
            seen.push(a.outcome.clone());
        }
    }
    seen.sort_by_key(|o| {
        (
            [
                "completed",
                "failed",
                "timed_out",
                "interrupted",
                "cancelled",
                "running",
            ]
            .iter()
            .position(|k| *k == o.key()),
            o.error().map(str::to_string),
        )
    });
    out.push_str("<ul class=\"legend\">");
    for outcome in &seen {
        let _ = write!(
            out,
            "<li class=\"legend-item\" data-status=\"{}\" data-error=\"{}\" data-colour=\"{}\"><span class=\"swatch\" style=\"background:{}\"></span>{}</li>",
            outcome.key(),
            esc(outcome.error().unwrap_or_default()),
            colour(outcome),
            colour(outcome),
            esc(&outcome.label()),
        );
    }
    out.push_str(
        "<li><span class=\"swatch wait\"></span>waiting for a slot (scheduled → started)</li>\
         <li><span class=\"swatch critical\"></span>critical path</li></ul>\n",
    );
}

/// A tick step giving at most about ten ticks.
fn tick_step(total: Ms) -> Ms {
    const STEPS: [Ms; 25] = [
        10,
        20,
        50,
        100,
        200,
        500,
        1_000,
        2_000,
        5_000,
        10_000,
        15_000,
        30_000,
        60_000,
        120_000,
        300_000,
        600_000,
        900_000,
        1_800_000,
        3_600_000,
        7_200_000,
        10_800_000,
        21_600_000,
        43_200_000,
        86_400_000,
        172_800_000,
    ];
    STEPS
        .iter()
        .copied()
        .find(|s| total / s <= 10)
        .unwrap_or(172_800_000)
}

fn tick_label(ms: Ms, step: Ms) -> String {
    if step < 100 {
        format!("{ms}ms")
    } else if step < 1000 {
        format!("{:.1}s", ms as f64 / 1000.0)
    } else if ms < 60_000 {
        format!("{}s", ms / 1000)
    } else if ms < 3_600_000 {
        match (ms / 1000) % 60 {
            0 => format!("{}m", ms / 60_000),
            s => format!("{}m{s:02}s", ms / 60_000),
        }
    } else {
        match (ms / 60_000) % 60 {
            0 => format!("{}h", ms / 3_600_000),
            m => format!("{}h{m:02}m", ms / 3_600_000),
        }
    }
}

fn chart(out: &mut String, t: &Timeline, path: &CriticalPath) {
    let origin = t.origin().unwrap_or_default();
    let total = t.duration_ms().unwrap_or(0).max(50);
    let span = WIDTH - GUTTER - RIGHT;
    let x = |ms: Ms| GUTTER + ((ms - origin) as f64 / total as f64) * span;
    let rows: usize = t.stages.iter().map(|s| s.jobs.len()).sum();
    let height = AXIS + t.stages.len() as f64 * STAGE_ROW + rows as f64 * JOB_ROW + 12.0;
    let _ = write!(
        out,
        "<svg class=\"chart\" xmlns=\"http://www.w3.org/2000/svg\" viewBox=\"0 0 {WIDTH} {height}\" width=\"{WIDTH}\" height=\"{height}\" role=\"img\" aria-label=\"timeline of execution {}\">\n\
         <defs><pattern id=\"wait\" width=\"6\" height=\"6\" patternUnits=\"userSpaceOnUse\" patternTransform=\"rotate(45)\">\
         <rect width=\"6\" height=\"6\" fill=\"#f1f3f5\"/><rect width=\"2.2\" height=\"6\" fill=\"#adb5bd\"/></pattern></defs>\n",
        esc(&t.execution_id)
    );

    // Axis and grid.
    let step = tick_step(total);
    let bottom = height - 6.0;
    out.push_str("<g class=\"axis\">");
    let mut tick = 0;
    while tick <= total {
        let tx = x(origin + tick);
        let _ = write!(
            out,
            "<line x1=\"{tx:.1}\" y1=\"{AXIS}\" x2=\"{tx:.1}\" y2=\"{bottom:.1}\" stroke=\"#f1f3f5\"/>\
             <text x=\"{tx:.1}\" y=\"{:.1}\" font-size=\"11\" fill=\"#868e96\" text-anchor=\"middle\">{}</text>",
            AXIS - 12.0,
            tick_label(tick, step)
        );
        tick += step;
    }
    let _ = writeln!(
        out,
        "<line x1=\"{GUTTER}\" y1=\"{AXIS}\" x2=\"{:.1}\" y2=\"{AXIS}\" stroke=\"#ced4da\"/></g>",
        WIDTH - RIGHT
    );

    // Stage boundaries: a dashed line where each stage started, labelled on the axis.
    out.push_str("<g class=\"stage-boundaries\">");
    for stage in &t.stages {
        if let Some((begin, _)) = stage.span() {
            let bx = x(begin);
            let _ = write!(
                out,
                "<line class=\"stage-boundary\" data-stage=\"{}\" x1=\"{bx:.1}\" y1=\"{:.1}\" x2=\"{bx:.1}\" y2=\"{bottom:.1}\" stroke=\"#868e96\" stroke-dasharray=\"4 3\"/>\
                 <text x=\"{:.1}\" y=\"{:.1}\" font-size=\"10\" fill=\"#495057\" font-weight=\"600\">S{}</text>",
                stage.number,
                AXIS - 8.0,
                bx + 3.0,
                AXIS - 1.0,
                stage.number
            );
        }
    }
    if let Some(end) = t.end() {
        let ex = x(end);
        let _ = write!(
            out,
            "<line class=\"execution-end\" x1=\"{ex:.1}\" y1=\"{AXIS}\" x2=\"{ex:.1}\" y2=\"{bottom:.1}\" stroke=\"#495057\"/>\
             <text x=\"{:.1}\" y=\"{:.1}\" font-size=\"10\" fill=\"#495057\" font-weight=\"600\">end</text>",
            ex + 3.0,
            AXIS - 1.0
        );
    }
    out.push_str("</g>\n");

    let mut y = AXIS;
    for stage in &t.stages {
        stage_rows(out, stage, path, &mut y, &x);
    }
    out.push_str("</svg>\n");
}

/// One stage: its header row, then a row per job.
fn stage_rows(
    out: &mut String,
    stage: &StageBlock,
    path: &CriticalPath,
    y: &mut f64,
    x: &dyn Fn(Ms) -> f64,
) {
    stage_header(out, stage, *y, x);
    *y += STAGE_ROW;
    for (i, job) in stage.jobs.iter().enumerate() {
        let critical = path.contains(stage.number, &job.job_name);
        job_row(out, stage, job, i % 2 == 1, critical, *y, x);
        *y += JOB_ROW;
    }
    out.push_str("</g>\n");
}

/// A stage's header at `y` (number, description, kind, how long it took) and its extent
/// shaded behind its job rows. Opens the stage's group, which [`stage_rows`] closes.
fn stage_header(out: &mut String, stage: &StageBlock, y: f64, x: &dyn Fn(Ms) -> f64) {
    let jobs_height = stage.jobs.len() as f64 * JOB_ROW;
    let kind = match stage.execution_type {
        ExecutionType::Sequential => "sequential",
        ExecutionType::Parallel => "parallel",
    };
    let took = match (stage.enabled, stage.span()) {
        (false, _) => "disabled".to_string(),
        (true, Some((b, e))) => format_duration(e - b),
        (true, None) => "not run".to_string(),
    };
    let _ = write!(
        out,
        "<g class=\"stage\" data-stage=\"{}\"><rect x=\"0\" y=\"{:.1}\" width=\"{WIDTH}\" height=\"{STAGE_ROW}\" fill=\"#f1f3f5\"/>\
         <text x=\"12\" y=\"{:.1}\" font-size=\"12.5\" font-weight=\"650\" fill=\"#343a40\">Stage {} · {} <tspan font-weight=\"400\" fill=\"#6c757d\">· {kind} · {}</tspan></text>",
        stage.number,
        y,
        y + 19.5,
        stage.number,
        esc(&truncate(&stage.description, 70)),
        esc(&took),
    );
    // The stage's own extent, shaded behind its rows.
    if let Some((b, e)) = stage.span() {
        let _ = write!(
            out,
            "<rect class=\"stage-span\" x=\"{:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{jobs_height:.1}\" fill=\"#e7f5ff\" opacity=\"0.55\"/>",
            x(b),
            y + STAGE_ROW,
            (x(e) - x(b)).max(1.0)
        );
    }
}

/// One job's row at `y`: its name, each attempt's bar, and the last attempt's run time.
fn job_row(
    out: &mut String,
    stage: &StageBlock,
    job: &JobRow,
    striped: bool,
    critical: bool,
    y: f64,
    x: &dyn Fn(Ms) -> f64,
) {
    let mid = y + JOB_ROW / 2.0;
    let _ = write!(
        out,
        "<g class=\"job\" data-stage=\"{}\" data-job=\"{}\" data-critical=\"{critical}\" data-attempts=\"{}\">",
        stage.number,
        esc(&job.job_name),
        job.attempts.len()
    );
    if striped {
        let _ = write!(
            out,
            "<rect x=\"0\" y=\"{:.1}\" width=\"{GUTTER}\" height=\"{JOB_ROW}\" fill=\"#fcfcfd\"/>",
            y
        );
    }
    let _ = write!(
        out,
        "<line x1=\"0\" y1=\"{:.1}\" x2=\"{WIDTH}\" y2=\"{:.1}\" stroke=\"#f1f3f5\"/>\
         <text class=\"job-name\" x=\"24\" y=\"{:.1}\" font-size=\"12.5\" fill=\"{}\"{}><title>{}</title>{}</text>",
        y + JOB_ROW,
        y + JOB_ROW,
        mid + 4.3,
        if job.attempts.is_empty() { "#adb5bd" } else { "#212529" },
        if critical { " font-weight=\"700\"" } else { "" },
        esc(&job.job_name),
        esc(&truncate(&job.job_name, 36)),
    );
    if job.attempts.is_empty() {
        let _ = write!(
            out,
            "<text x=\"{:.1}\" y=\"{:.1}\" font-size=\"11\" fill=\"#adb5bd\" font-style=\"italic\">{}</text>",
            GUTTER + 6.0,
            mid + 4.0,
            if stage.enabled { "not run" } else { "stage disabled" }
        );
    }
    for attempt in &job.attempts {
        bar(out, job.job_name.as_str(), attempt, critical, mid, x);
    }
    if let Some(last) = job.attempts.last() {
        let end = last
            .ended
            .or(last.started)
            .or(last.scheduled)
            .unwrap_or_default();
        let label = match (job.attempts.len(), last.run_time()) {
            (1, Some(d)) => format_duration(d),
            (n, Some(d)) => format!("{} · {n} attempts", format_duration(d)),
            (n, None) if n > 1 => format!("{n} attempts"),
            _ => String::new(),
        };
        let _ = write!(
            out,
            "<text class=\"run-time\" x=\"{:.1}\" y=\"{:.1}\" font-size=\"11\" fill=\"#495057\">{}</text>",
            x(end) + 5.0,
            mid + 4.0,
            esc(&label)
        );
    }
    out.push_str("</g>\n");
}

fn bar(out: &mut String, job: &str, a: &Attempt, critical: bool, mid: f64, x: &dyn Fn(Ms) -> f64) {
    let title = bar_title(job, a);
    if let (Some(s), Some(t)) = (a.scheduled, a.started) {
        if t > s {
            let _ = write!(
                out,
                "<rect class=\"queue-wait\" data-job=\"{}\" data-attempt=\"{}\" data-wait-ms=\"{}\" x=\"{:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{WAIT_BAR}\" rx=\"2\" fill=\"url(#wait)\" stroke=\"#ced4da\" stroke-width=\"0.6\"><title>{}</title></rect>",
                esc(job),
                a.number,
                t - s,
                x(s),
                mid - WAIT_BAR / 2.0,
                (x(t) - x(s)).max(0.5),
                esc(&format!("{job} (attempt {}): waited {} for a slot", a.number, format_duration(t - s)))
            );
        }
    }
    let start_known = a.started.is_some();
    let Some(begin) = a.started.or(a.scheduled) else {
        return;
    };
    let end = a.ended.unwrap_or(begin);
    let width = (x(end) - x(begin)).max(3.0);
    let stroke = if critical {
        " stroke=\"#212529\" stroke-width=\"1.6\""
    } else if !start_known {
        " stroke=\"#495057\" stroke-width=\"1\" stroke-dasharray=\"3 2\""
    } else {
        ""
    };
    let _ = write!(
        out,
        "<rect class=\"bar\" data-job=\"{}\" data-attempt=\"{}\" data-status=\"{}\" data-error=\"{}\" data-start-known=\"{start_known}\" x=\"{:.1}\" y=\"{:.1}\" width=\"{width:.1}\" height=\"{BAR}\" rx=\"3\" fill=\"{}\"{}{stroke}><title>{}</title></rect>",
        esc(job),
        a.number,
        a.outcome.key(),
        esc(a.outcome.error().unwrap_or_default()),
        x(begin),
        mid - BAR / 2.0,
        colour(&a.outcome),
        if start_known { "" } else { " fill-opacity=\"0.45\"" },
        esc(&title),
    );
    if a.number > 1 && width > 18.0 {
        let _ = write!(
            out,
            "<text x=\"{:.1}\" y=\"{:.1}\" font-size=\"9.5\" fill=\"#fff\" font-weight=\"700\" pointer-events=\"none\">#{}</text>",
            x(begin) + 3.0,
            mid + 3.3,
            a.number
        );
    }
}

/// What hovering a bar shows.
pub fn bar_title(job: &str, a: &Attempt) -> String {
    let dash = || "-".to_string();
    let mut lines = vec![
        format!("{job} — attempt {}: {}", a.number, a.outcome.label()),
        format!("instance: {}", a.instance_id.clone().unwrap_or_else(dash)),
        format!(
            "exit code: {}",
            a.exit_code.map(|c| c.to_string()).unwrap_or_else(dash)
        ),
        format!("sql_state: {}", a.sql_state.clone().unwrap_or_else(dash)),
        format!(
            "duration: {}",
            match a.run_time() {
                Some(d) => format_duration(d),
                None if a.started.is_none() =>
                    "unknown (start on the instance not recorded)".into(),
                None => "still running".into(),
            }
        ),
        format!(
            "queue wait: {}",
            a.queue_wait().map(format_duration).unwrap_or_else(dash)
        ),
        format!("log: {}", a.log.clone().unwrap_or_else(dash)),
    ];
    if let Some(started) = a.started {
        lines.push(format!("started: {}", format_utc(started)));
    }
    if let Some(message) = &a.message {
        lines.push(format!("message: {}", truncate(message, 300)));
    }
    lines.join("\n")
}

fn truncate(text: &str, max: usize) -> String {
    if text.chars().count() <= max {
        text.to_string()
    } else {
        let cut: String = text.chars().take(max.saturating_sub(1)).collect();
        format!("{cut}…")
    }
}

fn details(out: &mut String, t: &Timeline) {
    out.push_str(
        "<table class=\"attempts\"><thead><tr><th>Job</th><th>Attempt</th><th>Status</th><th>Instance</th>\
         <th>Exit</th><th>SQL state</th><th>Started</th><th>Waited</th><th>Ran</th><th>Log</th></tr></thead><tbody>\n",
    );
    let dash = || "-".to_string();
    for stage in &t.stages {
        let _ = writeln!(
            out,
            "<tr class=\"stage\"><td colspan=\"10\">Stage {} · {}</td></tr>",
            stage.number,
            esc(&stage.description)
        );
        for job in &stage.jobs {
            if job.attempts.is_empty() {
                let _ = writeln!(
                    out,
                    "<tr class=\"attempt\" data-job=\"{}\" data-status=\"{}\"><td>{}</td><td>-</td><td colspan=\"8\" style=\"color:#868e96\">{}</td></tr>",
                    esc(&job.job_name),
                    if stage.enabled { "not_run" } else { "disabled" },
                    esc(&job.job_name),
                    if stage.enabled { "not run" } else { "stage disabled" },
                );
            }
            for a in &job.attempts {
                let _ = writeln!(
                    out,
                    "<tr class=\"attempt\" data-job=\"{}\" data-status=\"{}\"><td>{}</td><td>{}</td>\
                     <td class=\"status\"><span class=\"chip\" style=\"background:{}\"></span>{}</td><td>{}</td><td>{}</td><td>{}</td>\
                     <td>{}</td><td>{}</td><td>{}</td><td class=\"log\">{}</td></tr>",
                    esc(&job.job_name),
                    a.outcome.key(),
                    esc(&job.job_name),
                    a.number,
                    colour(&a.outcome),
                    esc(&a.outcome.label()),
                    esc(&a.instance_id.clone().unwrap_or_else(dash)),
                    a.exit_code.map(|c| c.to_string()).unwrap_or_else(dash),
                    esc(&a.sql_state.clone().unwrap_or_else(dash)),
                    a.started
                        .map(|s| format_utc(s).get(11..19).unwrap_or_default().to_string())
                        .unwrap_or_else(dash),
                    a.queue_wait().map(format_duration).unwrap_or_else(dash),
                    a.run_time().map(format_duration).unwrap_or_else(dash),
                    esc(&a.log.clone().unwrap_or_else(dash)),
                );
            }
        }
    }
    out.push_str("</tbody></table>\n");
}

#[cfg(test)]
mod tests {
    use super::super::tests::{attempt, job, stage, timeline};
    use super::*;
    use ExecutionType::{Parallel, Sequential};

    fn sample() -> Timeline {
        let mut failed = attempt(2000, 2500, 4000, Outcome::from_error("Rsql.ScriptFailed"));
        failed.exit_code = Some(3);
        failed.sql_state = Some("42P01".into());
        failed.log = Some("wf/ex/<b>".into());
        timeline(vec![
            stage(
                1,
                Sequential,
                vec![job("a.sh", vec![attempt(0, 10, 2000, Outcome::Completed)])],
            ),
            stage(
                2,
                Parallel,
                vec![
                    job("b.sh", vec![failed]),
                    job("c.sh", vec![attempt(2000, 2010, 3000, Outcome::Cancelled)]),
                ],
            ),
        ])
    }

    #[test]
    fn html_has_a_row_per_job_bars_by_status_and_titles() {
        let html = render(&sample());
        assert_eq!(html.matches("<g class=\"job\"").count(), 3);
        assert!(html.contains("data-job=\"b.sh\" data-attempt=\"1\" data-status=\"failed\" data-error=\"Rsql.ScriptFailed\""));
        assert!(html.contains(&format!("fill=\"{}\"", colour(&Outcome::Completed))));
        assert!(html.contains("data-wait-ms=\"500\""));
        assert!(html.contains("sql_state: 42P01"));
        // Text from the audit is escaped, never markup.
        assert!(html.contains("wf/ex/&lt;b&gt;"));
        assert!(!html.contains("wf/ex/<b>"));
        assert!(!html.contains("<script"));
        assert!(html.contains("data-critical-path=\"a.sh b.sh\""));
    }

    #[test]
    fn the_agents_cause_reads_as_a_sentence() {
        assert_eq!(
            readable_cause(
                r#"{"exit_code":31,"sql_state":"42P01","message":"relation \"t\" does not exist","log_stream":"wf/s"}"#
            ),
            "[42P01] relation \"t\" does not exist (exit code 31); log stream wf/s"
        );
        assert_eq!(readable_cause("(no cause given)"), "(no cause given)");
    }

    #[test]
    fn ticks_stay_few_and_readable() {
        assert_eq!(tick_step(9_000), 1_000);
        assert_eq!(tick_step(95_000), 10_000);
        assert_eq!(tick_step(3 * 3_600_000), 1_800_000);
        assert_eq!(tick_label(90_000, 30_000), "1m30s");
        assert_eq!(tick_label(7_200_000, 1_800_000), "2h");
        assert_eq!(tick_label(500, 100), "0.5s");
    }
}
