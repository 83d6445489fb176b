//! `rsql-test-lock-holder DIR KEY TOKEN`: a separate process that holds a fleet lock until it
//! is killed, for `tests/tests/lock.rs`.
//!
//! It opens the lock directory `DIR`, takes the lock of `KEY`, records a `running` state for
//! `TOKEN` (instance `i-helper`), prints `locked PID` on stdout and blocks until its stdin
//! closes. The test keeps stdin open and SIGKILLs it; should the test die first, the closed
//! pipe ends the wait, so no holder outlives the test run.

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use rsql_agent::lock::{token_hash, Acquire, LockDir, LockState};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [dir, key, token] = args.as_slice() else {
        eprintln!("usage: rsql-test-lock-holder DIR KEY TOKEN");
        return ExitCode::from(2);
    };
    let locks = LockDir::open(&PathBuf::from(dir)).expect("lock holder: open the lock dir");
    let mut lock = match locks.try_acquire(key).expect("lock holder: try_acquire") {
        Acquire::Acquired(lock) => lock,
        Acquire::Busy { holder } => {
            eprintln!("lock holder: {key} is busy, held by {holder:?}");
            return ExitCode::FAILURE;
        }
    };
    let state = LockState::new_running(key, "i-helper", &token_hash(token), 1);
    lock.write_state(&state)
        .expect("lock holder: write the running state");
    let mut stdout = std::io::stdout();
    writeln!(stdout, "locked {}", std::process::id()).expect("lock holder: stdout");
    stdout.flush().expect("lock holder: flush stdout");
    let _ = std::io::stdin().read_to_end(&mut Vec::new());
    drop(lock);
    ExitCode::SUCCESS
}
