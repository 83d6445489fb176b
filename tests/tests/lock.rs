//! The fleet lock against real files and real processes: OFD locks exclude a second job in the
//! same process, a separate process that holds a lock is really killed with SIGKILL, state
//! files stay readable through rapid rewrites, and clean-up never touches a live or unfinished
//! job.
//!
//! The "separate process" is `rsql-test-lock-holder` (`tests/src/bin/lock_holder.rs`): it
//! takes the lock, records a `running` state, says so and blocks until it is killed.

use std::fs;
use std::io::{BufRead, BufReader};
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::thread;
use std::time::{Duration, Instant, SystemTime};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use rsql_agent::lock::{
    decide, token_hash, Acquire, Decision, JobLock, LockDir, LockState, OnInterrupted, RunState,
};
use rsql_agent_tests::bins;

/// What the lock holder prints, followed by its pid, once it holds the lock.
const READY: &str = "locked ";
const DEADLINE: Duration = Duration::from_secs(30);

fn lock_dir() -> (tempfile::TempDir, LockDir) {
    let dir = tempfile::tempdir().expect("tempdir");
    let locks = LockDir::open(&dir.path().join("locks")).expect("open lock dir");
    (dir, locks)
}

fn acquire(locks: &LockDir, key: &str) -> JobLock {
    match locks.try_acquire(key).expect("try_acquire") {
        Acquire::Acquired(lock) => lock,
        Acquire::Busy { holder } => panic!("{key} should be free, held by {holder:?}"),
    }
}

fn expect_busy(locks: &LockDir, key: &str) -> Option<LockState> {
    match locks.try_acquire(key).expect("try_acquire") {
        Acquire::Busy { holder } => holder,
        Acquire::Acquired(lock) => panic!("{key} should be busy, got it: {lock:?}"),
    }
}

/// Polls `f` until it returns `Some`, failing the test at the deadline.
fn poll<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + DEADLINE;
    loop {
        if let Some(value) = f() {
            return value;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn second_job_in_the_same_process_is_busy_and_sees_the_holder() {
    let (_dir, locks) = lock_dir();
    let key = "exec-1/rsql_blog_script_1.sh";
    let mut first = acquire(&locks, key);
    assert_eq!(first.key(), key);
    assert_eq!(first.previous(), None);
    let running = LockState::new_running(key, "i-first", &token_hash("token-1"), 1);
    first.write_state(&running).expect("write state");

    // Same LockDir and a separately opened one: either way a new open file description, so
    // the OFD lock conflicts even though the owner is this very process. A per-process POSIX
    // lock would have granted both.
    let other_dir = LockDir::open(locks.dir()).expect("reopen");
    for dir in [&locks, &other_dir] {
        let holder = expect_busy(dir, key).expect("holder state is visible");
        assert_eq!(holder.pid, std::process::id());
        assert_eq!(holder.instance_id, "i-first");
        assert_eq!(holder.token_hash, token_hash("token-1"));
        assert_eq!(holder.state, RunState::Running);
    }

    // Other keys are independent.
    let _unrelated = acquire(&locks, "exec-1/rsql_blog_script_2.sh");

    // Dropping the lock frees it, and the next owner sees what the first one left.
    drop(first);
    let second = acquire(&locks, key);
    let previous = second.previous().expect("previous state");
    assert_eq!(previous.token_hash, token_hash("token-1"));
    assert_eq!(previous.state, RunState::Running);

    // An explicit release frees it too.
    second.release().expect("release");
    drop(acquire(&locks, key));
}

#[test]
fn threads_racing_for_one_key_never_hold_it_together() {
    let (_dir, locks) = lock_dir();
    let holders = Arc::new(AtomicUsize::new(0));
    let wins = Arc::new(AtomicUsize::new(0));
    let threads: Vec<_> = (0..4)
        .map(|_| {
            let (locks, holders, wins) = (locks.clone(), holders.clone(), wins.clone());
            thread::spawn(move || {
                for _ in 0..300 {
                    if let Acquire::Acquired(lock) = locks.try_acquire("race").expect("try") {
                        assert_eq!(holders.fetch_add(1, Ordering::SeqCst), 0, "two holders");
                        wins.fetch_add(1, Ordering::SeqCst);
                        thread::yield_now();
                        holders.fetch_sub(1, Ordering::SeqCst);
                        lock.release().expect("release");
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().expect("racer");
    }
    assert!(wins.load(Ordering::SeqCst) > 0);
}

/// The lock holder process; killed if the test fails before it does.
struct Helper(Child);

impl Drop for Helper {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn_holder(dir: &Path, key: &str, token: &str) -> Helper {
    let mut child = Command::new(bins::lock_holder())
        .arg(dir)
        .args([key, token])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn the lock holder");
    let stdout = child.stdout.take().expect("the lock holder's stdout");
    let helper = Helper(child);
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    match rx.recv_timeout(DEADLINE) {
        Ok(line) if line.starts_with(READY) => {
            assert_eq!(
                line[READY.len()..].parse::<u32>().ok(),
                Some(helper.0.id()),
                "the lock holder named another pid: {line:?}"
            );
            helper
        }
        Ok(line) => panic!("the lock holder said {line:?} instead of {READY:?}"),
        Err(e) => panic!("the lock holder never reported the lock taken: {e}"),
    }
}

#[test]
fn lock_held_by_a_killed_process_is_freed_and_interrupted() {
    let (_dir, locks) = lock_dir();
    let key = "exec-7/rsql_blog_script_3.sh";
    let token = "task-token-attempt-1";
    let mut helper = spawn_holder(locks.dir(), key, token);
    let helper_pid = helper.0.id();

    let holder = expect_busy(&locks, key).expect("holder state is visible");
    assert_eq!(holder.pid, helper_pid, "the other process holds it");
    assert_eq!(holder.state, RunState::Running);

    kill(Pid::from_raw(helper_pid as i32), Signal::SIGKILL).expect("SIGKILL helper");
    let status = helper.0.wait().expect("reap helper");
    assert_eq!(
        status.signal(),
        Some(libc::SIGKILL),
        "helper died of SIGKILL"
    );

    let lock = poll("the dead holder's lock to be free", || {
        match locks.try_acquire(key).expect("try_acquire") {
            Acquire::Acquired(lock) => Some(lock),
            Acquire::Busy { .. } => None,
        }
    });
    let previous = lock.previous().expect("the dead owner's record").clone();
    assert_eq!(previous.state, RunState::Running);
    assert_eq!(previous.pid, helper_pid);
    assert_eq!(previous.token_hash, token_hash(token));

    // A redelivery of the same message: the owner died mid-run.
    assert_eq!(
        decide(Some(&previous), &token_hash(token), OnInterrupted::Fail),
        Decision::Interrupted(previous.clone())
    );
    assert_eq!(
        decide(Some(&previous), &token_hash(token), OnInterrupted::Rerun),
        Decision::Run { attempt: 2 }
    );
    // A Step Functions retry brings a new token: it runs, the dead attempt notwithstanding.
    assert_eq!(
        decide(
            Some(&previous),
            &token_hash("task-token-attempt-2"),
            OnInterrupted::Fail
        ),
        Decision::Run { attempt: 2 }
    );
}

#[test]
fn finished_job_is_replayed_to_a_redelivery() {
    let (_dir, locks) = lock_dir();
    let key = "exec-2/rsql_blog_script_4.sh";
    let token = token_hash("token-a");
    let mut lock = acquire(&locks, key);
    let Decision::Run { attempt } = decide(lock.previous(), &token, OnInterrupted::Fail) else {
        panic!("a fresh key runs");
    };
    let mut state = LockState::new_running(key, "i-1", &token, attempt);
    lock.write_state(&state).expect("running");
    lock.touch().expect("heartbeat");
    state.state = RunState::Completed;
    state.exit_code = Some(0);
    let outcome = serde_json::json!({"status": "completed", "output": {"exit_code": 0}});
    state.outcome = Some(outcome.clone());
    lock.write_state(&state).expect("completed");
    lock.release().expect("release");

    let again = acquire(&locks, key);
    match decide(again.previous(), &token, OnInterrupted::Rerun) {
        Decision::Replay(recorded) => {
            assert_eq!(recorded.outcome, Some(outcome));
            assert_eq!(recorded.exit_code, Some(0));
        }
        other => panic!("a finished job must be replayed, got {other:?}"),
    }
}

#[test]
fn state_file_always_parses_during_rapid_touches() {
    let (_dir, locks) = lock_dir();
    let key = "exec-3/big_output.sh";
    let mut lock = acquire(&locks, key);
    let mut state = LockState::new_running(key, "i-1", &token_hash("t"), 1);
    // A large record, so a torn write would be easy to catch mid-way.
    state.outcome =
        Some(serde_json::json!({"status": "running", "output": "x".repeat(256 * 1024)}));
    lock.write_state(&state).expect("write");

    let reads = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let reader = {
        let (locks, reads, stop) = (locks.clone(), reads.clone(), stop.clone());
        let key = key.to_owned();
        thread::spawn(move || {
            let mut last_heartbeat = String::new();
            while !stop.load(Ordering::SeqCst) {
                let seen = locks
                    .read_state(&key)
                    .unwrap_or_else(|e| panic!("read {} failed: {e}", reads.load(Ordering::SeqCst)))
                    .expect("the state file never disappears");
                assert_eq!(seen.lock_key, key);
                // RFC 3339 UTC with fixed millisecond precision sorts as text.
                assert!(
                    seen.heartbeat_at >= last_heartbeat,
                    "heartbeat went backwards"
                );
                last_heartbeat = seen.heartbeat_at;
                reads.fetch_add(1, Ordering::SeqCst);
            }
        })
    };

    let deadline = Instant::now() + DEADLINE;
    let mut touches = 0;
    while touches < 200 || reads.load(Ordering::SeqCst) < 200 {
        assert!(
            Instant::now() < deadline && !reader.is_finished(),
            "reader failed or too slow: {touches} touches, {} reads",
            reads.load(Ordering::SeqCst)
        );
        lock.touch().expect("touch");
        touches += 1;
    }
    stop.store(true, Ordering::SeqCst);
    reader.join().expect("reader saw a whole record every time");

    let last = locks.read_state(key).expect("read").expect("state");
    assert_eq!(last.outcome, state.outcome);
    let leftovers: Vec<_> = fs::read_dir(locks.dir())
        .expect("list")
        .map(|e| e.expect("entry").file_name())
        .filter(|name| name.to_string_lossy().ends_with(".tmp"))
        .collect();
    assert!(
        leftovers.is_empty(),
        "temp files left behind: {leftovers:?}"
    );
}

/// Writes a record for `key` as an agent would have two days ago.
fn age_record(locks: &LockDir, key: &str) {
    let mut state = locks.read_state(key).expect("read").expect("state");
    state.updated_at = "2000-01-01T00:00:00.000Z".to_owned();
    fs::write(
        locks.state_path_for(key),
        serde_json::to_vec(&state).expect("json"),
    )
    .expect("write aged record");
}

fn record(locks: &LockDir, key: &str, run_state: RunState) -> JobLock {
    let mut lock = acquire(locks, key);
    let mut state = LockState::new_running(key, "i-1", &token_hash(key), 1);
    state.state = run_state;
    lock.write_state(&state).expect("write");
    lock
}

#[test]
fn cleanup_removes_only_old_finished_unheld_entries() {
    let (_dir, locks) = lock_dir();
    let retention = Duration::from_secs(24 * 3600);

    record(&locks, "old-final", RunState::Completed)
        .release()
        .expect("release");
    age_record(&locks, "old-final");
    record(&locks, "old-failed", RunState::Failed)
        .release()
        .expect("release");
    age_record(&locks, "old-failed");
    record(&locks, "recent-final", RunState::Completed)
        .release()
        .expect("release");
    // A dead owner's `running` record is evidence for the interrupted rule: kept however old.
    record(&locks, "old-running", RunState::Running)
        .release()
        .expect("release");
    age_record(&locks, "old-running");
    // Final and old, but someone holds the lock right now (a new attempt about to write).
    let held = record(&locks, "old-final-held", RunState::Completed);
    age_record(&locks, "old-final-held");
    // A lock file whose job never wrote a record, untouched for two days.
    let orphan = locks.path_for("orphan");
    drop(acquire(&locks, "orphan"));
    fs::File::options()
        .write(true)
        .open(&orphan)
        .expect("open orphan")
        .set_modified(SystemTime::now() - 2 * retention)
        .expect("age orphan");
    // Files the lock did not create are none of its business.
    let stranger = locks.dir().join("README.txt");
    fs::write(&stranger, "ops notes").expect("stranger");

    assert_eq!(locks.cleanup(retention).expect("cleanup"), 3);

    for gone in ["old-final", "old-failed", "orphan"] {
        assert!(!locks.path_for(gone).exists(), "{gone}.lock removed");
        assert!(!locks.state_path_for(gone).exists(), "{gone}.state removed");
    }
    for kept in ["recent-final", "old-running", "old-final-held"] {
        assert!(locks.path_for(kept).exists(), "{kept}.lock kept");
        assert!(
            locks.read_state(kept).expect("read").is_some(),
            "{kept}.state kept"
        );
    }
    assert!(stranger.exists());
    // The held lock is still held: cleanup did not unlink it from under its owner.
    expect_busy(&locks, "old-final-held");
    drop(held);
    assert!(acquire(&locks, "old-final-held").previous().is_some());
    // A removed key starts afresh.
    assert_eq!(acquire(&locks, "old-final").previous(), None);

    // Once its owner let go, the old finished entry goes on the next sweep, and then there is
    // nothing left to do.
    assert_eq!(locks.cleanup(retention).expect("cleanup again"), 1);
    assert!(locks.read_state("old-final-held").expect("read").is_none());
    assert_eq!(locks.cleanup(retention).expect("cleanup a third time"), 0);
}
