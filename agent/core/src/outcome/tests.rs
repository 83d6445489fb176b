#[test]
fn a_password_with_json_escapes_is_masked_value_by_value_and_the_output_stays_json() {
    // A password no other test uses: the set of remembered secrets is process-wide.
    let password = "q\"uo\\te-9f3Z";
    crate::masking::remember(password);
    let out = super::SuccessOutput {
        job_name: "rsql_blog_script_1.sh".into(),
        workflow_execution_id: "night_1".into(),
        status: "completed".into(),
        exit_code: 0,
        duration_ms: 1,
        instance_id: "i-1".into(),
        log_group: None,
        log_stream: None,
        log_file: Some(format!("/logs/{password}/x.log")),
        cpu_ms: None,
        max_rss_mb: None,
        log_complete: None,
    };
    let json: serde_json::Value =
        serde_json::from_str(&out.output_json()).expect("the output is still JSON");
    assert_eq!(json["log_file"], "/logs/***/x.log");
    assert_eq!(json["job_name"], "rsql_blog_script_1.sh");
}

use super::*;

/// A 5 ms run of `j.sh` with a 10 s timeout, classified.
fn classified(
    ending: &Ending,
    sql_error: Option<SqlError>,
    stderr_tail: &str,
    usage: Usage,
) -> Outcome {
    classify(Finished {
        job_name: "j.sh",
        workflow_execution_id: "ex",
        instance_id: "i-1",
        ending,
        duration_ms: 5,
        timeout_secs: 10,
        sql_error,
        stderr_tail: stderr_tail.to_string(),
        log: LogLocation::default(),
        usage,
        log_complete: true,
    })
}

fn finished(ending: &Ending, sql_error: Option<SqlError>) -> Outcome {
    classified(ending, sql_error, "tail", Usage::default())
}

#[test]
fn endings_map_to_contract_errors() {
    let err = |o: Outcome| match o {
        Outcome::Failed(f) => f.error,
        other => panic!("expected failure, got {other:?}"),
    };
    assert!(matches!(
        finished(&Ending::Exited { code: 0 }, None),
        Outcome::Completed(_)
    ));
    assert_eq!(
        err(finished(&Ending::Exited { code: 3 }, None)),
        ErrorName::ScriptFailed
    );
    assert_eq!(
        err(finished(
            &Ending::Exited { code: 3 },
            Some(SqlError {
                sql_state: Some("08006".into()),
                message: "connection failure".into()
            })
        )),
        ErrorName::ConnectionFailed
    );
    assert_eq!(
        err(finished(&Ending::TimedOut { signal: 15 }, None)),
        ErrorName::Timeout
    );
    assert_eq!(
        err(finished(&Ending::Signaled { signal: 9 }, None)),
        ErrorName::Killed
    );
    // A wrapper script whose rsql was SIGKILLed exits 137: Killed, not ScriptFailed.
    let Outcome::Failed(f) = finished(&Ending::Exited { code: 137 }, None) else {
        panic!("137 is a failure")
    };
    assert_eq!(f.error, ErrorName::Killed);
    assert_eq!(f.cause.exit_code, Some(137));
    assert_eq!(f.cause.signal.as_deref(), Some("SIGKILL"));
    assert!(f.cause.message.contains("OOM"), "{}", f.cause.message);
    // Other codes above 128 are the script's own choice.
    assert_eq!(
        err(finished(&Ending::Exited { code: 143 }, None)),
        ErrorName::ScriptFailed
    );
    assert_eq!(
        err(finished(
            &Ending::Stopped {
                reason: StopReason::Interrupted,
                signal: Some(15)
            },
            None
        )),
        ErrorName::Interrupted
    );
    assert!(matches!(
        finished(
            &Ending::Stopped {
                reason: StopReason::Cancelled,
                signal: Some(15)
            },
            None
        ),
        Outcome::Cancelled { .. }
    ));
}

#[test]
fn sql_error_reaches_cause() {
    let o = finished(
        &Ending::Exited { code: 4 },
        Some(SqlError {
            sql_state: Some("42P01".into()),
            message: "relation \"x\" does not exist".into(),
        }),
    );
    let Outcome::Failed(f) = o else { panic!() };
    let cause: serde_json::Value = serde_json::from_str(&f.cause_json()).unwrap();
    assert_eq!(cause["sql_state"], "42P01");
    assert_eq!(cause["exit_code"], 4);
    assert_eq!(cause["message"], "relation \"x\" does not exist");
}

#[test]
fn huge_cause_is_truncated_to_valid_json() {
    let f = Failure {
        error: ErrorName::ScriptFailed,
        cause: FailureCause {
            message: "m".repeat(100_000),
            stderr_tail: "é\"\\".repeat(50_000),
            ..FailureCause::default()
        },
    };
    let json = f.cause_json();
    assert!(json.chars().count() <= MAX_CAUSE_CHARS);
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert!(v["message"].as_str().unwrap().starts_with("mmm"));
}

/// A redelivery replays the outcome the lock state recorded; every kind must read back
/// as written, and in the flat form older agents wrote and read.
#[test]
fn every_outcome_reads_back_as_written_from_one_flat_object() {
    let outcomes = [
        finished(&Ending::Exited { code: 0 }, None),
        finished(&Ending::Exited { code: 3 }, None),
        finished(&Ending::TimedOut { signal: 15 }, None),
        Outcome::Cancelled {
            message: "stopped upstream".into(),
        },
    ];
    for outcome in outcomes {
        let text = serde_json::to_string(&outcome).unwrap();
        assert_eq!(
            text.matches("\"status\"").count(),
            1,
            "one status key in {text}"
        );
        let back: Outcome = serde_json::from_str(&text).unwrap();
        assert_eq!(back, outcome, "{text}");
        let back: Outcome =
            serde_json::from_value(serde_json::to_value(&outcome).unwrap()).unwrap();
        assert_eq!(back, outcome);
    }
    let v = serde_json::to_value(finished(&Ending::Exited { code: 0 }, None)).unwrap();
    assert_eq!(v["status"], "completed");
    assert_eq!(v["exit_code"], 0);
    let v = serde_json::to_value(finished(&Ending::Exited { code: 3 }, None)).unwrap();
    assert_eq!(v["status"], "failed");
    assert_eq!(v["error"], "Rsql.ScriptFailed");
    assert_eq!(v["cause"]["exit_code"], 3);
}

#[test]
fn an_unknown_or_missing_status_is_an_error_naming_it() {
    let err = serde_json::from_str::<Outcome>(r#"{"status":"exploded"}"#).unwrap_err();
    assert!(err.to_string().contains("exploded"), "{err}");
    let err = serde_json::from_str::<Outcome>(r#"{"message":"x"}"#).unwrap_err();
    assert!(err.to_string().contains("status"), "{err}");
}

fn with_usage(ending: &Ending, usage: Usage) -> Outcome {
    classified(ending, None, "", usage)
}

/// The cgroup files of a job whose rsql grew past a 512 MiB `memory.max`
/// (`memory.oom.group = 1`: the script went with it).
fn oom_usage() -> Usage {
    crate::cgroup::files::usage_from(
        Some("usage_usec 2500400\nuser_usec 2100000\nsystem_usec 400400\n"),
        Some("536870912\n"),
        Some("low 0\nhigh 0\nmax 1893\noom 2\noom_kill 2\noom_group_kill 1\n"),
        Some(512 * 1024 * 1024),
    )
}

#[test]
fn an_oom_kill_is_rsql_killed_with_reason_oom_naming_the_limit() {
    for ending in [Ending::Signaled { signal: 9 }, Ending::Exited { code: 137 }] {
        let Outcome::Failed(f) = with_usage(&ending, oom_usage()) else {
            panic!("an OOM kill is a failure")
        };
        assert_eq!(f.error, ErrorName::Killed, "{ending:?}");
        assert_eq!(f.cause.reason.as_deref(), Some("oom"));
        assert!(f.cause.message.contains("512 MiB"), "{}", f.cause.message);
        assert!(
            f.cause.message.contains("memory.max"),
            "{}",
            f.cause.message
        );
        let cause: serde_json::Value = serde_json::from_str(&f.cause_json()).unwrap();
        assert_eq!(cause["reason"], "oom");
        assert_eq!(cause["cpu_ms"], 2500);
        assert_eq!(cause["max_rss_mb"], 512);
    }
    // Without a limit of its own, the message says the host ran out.
    let Outcome::Failed(f) = with_usage(
        &Ending::Signaled { signal: 9 },
        Usage {
            memory_max: None,
            ..oom_usage()
        },
    ) else {
        panic!()
    };
    assert_eq!(f.cause.reason.as_deref(), Some("oom"));
    assert!(
        f.cause.message.contains("no memory limit"),
        "{}",
        f.cause.message
    );
}

#[test]
fn an_oom_count_does_not_override_what_the_agent_did_or_a_success() {
    assert!(matches!(
        with_usage(&Ending::Exited { code: 0 }, oom_usage()),
        Outcome::Completed(_)
    ));
    let Outcome::Failed(f) = with_usage(&Ending::TimedOut { signal: 9 }, oom_usage()) else {
        panic!()
    };
    assert_eq!(f.error, ErrorName::Timeout);
    assert_eq!(f.cause.reason, None);
    // A SIGKILL nobody counted as an OOM kill is Killed without a reason; where the
    // memory controller watched, the message says it was not the OOM killer.
    let watched = Usage {
        oom_kills: 0,
        ..oom_usage()
    };
    let Outcome::Failed(f) = with_usage(&Ending::Exited { code: 137 }, watched) else {
        panic!()
    };
    assert_eq!(
        (f.error, f.cause.reason.as_deref()),
        (ErrorName::Killed, None)
    );
    assert!(
        f.cause.message.contains("nor the OOM killer"),
        "{}",
        f.cause.message
    );
    let cause = f.cause_json();
    assert!(!cause.contains("\"reason\""), "{cause}");
}

#[test]
fn cpu_and_memory_reach_the_success_output_only_when_measured() {
    let Outcome::Completed(out) = with_usage(&Ending::Exited { code: 0 }, oom_usage()) else {
        panic!()
    };
    let v: serde_json::Value = serde_json::from_str(&out.output_json()).unwrap();
    assert_eq!(v["cpu_ms"], 2500);
    assert_eq!(v["max_rss_mb"], 512);
    let cpu_only = Usage {
        cpu_ms: Some(7),
        ..Usage::default()
    };
    let Outcome::Completed(out) = with_usage(&Ending::Exited { code: 0 }, cpu_only) else {
        panic!()
    };
    let v: serde_json::Value = serde_json::from_str(&out.output_json()).unwrap();
    assert_eq!(v["cpu_ms"], 7);
    assert!(v.get("max_rss_mb").is_none(), "{v}");
    // An outcome recorded before these fields existed still reads back.
    let old = r#"{"job_name":"j","workflow_execution_id":"e","status":"completed","exit_code":0,"duration_ms":1,"instance_id":"i","log_group":null,"log_stream":null,"log_file":null}"#;
    let back: Outcome = serde_json::from_str(old).unwrap();
    assert_eq!(back.cpu_ms(), None);
}

#[test]
fn success_output_has_contract_fields() {
    let Outcome::Completed(out) = finished(&Ending::Exited { code: 0 }, None) else {
        panic!()
    };
    let v: serde_json::Value = serde_json::from_str(&out.output_json()).unwrap();
    for key in [
        "job_name",
        "workflow_execution_id",
        "status",
        "exit_code",
        "duration_ms",
        "instance_id",
        "log_group",
        "log_stream",
    ] {
        assert!(v.get(key).is_some(), "missing {key}");
    }
    assert_eq!(v["status"], "completed");
}
