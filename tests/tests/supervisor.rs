//! System tests of the supervisor: real bash scripts as jobs, real signals, real pipes.
//!
//! Each test creates its own `Supervisor` (nextest runs each test in its own process, which
//! then becomes a child subreaper) and asserts what a user would notice: how the job ended,
//! how long it took, that none of its processes survive, and what the log holds.

use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use rsql_agent::joblog::{self, Stream};
use rsql_agent::stop::StopReason;
use rsql_agent::supervisor::{
    command_for_script, Ending, Launch, RunOutcome, Supervisor, SupervisorError, JOB_ID_ENV,
};
use rsql_agent_tests::bins;
use sha2::{Digest, Sha256};
use tempfile::TempDir;

/// Slack on every upper time bound: bash start-up, a loaded 2-core CI box, debug builds.
const SLACK: Duration = Duration::from_millis(2500);

/// A bash function that waits until process `$1` has made itself a session leader, so a
/// script does not exit (and get its group killed) before its grandchild has escaped.
const WAIT_ESCAPED: &str = "wait_escaped() { \
    while [ \"$(cut -d' ' -f6 /proc/$1/stat 2>/dev/null)\" != \"$1\" ]; do sleep 0.01; done; }";

struct Fixture {
    dir: TempDir,
    supervisor: Arc<Supervisor>,
}

fn fixture() -> Fixture {
    Fixture {
        dir: tempfile::tempdir().expect("tempdir"),
        supervisor: Supervisor::new().expect("supervisor"),
    }
}

fn unique_job_id(name: &str) -> String {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    format!(
        "test-{name}-{}-{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed),
        SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default()
    )
}

impl Fixture {
    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Writes an executable bash script.
    fn script(&self, name: &str, body: &str) -> PathBuf {
        let path = self.path(name);
        std::fs::write(&path, format!("#!/bin/bash\n{body}\n")).expect("write script");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        path
    }

    fn launch(&self, name: &str, program: PathBuf, args: Vec<String>) -> Launch {
        rsql_agent_tests::supervised::launch(
            &self.path("logs"),
            name,
            unique_job_id(name),
            program,
            args,
            self.dir.path().to_path_buf(),
        )
    }

    /// Runs a job to its end; returns the outcome and the wall time `wait` took.
    async fn run(&self, launch: Launch) -> (RunOutcome, Duration) {
        let started = Instant::now();
        let handle = self.supervisor.start(launch).expect("start");
        let outcome = handle.wait().await.expect("outcome");
        (outcome, started.elapsed())
    }
}

fn stdout_of(outcome: &RunOutcome) -> Vec<u8> {
    joblog::reassemble(&outcome.log_path, Stream::Stdout).expect("reassemble")
}

fn stdout_text(outcome: &RunOutcome) -> String {
    joblog::display(&stdout_of(outcome))
}

/// Polls until the job's log shows `needle` on stdout.
async fn wait_for_output(log: &Path, needle: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let seen = joblog::reassemble(log, Stream::Stdout)
            .map(|out| joblog::display(&out).contains(needle))
            .unwrap_or(false);
        if seen {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{needle:?} never appeared in {}",
            log.display()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A process is gone once /proc has no entry for it: not running and not a zombie either.
fn is_gone(pid: i32) -> bool {
    !Path::new(&format!("/proc/{pid}")).exists()
}

/// Polls (briefly) until the process is gone; the supervisor reaps before it reports, so
/// this should hold at once.
async fn assert_gone(pid: i32, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(2);
    while !is_gone(pid) {
        assert!(
            Instant::now() < deadline,
            "{what} (pid {pid}) survived the job"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn read_pid(path: &Path) -> i32 {
    std::fs::read_to_string(path)
        .expect("pid file")
        .trim()
        .parse()
        .expect("pid")
}

fn status_kib(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("status");
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("{field} missing from /proc/self/status"))
}

#[tokio::test]
async fn a_timeout_terminates_a_well_behaved_child() {
    let f = fixture();
    let script = f.script(
        "polite.sh",
        "trap 'echo got TERM; exit 0' TERM\necho ready\nwhile :; do sleep 0.05; done",
    );
    let mut launch = f.launch("polite", script, vec![]);
    launch.timeout = Duration::from_secs(1);
    launch.kill_grace = Duration::from_secs(10);
    let (outcome, elapsed) = f.run(launch).await;
    assert_eq!(outcome.ending, Ending::TimedOut { signal: 15 });
    assert!(outcome.duration >= Duration::from_secs(1), "{outcome:?}");
    assert!(elapsed < Duration::from_secs(1) + SLACK, "took {elapsed:?}");
    assert!(stdout_text(&outcome).contains("got TERM"));
    assert_gone(outcome.pid as i32, "the job").await;
}

#[tokio::test]
async fn a_child_ignoring_sigterm_is_killed_after_the_grace_while_its_output_drains() {
    let f = fixture();
    // Chatty on purpose: the pipes must keep draining while the agent waits out the grace,
    // or the child would block on a full pipe and the test would prove nothing about it.
    let script = f.script(
        "stubborn.sh",
        "trap '' TERM\necho ready\nwhile :; do echo chatter chatter chatter; done",
    );
    let mut launch = f.launch("stubborn", script, vec![]);
    launch.timeout = Duration::from_secs(1);
    launch.kill_grace = Duration::from_secs(1);
    let (outcome, elapsed) = f.run(launch).await;
    assert_eq!(outcome.ending, Ending::TimedOut { signal: 9 });
    assert!(outcome.duration >= Duration::from_secs(2), "{outcome:?}");
    assert!(elapsed < Duration::from_secs(2) + SLACK, "took {elapsed:?}");
    let lines = joblog::read_records(&outcome.log_path)
        .expect("log")
        .filter_map(Result::ok)
        .filter(|r| r.payload == b"chatter chatter chatter")
        .count();
    assert!(lines > 1000, "only {lines} lines drained");
    assert_gone(outcome.pid as i32, "the job").await;
}

#[tokio::test]
async fn nothing_of_a_job_survives_it_not_even_a_setsid_grandchild() {
    let f = fixture();
    let script = f.script(
        "leaver.sh",
        &format!(
            "{WAIT_ESCAPED}\nsleep 1000 &\necho $! > \"$1\"\n\
             setsid sleep 1000 &\necho $! > \"$2\"\nwait_escaped $!\necho started\nexit 0"
        ),
    );
    let in_group = f.path("in_group.pid");
    let escaped = f.path("escaped.pid");
    let launch = f.launch(
        "leaver",
        script,
        vec![
            in_group.display().to_string(),
            escaped.display().to_string(),
        ],
    );
    let (outcome, elapsed) = f.run(launch).await;
    assert_eq!(outcome.ending, Ending::Exited { code: 0 });
    assert_eq!(outcome.stray_processes_killed, 1, "{outcome:?}");
    assert!(!outcome.pipes_forced_closed, "{outcome:?}");
    // Both sleeps held stdout; killing them closes it, so no drain wait is needed.
    assert!(elapsed < Duration::from_secs(2) + SLACK, "took {elapsed:?}");
    assert!(stdout_text(&outcome).contains("started"));
    assert_gone(read_pid(&in_group), "the background child in the group").await;
    assert_gone(read_pid(&escaped), "the setsid grandchild").await;
}

#[tokio::test]
async fn an_unfindable_grandchild_holding_stdout_cannot_hold_the_job_open() {
    let f = fixture();
    // `env -i` drops the job marker and setsid leaves the group: the agent cannot find this
    // one (a cgroup could), but it must not wait for it beyond pipe_drain.
    let script = f.script(
        "hider.sh",
        &format!(
            "{WAIT_ESCAPED}\nenv -i /usr/bin/setsid /usr/bin/sleep 1000 &\n\
             echo $! > \"$1\"\nwait_escaped $!\necho started\nexit 3"
        ),
    );
    let hidden = f.path("hidden.pid");
    let mut launch = f.launch("hider", script, vec![hidden.display().to_string()]);
    launch.pipe_drain = Duration::from_secs(1);
    let (outcome, elapsed) = f.run(launch).await;
    let pid = read_pid(&hidden);
    // Clean up first so a failed assertion does not leave the sleep behind. It was
    // re-parented to this process (a subreaper), so reap it here.
    let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
    let _ = nix::sys::wait::waitpid(Pid::from_raw(pid), None);
    assert_eq!(outcome.ending, Ending::Exited { code: 3 });
    assert!(outcome.pipes_forced_closed, "{outcome:?}");
    assert_eq!(outcome.stray_processes_killed, 0);
    assert!(elapsed >= Duration::from_secs(1), "took {elapsed:?}");
    assert!(elapsed < Duration::from_secs(1) + SLACK, "took {elapsed:?}");
    assert!(stdout_text(&outcome).contains("started"));
}

#[tokio::test]
async fn a_hundred_megabytes_arrive_byte_for_byte_in_bounded_memory() {
    const SIZE: u64 = 100_000_000;
    let f = fixture();
    // Random bytes: random line lengths, invalid UTF-8, NULs, CRs, and most likely a last
    // line without a newline. tee keeps a copy to compare against.
    let script = f.script(
        "flood.sh",
        &format!("head -c {SIZE} /dev/urandom | tee \"$1\""),
    );
    let expected_file = f.path("expected.bin");
    let mut launch = f.launch("flood", script, vec![expected_file.display().to_string()]);
    launch.timeout = Duration::from_secs(300);

    // Reset the peak (VmHWM) so it measures this job; older kernels may refuse, and then
    // the peak since process start still bounds the growth from above.
    let _ = std::fs::write("/proc/self/clear_refs", "5");
    let rss_before = status_kib("VmRSS:");
    let started = Instant::now();
    let handle = f.supervisor.start(launch).expect("start");
    let outcome = handle.wait().await.expect("outcome");
    let elapsed = started.elapsed();
    let peak = status_kib("VmHWM:");
    assert_eq!(outcome.ending, Ending::Exited { code: 0 });
    let growth_mib = peak.saturating_sub(rss_before) / 1024;
    assert!(
        growth_mib < 40,
        "resident memory grew by {growth_mib} MiB moving 100 MB (before {rss_before} kB, peak {peak} kB)"
    );

    let mut expected = Sha256::new();
    let mut file = std::fs::File::open(&expected_file).expect("expected output");
    let mut buf = vec![0u8; 1 << 16];
    let mut expected_len = 0u64;
    loop {
        let n = file.read(&mut buf).expect("read");
        if n == 0 {
            break;
        }
        expected_len += n as u64;
        expected.update(&buf[..n]);
    }
    assert_eq!(expected_len, SIZE);

    let mut actual = Sha256::new();
    let mut actual_len = 0u64;
    let mut longest = 0usize;
    for record in joblog::read_records(&outcome.log_path).expect("log") {
        let record = record.expect("record");
        if record.stream != Stream::Stdout {
            continue;
        }
        longest = longest.max(record.payload.len());
        actual.update(&record.payload);
        actual_len += record.payload.len() as u64;
        if record.complete {
            actual.update(b"\n");
            actual_len += 1;
        }
    }
    assert_eq!(actual_len, SIZE);
    assert_eq!(
        hex::encode(actual.finalize()),
        hex::encode(expected.finalize()),
        "stdout differs from what the job wrote"
    );
    assert!(longest <= joblog::MAX_RECORD_PAYLOAD);
    eprintln!(
        "100 MB through the supervisor in {elapsed:?}; resident before {rss_before} kB, peak {peak} kB"
    );
}

#[tokio::test]
async fn invalid_utf8_is_kept_byte_for_byte_and_displayed_escaped() {
    let f = fixture();
    let script = f.script(
        "bytes.sh",
        "printf 'ok \\xff\\xfe end\\n'\nprintf 'caf\\xc3\\xa9\\n' >&2",
    );
    let (outcome, _) = f.run(f.launch("bytes", script, vec![])).await;
    assert_eq!(outcome.ending, Ending::Exited { code: 0 });
    assert_eq!(stdout_of(&outcome), b"ok \xff\xfe end\n");
    let raw = std::fs::read(&outcome.log_path).expect("log");
    let needle: &[u8] = b" out ok \xff\xfe end\n";
    assert!(
        raw.windows(needle.len()).any(|w| w == needle),
        "raw bytes not in the file: {}",
        joblog::display(&raw)
    );
    assert_eq!(stdout_text(&outcome), "ok \\xff\\xfe end\n");
    assert_eq!(joblog::stderr_tail(&outcome.log_path, 100), "café");
}

#[tokio::test]
async fn a_child_that_kills_itself_is_reported_signaled() {
    let f = fixture();
    let script = f.script(
        "crash.sh",
        "ulimit -c 0\necho about to crash\nkill -SEGV $$",
    );
    let (outcome, _) = f.run(f.launch("crash", script, vec![])).await;
    assert_eq!(outcome.ending, Ending::Signaled { signal: 11 });
}

#[tokio::test]
async fn a_kill_from_outside_is_reported_signaled() {
    let f = fixture();
    let script = f.script(
        "victim.sh",
        "sleep 1000 &\necho $! > \"$1\"\necho ready\nwait",
    );
    let child_pid = f.path("child.pid");
    let launch = f.launch("victim", script, vec![child_pid.display().to_string()]);
    let log = launch.log.path().to_path_buf();
    let handle = f.supervisor.start(launch).expect("start");
    let pid = handle.pid();
    wait_for_output(&log, "ready").await;
    kill(Pid::from_raw(pid as i32), Signal::SIGKILL).expect("kill");
    let outcome = handle.wait().await.expect("outcome");
    assert_eq!(outcome.ending, Ending::Signaled { signal: 9 });
    assert_gone(read_pid(&child_pid), "the job's background child").await;
}

#[tokio::test]
async fn stop_mid_run_reports_stopped() {
    let f = fixture();
    let script = f.script("long.sh", "echo ready\nsleep 1000");
    let launch = f.launch("long", script, vec![]);
    let log = launch.log.path().to_path_buf();
    let handle = f.supervisor.start(launch).expect("start");
    let stopper = handle.stopper();
    let waiter = tokio::spawn(handle.wait());
    wait_for_output(&log, "ready").await;
    let stopped = Instant::now();
    stopper.stop(StopReason::Cancelled);
    let outcome = waiter.await.expect("join").expect("outcome");
    assert_eq!(
        outcome.ending,
        Ending::Stopped {
            reason: StopReason::Cancelled,
            signal: Some(15)
        }
    );
    assert!(stopped.elapsed() < SLACK, "took {:?}", stopped.elapsed());
}

#[tokio::test]
async fn a_second_stop_kills_at_once() {
    let f = fixture();
    // It lives through SIGTERM, and says so.
    let script = f.script(
        "deaf.sh",
        "trap 'echo TERM ignored' TERM\necho ready\nwhile :; do sleep 0.1; done",
    );
    let mut launch = f.launch("deaf", script, vec![]);
    launch.kill_grace = Duration::from_secs(60);
    let log = launch.log.path().to_path_buf();
    let handle = f.supervisor.start(launch).expect("start");
    wait_for_output(&log, "ready").await;
    let stopped = Instant::now();
    handle.stop(StopReason::Interrupted);
    let stopper = handle.stopper();
    let waiter = tokio::spawn(handle.wait());
    // The first stop has been acted on (the job got its SIGTERM and lives); now insist.
    wait_for_output(&log, "TERM ignored").await;
    stopper.stop(StopReason::Cancelled);
    let outcome = waiter.await.expect("join").expect("outcome");
    assert_eq!(
        outcome.ending,
        Ending::Stopped {
            reason: StopReason::Interrupted,
            signal: Some(9)
        }
    );
    assert!(stopped.elapsed() < SLACK, "took {:?}", stopped.elapsed());
}

#[tokio::test]
async fn shell_metacharacters_in_args_arrive_literally() {
    let f = fixture();
    // Not executable: it goes through the interpreter, as `command_for_script` decides.
    let script = f.path("echo_args.sh");
    std::fs::write(&script, "printf '%s\\n' \"$@\"\n").expect("write");
    let canary = f.path("canary");
    let args: Vec<String> = vec![
        "; rm -rf /".into(),
        "$(whoami)".into(),
        "\"quotes\"".into(),
        "*".into(),
        "a  b".into(),
        "'single'".into(),
        "`touch canary`".into(),
        format!("$(touch {})", canary.display()),
        "$HOME".into(),
        "\\n".into(),
        "".into(),
    ];
    let (program, mut argv) = command_for_script(&script, Path::new("/bin/bash"));
    assert_eq!(program, Path::new("/bin/bash"));
    argv.extend(args.iter().cloned());
    let (outcome, _) = f.run(f.launch("args", program, argv)).await;
    assert_eq!(outcome.ending, Ending::Exited { code: 0 });
    let expected: String = args.iter().map(|a| format!("{a}\n")).collect();
    assert_eq!(stdout_text(&outcome), expected);
    assert!(!canary.exists(), "an argument was executed");
}

#[tokio::test]
async fn stdin_is_dev_null_cwd_is_as_given_and_the_env_is_clean() {
    let f = fixture();
    let cwd = f.path("work dir");
    std::fs::create_dir(&cwd).expect("mkdir");
    let script = f.script(
        "context.sh",
        "echo \"cwd=$(pwd)\"\n\
         if read -r line; then echo \"stdin=$line\"; else echo stdin=eof; fi\n\
         echo \"fd0=$(readlink /proc/$$/fd/0)\"\n\
         echo \"job=$RSQL_AGENT_JOB_ID\"\n\
         echo \"custom=$CUSTOM_SETTING\"\n\
         env | cut -d= -f1 | sort | sed 's/^/name=/'",
    );
    let mut launch = f.launch("context", script, vec![]);
    launch.cwd = cwd.clone();
    launch.env = vec![
        ("CUSTOM_SETTING".into(), "a value; with $(stuff)".into()),
        // A job cannot override the marker the supervisor relies on.
        (JOB_ID_ENV.into(), "forged".into()),
    ];
    let job_id = launch.job_id.clone();
    let (outcome, _) = f.run(launch).await;
    assert_eq!(outcome.ending, Ending::Exited { code: 0 });
    let text = stdout_text(&outcome);
    let lines: Vec<&str> = text.lines().collect();
    assert!(
        lines.contains(&format!("cwd={}", cwd.display()).as_str()),
        "{text}"
    );
    assert!(lines.contains(&"stdin=eof"), "{text}");
    assert!(lines.contains(&"fd0=/dev/null"), "{text}");
    assert!(lines.contains(&format!("job={job_id}").as_str()), "{text}");
    assert!(lines.contains(&"custom=a value; with $(stuff)"), "{text}");
    let names: Vec<&str> = lines
        .iter()
        .filter_map(|l| l.strip_prefix("name="))
        .collect();
    assert!(names.contains(&"PATH"), "{text}");
    // Variables of the agent's own environment that are not on the short list stay out
    // (cargo sets CARGO_MANIFEST_DIR for every test process).
    let leaked: Vec<&str> = names
        .iter()
        .copied()
        .filter(|n| n.starts_with("CARGO") || n.starts_with("RUST") || n.starts_with("AWS"))
        .collect();
    assert!(
        leaked.is_empty(),
        "agent env leaked into the job: {leaked:?}"
    );
}

#[tokio::test]
async fn a_line_longer_than_a_record_is_split_and_reassembles_exactly() {
    let f = fixture();
    let script = f.script(
        "long_line.sh",
        "head -c 600000 /dev/zero | tr '\\0' x\necho\nprintf 'tail without newline'",
    );
    let (outcome, _) = f.run(f.launch("long_line", script, vec![])).await;
    assert_eq!(outcome.ending, Ending::Exited { code: 0 });
    let shape: Vec<(bool, usize)> = joblog::read_records(&outcome.log_path)
        .expect("log")
        .map(|r| r.expect("record"))
        .filter(|r| r.stream == Stream::Stdout)
        .map(|r| (r.complete, r.payload.len()))
        .collect();
    let max = joblog::MAX_RECORD_PAYLOAD;
    assert_eq!(
        shape,
        vec![
            (false, max),
            (false, max),
            (true, 600_000 - 2 * max),
            (false, "tail without newline".len()),
        ]
    );
    let mut expected = vec![b'x'; 600_000];
    expected.push(b'\n');
    expected.extend_from_slice(b"tail without newline");
    assert_eq!(stdout_of(&outcome), expected);
}

#[tokio::test]
async fn a_program_that_cannot_start_is_an_error() {
    let f = fixture();
    let launch = f.launch("missing", f.path("does-not-exist"), vec![]);
    match f.supervisor.start(launch) {
        Err(SupervisorError::Spawn { source, .. }) => {
            assert_eq!(source.kind(), std::io::ErrorKind::NotFound);
        }
        other => panic!("expected a spawn error, got {other:?}"),
    }
}

#[tokio::test]
async fn a_job_nobody_waits_for_is_stopped() {
    let f = fixture();
    let script = f.script("orphaned.sh", "echo ready\nsleep 1000");
    let launch = f.launch("orphaned", script, vec![]);
    let log = launch.log.path().to_path_buf();
    let handle = f.supervisor.start(launch).expect("start");
    let pid = handle.pid() as i32;
    wait_for_output(&log, "ready").await;
    drop(handle);
    assert_gone(pid, "the abandoned job").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_outlives_the_thread_that_started_it() {
    // PR_SET_PDEATHSIG fires when the forking *thread* exits. Start the job from a thread
    // that exits right away: the job must keep running (the supervisor forks elsewhere).
    let f = fixture();
    let script = f.script("survivor.sh", "echo ready\nsleep 0.5\necho still alive");
    let launch = f.launch("survivor", script, vec![]);
    let supervisor = f.supervisor.clone();
    let runtime = tokio::runtime::Handle::current();
    let handle = std::thread::spawn(move || {
        let _entered = runtime.enter();
        supervisor.start(launch).expect("start")
    })
    .join()
    .expect("starter thread");
    let outcome = handle.wait().await.expect("outcome");
    assert_eq!(outcome.ending, Ending::Exited { code: 0 });
    assert!(stdout_text(&outcome).contains("still alive"));
}

/// Waits until `pid` is dead: gone, or a zombie (reaped here if it is this process's).
async fn wait_dead(pid: i32, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            return;
        };
        let fields: Vec<&str> = stat
            .rsplit_once(')')
            .map(|(_, rest)| rest.split_whitespace().collect())
            .unwrap_or_default();
        if fields.first() == Some(&"Z") {
            if fields.get(1).and_then(|p| p.parse::<u32>().ok()) == Some(std::process::id()) {
                let _ = nix::sys::wait::waitpid(Pid::from_raw(pid), None);
            }
            return;
        }
        if Instant::now() >= deadline {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            panic!("{what} (pid {pid}) outlived its agent");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn a_dead_agents_jobs_die_with_it_or_with_the_next_agent() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pid_file = dir.path().join("job.pid");
    // A stand-in agent to SIGKILL: it starts the job and writes its pids. Its stdin stays
    // open (held by `agent`) until this test is done with it.
    let mut agent = std::process::Command::new(bins::killable_agent())
        .arg(&pid_file)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::inherit())
        .spawn()
        .expect("the stand-in agent");
    let deadline = Instant::now() + Duration::from_secs(20);
    let job_pid = loop {
        if let Ok(text) = std::fs::read_to_string(&pid_file) {
            if let Ok(pid) = text.trim().parse::<i32>() {
                break pid;
            }
        }
        if let Some(status) = agent.try_wait().expect("try_wait the stand-in agent") {
            panic!("the stand-in agent ended before it started its job: {status}");
        }
        if Instant::now() >= deadline {
            let _ = agent.kill();
            let _ = agent.wait();
            panic!("the stand-in agent never started its job");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let child_pid = read_pid(&pid_file.with_extension("child"));
    agent.kill().expect("SIGKILL the agent");
    agent.wait().expect("reap the agent");
    // The leader gets SIGKILL from the kernel (PR_SET_PDEATHSIG). If this process is a
    // subreaper (another test in it made it one) the corpse comes here.
    wait_dead(job_pid, "the job's leader").await;
    // Its child was re-parented and lives on until the next agent starts and kills it. (No
    // assertion that it is alive here: under `cargo test` another test's Supervisor::new in
    // this same process may already have killed it.)
    let _next_agent = Supervisor::new().expect("supervisor");
    wait_dead(child_pid, "the job's child").await;
}

/// The first child of `parent`, once it has one.
async fn child_of(parent: u32) -> i32 {
    let path = format!("/proc/{parent}/task/{parent}/children");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        if let Some(pid) = text.split_whitespace().next() {
            return pid.parse().expect("a pid");
        }
        assert!(Instant::now() < deadline, "{parent} has no child");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A root agent's orphan sweep at start must not take the jobs of an agent in another PID
/// namespace (a container, a systemd sandbox) for orphans: their supervisor's pid means
/// nothing here. Each process below carries the marker of a supervisor pid that does not
/// exist; the one in this namespace is killed, the one in a namespace of its own lives.
#[tokio::test]
async fn the_orphan_sweep_leaves_jobs_of_other_pid_namespaces_alone() {
    let dead_supervisor = "999999:1";
    let spawn = |program: &str, args: &[&str]| {
        std::process::Command::new(program)
            .args(args)
            .env(rsql_agent::supervisor::SUPERVISOR_ENV, dead_supervisor)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {program} (util-linux, root): {e}"))
    };
    let mut elsewhere = spawn(
        "unshare",
        &["--pid", "--fork", "--kill-child", "sleep", "60"],
    );
    let inner = child_of(elsewhere.id()).await;
    let mut here = spawn("sleep", &["60"]);
    let here_pid = here.id() as i32;

    rsql_agent::supervisor::kill_orphaned_jobs();

    let status = here.wait().expect("wait for the orphan here");
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&status),
        Some(9),
        "an orphan of this namespace (pid {here_pid}) was not killed"
    );
    assert!(
        !is_gone(inner),
        "the sweep killed {inner}, a job of another PID namespace"
    );
    let _ = kill(Pid::from_raw(elsewhere.id() as i32), Signal::SIGKILL);
    let _ = elsewhere.wait();
}
