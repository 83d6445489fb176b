use super::*;

#[test]
fn config_item_is_the_legacy_layout() {
    let config: WorkflowConfig = serde_json::from_str(
        r#"{"workflow_id": "w", "workflow_stages": [
                {"execution_flag": "y", "execution_type": "parallel", "stage_description": "d",
                 "scripts": ["a.sh", "b.sh"]}]}"#,
    )
    .unwrap();
    let item = config_item(&config).unwrap();
    assert_eq!(item["workflow_id"], AttributeValue::S("w".into()));
    assert!(!item.contains_key("workflow_description"));
    let AttributeValue::L(stages) = &item["workflow_stages"] else {
        panic!("workflow_stages is not a list: {item:?}")
    };
    let AttributeValue::M(stage) = &stages[0] else {
        panic!("a stage is not a map")
    };
    assert_eq!(
        stage["execution_type"],
        AttributeValue::S("parallel".into())
    );
    assert_eq!(
        stage["scripts"],
        AttributeValue::L(vec![
            AttributeValue::S("a.sh".into()),
            AttributeValue::S("b.sh".into())
        ])
    );
    let back: WorkflowConfig = serde_json::from_value(item_to_json(&item)).unwrap();
    assert_eq!(back, config);
}

#[test]
fn execution_arn_from_state_machine_arn() {
    assert_eq!(
        execution_arn("arn:aws:states:us-east-1:123:stateMachine:wf", "e1").unwrap(),
        "arn:aws:states:us-east-1:123:execution:wf:e1"
    );
    assert!(execution_arn("arn:aws:sqs:us-east-1:123:q", "e1").is_err());
}

#[test]
fn tables_come_from_the_substituted_definition() {
    let raw: Value =
        serde_json::from_str(include_str!("../../../../packaging/aws/workflow.asl.json")).unwrap();
    // Unsubstituted: no table to take.
    assert_eq!(table_in_definition(&raw, CONFIG_STATE), None);
    let text = include_str!("../../../../packaging/aws/workflow.asl.json")
        .replace("${ConfigTable}", "cfg")
        .replace("${WorkflowAuditTable}", "wfa");
    let def: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(
        table_in_definition(&def, CONFIG_STATE).as_deref(),
        Some("cfg")
    );
    assert_eq!(
        table_in_definition(&def, WORKFLOW_AUDIT_STATE).as_deref(),
        Some("wfa")
    );
}
