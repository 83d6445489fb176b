//! The command line as an operator meets it: `check-config` and its exit codes.

use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Output};

use rsql_agent_tests::bins;

fn check_config(text: Option<&str>) -> (Output, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let scripts = dir.path().join("scripts");
    std::fs::create_dir(&scripts).unwrap();
    std::fs::set_permissions(&scripts, std::fs::Permissions::from_mode(0o755)).unwrap();
    let path = dir.path().join("agent.toml");
    if let Some(text) = text {
        std::fs::write(
            &path,
            text.replace("SCRIPTS", &scripts.display().to_string()),
        )
        .unwrap();
    }
    let out = Command::new(bins::agent())
        .arg("check-config")
        .arg(&path)
        .output()
        .unwrap();
    (out, dir)
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn valid_config_exits_zero() {
    let (out, _dir) = check_config(Some(
        "[agent]\nmax_concurrent_jobs = 2\n[jobs]\nscript_dir = \"SCRIPTS\"\nkill_grace = \"5s\"\n",
    ));
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("OK"));
}

#[test]
fn unknown_key_exits_78_and_names_the_key() {
    let (out, _dir) = check_config(Some(
        "[jobs]\nscript_dir = \"SCRIPTS\"\n[intake.sqs]\nqueue_url = \"https://q\"\nwait_seconds = 5\n",
    ));
    assert_eq!(out.status.code(), Some(78), "{}", stderr(&out));
    assert!(stderr(&out).contains("wait_seconds"), "{}", stderr(&out));
}

#[test]
fn invalid_value_exits_78_and_names_the_key() {
    let (out, _dir) = check_config(Some(
        "[jobs]\nscript_dir = \"SCRIPTS\"\nkill_grace = \"soon\"\n",
    ));
    assert_eq!(out.status.code(), Some(78), "{}", stderr(&out));
    assert!(stderr(&out).contains("jobs.kill_grace"), "{}", stderr(&out));
}

#[test]
fn broken_toml_exits_78() {
    let (out, _dir) = check_config(Some("[jobs\nscript_dir = \n"));
    assert_eq!(out.status.code(), Some(78), "{}", stderr(&out));
}

#[test]
fn missing_file_exits_66() {
    let (out, _dir) = check_config(None);
    assert_eq!(out.status.code(), Some(66), "{}", stderr(&out));
    assert!(stderr(&out).contains("agent.toml"), "{}", stderr(&out));
}

#[test]
fn bad_arguments_exit_2() {
    let out = Command::new(bins::agent())
        .arg("frobnicate")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("frobnicate"), "{}", stderr(&out));
}
