use super::*;

#[test]
fn legacy_sample_parses() {
    let text = r#"{"workflow_id": "blog_test_workflow", "workflow_description": "Test workflow",
 "workflow_stages": [
   {"execution_flag": "y", "execution_type": "sequential", "stage_description": "Schema & table creation",
    "scripts": ["rsql_blog_script_1.sh", "rsql_blog_script_2.sh"]},
   {"execution_flag": "n", "execution_type": "parallel", "stage_description": "Data insertion 1",
    "scripts": ["rsql_blog_script_3.sh", "rsql_blog_script_4.sh"]}]}"#;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("wf.json");
    std::fs::write(&path, text).unwrap();
    let wf = WorkflowConfig::load(&path).unwrap();
    assert_eq!(wf.workflow_stages.len(), 2);
    assert!(wf.workflow_stages[0].enabled());
    assert!(!wf.workflow_stages[1].enabled());
    assert_eq!(
        wf.workflow_stages[1].execution_type,
        ExecutionType::Parallel
    );
}

#[test]
fn bad_workflows_say_what_is_wrong() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("wf.json");
    for (text, needle) in [
        (
            r#"{"workflow_id":"w","workflow_stages":[]}"#,
            "workflow_stages is empty",
        ),
        (
            r#"{"workflow_id":"w","workflow_stages":[{"execution_flag":"maybe","execution_type":"parallel","scripts":["a"]}]}"#,
            "execution_flag",
        ),
        (
            r#"{"workflow_id":"w","workflow_stages":[{"execution_flag":"y","execution_type":"sideways","scripts":["a"]}]}"#,
            "sideways",
        ),
        (
            r#"{"workflow_id":"w","workflow_stages":[{"execution_flag":"y","execution_type":"parallel","scripts":["a","a"]}]}"#,
            "appears in stage 1 and stage 1",
        ),
        (
            r#"{"workflow_id":"w","workflow_stagez":[]}"#,
            "workflow_stagez",
        ),
    ] {
        std::fs::write(&path, text).unwrap();
        let err = WorkflowConfig::load(&path).unwrap_err().to_string();
        assert!(err.contains(needle), "{text}: {err}");
    }
}

/// A script that printed `ESC ]0;PWNED BEL ESC [31m` once retitled and recoloured the
/// operator's terminal through the summary and the progress lines.
#[test]
fn terminal_text_and_tables_carry_no_control_characters() {
    let hostile = "ERROR: \u{1b}]0;PWNED\u{7}\u{1b}[31mred\r\u{9b}2J";
    let shown = terminal_text(&format!("line one\n{hostile}"));
    assert!(
        !shown.chars().any(|c| c.is_control() && c != '\n'),
        "{shown:?}"
    );
    assert_eq!(shown.lines().count(), 2, "{shown:?}");
    assert!(shown.contains("\\u{1b}]0;PWNED"), "{shown:?}");
    let table = render_table(
        &["job", "error"],
        &[[hostile.to_string(), format!("two\nlines {hostile}")]],
    );
    assert!(
        !table.chars().any(|c| c.is_control() && c != '\n'),
        "{table:?}"
    );
    assert_eq!(table.lines().count(), 3, "{table:?}");
}

#[test]
fn execution_ids_are_readable_and_distinct() {
    let a = new_execution_id("wf");
    assert!(a.starts_with("wf-20"), "{a}");
    assert!(!a.contains(':'));
}
