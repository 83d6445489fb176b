//! Paths of the workspace binaries under test.
//!
//! Integration tests in this crate only get `CARGO_BIN_EXE_*` for this crate's own binaries,
//! so the agent's and the wrapper's binaries are found next to the test executable, in the
//! shared target directory that `cargo build --workspace` / `cargo nextest run --workspace`
//! fills.

use std::path::PathBuf;

/// The profile directory (`target/debug` or `target/release`) holding the built binaries.
pub fn target_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("RSQL_TEST_BIN_DIR") {
        return PathBuf::from(dir);
    }
    let exe = std::env::current_exe().expect("current_exe");
    let mut dir = exe
        .parent()
        .expect("test binary has a parent")
        .to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    dir
}

fn bin(name: &str) -> PathBuf {
    let path = target_dir().join(name);
    assert!(
        path.exists(),
        "{} is not built at {}; build the workspace first (`cargo build --workspace` or `make test`)",
        name,
        path.display()
    );
    path
}

/// The `rsql-agent` daemon/CLI binary.
pub fn agent() -> PathBuf {
    bin("rsql-agent")
}

/// The `rsql-wrapper` binary.
pub fn wrapper() -> PathBuf {
    bin("rsql-wrapper")
}

/// The `rsql` stand-in for PostgreSQL.
pub fn rsql() -> PathBuf {
    bin("rsql")
}

/// `rsql-test-lock-holder` (`tests/src/bin/lock_holder.rs`): another process holding a
/// fleet lock until it is killed.
pub fn lock_holder() -> PathBuf {
    bin("rsql-test-lock-holder")
}

/// `rsql-test-killable-agent` (`tests/src/bin/killable_agent.rs`): a stand-in agent that
/// starts one job under its own supervisor and waits to be SIGKILLed.
pub fn killable_agent() -> PathBuf {
    bin("rsql-test-killable-agent")
}

/// Directory holding the `rsql` stand-in, to put first on a job's `PATH`.
pub fn rsql_dir() -> PathBuf {
    rsql().parent().expect("rsql has a parent").to_path_buf()
}

/// The workspace root (where `rsql_scripts/` lives).
pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests crate sits in the workspace")
        .to_path_buf()
}
