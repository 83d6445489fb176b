use super::*;
use std::os::unix::fs::PermissionsExt;

struct Fixture {
    dir: tempfile::TempDir,
}

impl Fixture {
    fn new() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let scripts = dir.path().join("scripts");
        std::fs::create_dir(&scripts).unwrap();
        std::fs::write(scripts.join("job.sh"), "echo hi\n").unwrap();
        std::fs::create_dir(scripts.join("sub")).unwrap();
        std::fs::write(scripts.join("sub/inner.sh"), "echo hi\n").unwrap();
        std::fs::write(dir.path().join("outside.sh"), "echo bad\n").unwrap();
        std::os::unix::fs::symlink(dir.path().join("outside.sh"), scripts.join("link.sh")).unwrap();
        std::fs::set_permissions(&scripts, std::fs::Permissions::from_mode(0o755)).unwrap();
        Fixture { dir }
    }
    fn scripts(&self) -> PathBuf {
        self.dir.path().join("scripts")
    }
    fn parse(&self, body: &str) -> Result<JobSpec, InvalidJob> {
        let scripts = self.scripts();
        JobSpec::parse(
            body.as_bytes(),
            &JobRules {
                script_dir: &scripts,
                default_timeout: Duration::from_secs(3600),
                require_token: true,
            },
        )
    }
}

fn msg(job_name: &str) -> String {
    serde_json::json!({
        "task_token": "tok-123", "workflow_id": "wf", "workflow_execution_id": "ex1",
        "job_name": job_name, "args": [], "timeout_seconds": 60, "heartbeat_seconds": 30,
        "lock_key": null
    })
    .to_string()
}

#[test]
fn contract_message_parses() {
    let f = Fixture::new();
    let spec = f.parse(&msg("job.sh")).unwrap();
    assert_eq!(spec.task_token.as_deref(), Some("tok-123"));
    assert_eq!(spec.timeout, Duration::from_secs(60));
    assert_eq!(spec.heartbeat, Some(Duration::from_secs(30)));
    assert_eq!(spec.lock_key, "ex1/job.sh");
    assert_eq!(
        spec.script,
        f.scripts().canonicalize().unwrap().join("job.sh")
    );
}

#[test]
fn a_message_may_carry_its_own_memory_limit_in_whole_mib() {
    let f = Fixture::new();
    let with = |value: serde_json::Value| {
        let mut body: serde_json::Value = serde_json::from_str(&msg("job.sh")).unwrap();
        body["memory_max_mb"] = value;
        f.parse(&body.to_string())
    };
    assert_eq!(
        with(serde_json::json!(512)).unwrap().memory_max,
        Some(512 << 20)
    );
    assert_eq!(f.parse(&msg("job.sh")).unwrap().memory_max, None);
    for bad in [
        serde_json::json!(0),
        serde_json::json!(8),
        serde_json::json!(1.5),
        serde_json::json!(-1),
        serde_json::json!("512M"),
    ] {
        let err = with(bad.clone()).expect_err("refused");
        assert!(err.to_string().contains("memory_max_mb"), "{bad}: {err}");
        assert_eq!(err.task_token.as_deref(), Some("tok-123"));
    }
}

#[test]
fn legacy_args_are_two_strings_and_crlf_scripts_are_refused_with_the_fix() {
    let f = Fixture::new();
    let mut body: serde_json::Value = serde_json::from_str(&msg("job.sh")).unwrap();
    // The code dir is where legacy scripts source code from: it must exist and be as
    // trusted as the scripts (the fixture's private temp directory is).
    let code = f.scripts().display().to_string();
    body["legacy_args"] = serde_json::json!([code, "rsql/blog"]);
    let spec = f.parse(&body.to_string()).unwrap();
    assert_eq!(
        spec.legacy_args,
        Some([code.clone(), "rsql/blog".to_string()])
    );
    assert_eq!(f.parse(&msg("job.sh")).unwrap().legacy_args, None);
    for bad in [
        serde_json::json!([code]),
        serde_json::json!("x"),
        serde_json::json!(["relative/code", "s"]),
        serde_json::json!(["/nonexistent/rsql-code", "s"]),
    ] {
        body["legacy_args"] = bad.clone();
        let err = f.parse(&body.to_string()).expect_err("refused");
        assert!(err.to_string().contains("legacy_args"), "{bad}: {err}");
    }

    std::fs::write(f.scripts().join("dos.sh"), "#!/bin/bash\r\nexit 0\r\n").unwrap();
    let err = f.parse(&msg("dos.sh")).unwrap_err();
    assert!(
        matches!(err.error, JobError::CrlfLineEndings { line: 1, .. }),
        "{err}"
    );
    assert!(
        err.to_string().contains("numeric argument required"),
        "{err}"
    );
    assert!(err.to_string().contains("sed -i"), "{err}");
    assert_eq!(err.task_token.as_deref(), Some("tok-123"));
}

#[test]
fn legacy_aliases_are_accepted() {
    let f = Fixture::new();
    let body =
        r#"{"token":"t","workflow_id":"w","workflow_execution_id":"e","script":"sub/inner.sh"}"#;
    let spec = f.parse(body).unwrap();
    assert_eq!(spec.task_token.as_deref(), Some("t"));
    assert_eq!(spec.job_name, "sub/inner.sh");
    assert_eq!(spec.timeout, Duration::from_secs(3600));
}

#[test]
fn dot_dot_escape_is_rejected_with_token() {
    let f = Fixture::new();
    let err = f.parse(&msg("../outside.sh")).unwrap_err();
    assert!(matches!(err.error, JobError::PathEscape { .. }), "{err}");
    assert_eq!(err.task_token.as_deref(), Some("tok-123"));
    let err = f.parse(&msg("../../etc/passwd")).unwrap_err();
    assert!(matches!(err.error, JobError::PathEscape { .. }), "{err}");
}

#[test]
fn symlink_escape_is_rejected() {
    let f = Fixture::new();
    let err = f.parse(&msg("link.sh")).unwrap_err();
    assert!(matches!(err.error, JobError::PathEscape { .. }), "{err}");
}

#[test]
fn absolute_path_is_rejected() {
    let f = Fixture::new();
    let err = f.parse(&msg("/bin/sh")).unwrap_err();
    assert!(matches!(err.error, JobError::AbsolutePath { .. }), "{err}");
}

#[test]
fn nul_byte_is_rejected() {
    let f = Fixture::new();
    let err = f.parse(&msg("job.sh\u{0}x")).unwrap_err();
    assert!(err.to_string().contains("NUL"), "{err}");
}

#[test]
fn unknown_script_is_rejected() {
    let f = Fixture::new();
    let err = f.parse(&msg("nope.sh")).unwrap_err();
    assert!(matches!(err.error, JobError::UnknownScript { .. }), "{err}");
}

#[test]
fn bad_timeouts_are_rejected() {
    let f = Fixture::new();
    for (value, needle) in [
        ("-5", "positive"),
        ("0", "positive"),
        ("1.5", "whole"),
        ("\"1h\"", "whole number"),
        ("99999999999", "maximum"),
    ] {
        let body = msg("job.sh").replace(
            "\"timeout_seconds\":60",
            &format!("\"timeout_seconds\":{value}"),
        );
        let err = f.parse(&body).unwrap_err();
        assert!(
            err.to_string().contains("timeout_seconds"),
            "{value}: {err}"
        );
        assert!(err.to_string().contains(needle), "{value}: {err}");
    }
}

#[test]
fn wrong_types_name_the_field() {
    let f = Fixture::new();
    let body = msg("job.sh").replace("\"args\":[]", "\"args\":\"a b\"");
    let err = f.parse(&body).unwrap_err();
    assert!(err.to_string().contains("`args`"), "{err}");
    let body = msg("job.sh").replace("\"args\":[]", "\"args\":[1]");
    assert!(f
        .parse(&body)
        .unwrap_err()
        .to_string()
        .contains("element 0"));
    let body = msg("job.sh").replace("\"workflow_id\":\"wf\"", "\"workflow_id\":7");
    assert!(f
        .parse(&body)
        .unwrap_err()
        .to_string()
        .contains("`workflow_id`"));
}

#[test]
fn missing_job_name_keeps_token() {
    let f = Fixture::new();
    let err = f
        .parse(r#"{"task_token":"tok","workflow_id":"w","workflow_execution_id":"e"}"#)
        .unwrap_err();
    assert!(matches!(err.error, JobError::Missing("job_name")));
    assert_eq!(err.task_token.as_deref(), Some("tok"));
}

#[test]
fn unknown_field_is_named() {
    let f = Fixture::new();
    let body = msg("job.sh").replace("\"lock_key\":null", "\"timeout_secs\":5");
    let err = f.parse(&body).unwrap_err();
    assert!(err.to_string().contains("timeout_secs"), "{err}");
}

#[test]
fn oversized_body_is_rejected_with_token() {
    let f = Fixture::new();
    let body = format!(
        r#"{{"task_token":"big","job_name":"job.sh","pad":"{}"}}"#,
        "x".repeat(MAX_MESSAGE_BYTES)
    );
    let err = f.parse(&body).unwrap_err();
    assert!(matches!(err.error, JobError::TooLarge { .. }));
    assert_eq!(err.task_token.as_deref(), Some("big"));
}

#[test]
fn token_is_recovered_from_broken_json() {
    let f = Fixture::new();
    let err = f
        .parse(r#"{"task_token": "AAA\"B", "job_name": "job.sh", oops}"#)
        .unwrap_err();
    assert!(matches!(err.error, JobError::BadJson(_)));
    assert_eq!(err.task_token.as_deref(), Some("AAA\"B"));
    assert_eq!(scavenge_token(b"garbage"), None);
    assert_eq!(
        scavenge_token(br#"{"token":"legacy","#).as_deref(),
        Some("legacy")
    );
}

#[test]
fn debug_does_not_print_token() {
    let f = Fixture::new();
    let spec = f.parse(&msg("job.sh")).unwrap();
    assert!(!format!("{spec:?}").contains("tok-123"));
}
