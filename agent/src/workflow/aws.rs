//! Orchestration on AWS: the operator's side of the generic state machine
//! (`packaging/aws/workflow.asl.json`), behind `rsql-agent workflow put-config | start |
//! status`.
//!
//! Owns:
//! - the legacy workflow config *item*: a [`WorkflowConfig`] written to the config table as
//!   one item keyed by `workflow_id`, `workflow_stages` a list of maps ([`config_item`]);
//! - starting an execution of the state machine with the input it expects,
//!   `{workflow_id, workflow_execution_id}`, named after the execution id;
//! - the status report: the execution's status joined with the workflow audit item (written
//!   by the state machine) and the job audit items (written by the agents), per job.
//!
//! Table names the state machine was built with (config table, workflow audit table) are read
//! from its definition when the caller does not give them, so an operator needs only the
//! state machine's ARN.
//!
//! Must not touch: jobs, the agent's state, or the audit rules; it only reads the audit
//! tables, and writes the config table.

use std::collections::HashMap;
use std::fmt::Write as _;

use aws_sdk_dynamodb::error::ProvideErrorMetadata;
use aws_sdk_dynamodb::types::AttributeValue;
use serde_json::Value;

use crate::workflow::{Stage, WorkflowConfig, WorkflowError};

/// The state names in `workflow.asl.json` whose `TableName` names a table.
const CONFIG_STATE: &str = "GetConfig";
const WORKFLOW_AUDIT_STATE: &str = "AuditRunning";

#[derive(Debug, thiserror::Error)]
pub enum OrchestrateError {
    #[error(transparent)]
    Config(#[from] WorkflowError),
    #[error("DynamoDB table {table:?} does not exist (region and endpoint come from the standard AWS settings): {detail}")]
    NoTable { table: String, detail: String },
    #[error("workflow {workflow_id:?} is not in the config table {table:?}; load it with `rsql-agent workflow put-config FILE --table {table}`")]
    UnknownWorkflow { workflow_id: String, table: String },
    #[error("the config item of workflow {workflow_id:?} in table {table:?} is not a legacy workflow config: {reason}")]
    BadItem {
        workflow_id: String,
        table: String,
        reason: String,
    },
    #[error("state machine {arn:?} does not exist: {detail}")]
    NoStateMachine { arn: String, detail: String },
    #[error("execution {execution:?} does not exist: {detail}")]
    NoExecution { execution: String, detail: String },
    #[error("execution id {name:?} is already used by this state machine: {detail}")]
    ExecutionExists { name: String, detail: String },
    #[error("{what} was refused as invalid: {detail}")]
    Invalid { what: String, detail: String },
    #[error("{what}: {reason}")]
    Missing { what: String, reason: String },
    #[error("{what} failed: {detail}")]
    Aws { what: String, detail: String },
}

impl OrchestrateError {
    /// Whether the error says a named thing does not exist (table, workflow, state machine,
    /// execution), as opposed to bad input or a failed call.
    pub fn is_not_found(&self) -> bool {
        matches!(
            self,
            OrchestrateError::NoTable { .. }
                | OrchestrateError::UnknownWorkflow { .. }
                | OrchestrateError::NoStateMachine { .. }
                | OrchestrateError::NoExecution { .. }
        )
    }
}

/// The code and a one-line description of an SDK error.
fn describe<E, R>(err: &aws_sdk_dynamodb::error::SdkError<E, R>) -> (Option<String>, String)
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
    R: std::fmt::Debug,
{
    let code = err.code().map(str::to_string);
    let detail = match (err.code(), err.message()) {
        (Some(code), Some(message)) => format!("{code}: {message}"),
        (Some(code), None) => code.to_string(),
        _ => aws_sdk_dynamodb::error::DisplayErrorContext(err).to_string(),
    };
    (code, detail)
}

/// An execution's input as JSON (`Null` when it has none or it is not JSON).
pub(crate) fn execution_input(
    out: &aws_sdk_sfn::operation::describe_execution::DescribeExecutionOutput,
) -> Value {
    out.input()
        .and_then(|i| serde_json::from_str(i).ok())
        .unwrap_or(Value::Null)
}

fn dynamo_error<E, R>(
    err: &aws_sdk_dynamodb::error::SdkError<E, R>,
    table: &str,
    what: String,
) -> OrchestrateError
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
    R: std::fmt::Debug,
{
    let (code, detail) = describe(err);
    match code.as_deref() {
        Some("ResourceNotFoundException") => OrchestrateError::NoTable {
            table: table.to_string(),
            detail,
        },
        Some("ValidationException") => OrchestrateError::Invalid { what, detail },
        _ => OrchestrateError::Aws { what, detail },
    }
}

/// The AWS clients the commands use, from the standard chain (`AWS_ENDPOINT_URL` included),
/// with the SDK's standard retries: a command-line call has no outbox to retry for it.
#[derive(Debug, Clone)]
pub struct Orchestrator {
    sfn: aws_sdk_sfn::Client,
    dynamodb: aws_sdk_dynamodb::Client,
}

impl Orchestrator {
    pub async fn from_env() -> Orchestrator {
        let sdk = aws_config::defaults(aws_config::BehaviorVersion::latest())
            .timeout_config(
                aws_config::timeout::TimeoutConfig::builder()
                    .connect_timeout(crate::aws::CONNECT_TIMEOUT)
                    .operation_attempt_timeout(crate::aws::ATTEMPT_TIMEOUT)
                    .build(),
            )
            .load()
            .await;
        Orchestrator::new(&sdk)
    }

    pub fn new(sdk: &aws_config::SdkConfig) -> Orchestrator {
        Orchestrator {
            sfn: aws_sdk_sfn::Client::new(sdk),
            dynamodb: aws_sdk_dynamodb::Client::new(sdk),
        }
    }

    /// Writes `config` as the item of its `workflow_id` in `table`, replacing any earlier one.
    pub async fn put_config(
        &self,
        table: &str,
        config: &WorkflowConfig,
    ) -> Result<(), OrchestrateError> {
        let item = config_item(config)?;
        self.dynamodb
            .put_item()
            .table_name(table)
            .set_item(Some(item))
            .send()
            .await
            .map_err(|e| {
                dynamo_error(
                    &e,
                    table,
                    format!(
                        "PutItem of workflow {:?} into {table:?}",
                        config.workflow_id
                    ),
                )
            })?;
        Ok(())
    }

    /// Reads the config item of `workflow_id` back from `table`.
    pub async fn get_config(
        &self,
        table: &str,
        workflow_id: &str,
    ) -> Result<WorkflowConfig, OrchestrateError> {
        let out = self
            .dynamodb
            .get_item()
            .table_name(table)
            .key("workflow_id", AttributeValue::S(workflow_id.to_string()))
            .consistent_read(true)
            .send()
            .await
            .map_err(|e| {
                dynamo_error(
                    &e,
                    table,
                    format!("GetItem of workflow {workflow_id:?} from {table:?}"),
                )
            })?;
        let Some(item) = out.item else {
            return Err(OrchestrateError::UnknownWorkflow {
                workflow_id: workflow_id.to_string(),
                table: table.to_string(),
            });
        };
        serde_json::from_value(item_to_json(&item)).map_err(|e| OrchestrateError::BadItem {
            workflow_id: workflow_id.to_string(),
            table: table.to_string(),
            reason: e.to_string(),
        })
    }

    /// The state machine's definition, parsed.
    async fn definition(&self, state_machine_arn: &str) -> Result<Value, OrchestrateError> {
        let out = self
            .sfn
            .describe_state_machine()
            .state_machine_arn(state_machine_arn)
            .send()
            .await
            .map_err(|e| {
                let (code, detail) = describe(&e);
                match code.as_deref() {
                    Some("StateMachineDoesNotExist") => OrchestrateError::NoStateMachine {
                        arn: state_machine_arn.to_string(),
                        detail,
                    },
                    Some("InvalidArn") => OrchestrateError::Invalid {
                        what: format!("state machine ARN {state_machine_arn:?}"),
                        detail,
                    },
                    _ => OrchestrateError::Aws {
                        what: format!("DescribeStateMachine {state_machine_arn}"),
                        detail,
                    },
                }
            })?;
        // A definition that is not JSON (JSONata states are still JSON) cannot name tables.
        Ok(serde_json::from_str(out.definition()).unwrap_or(Value::Null))
    }

    /// The table a state of the definition names, or the caller's override.
    async fn table_of(
        &self,
        state_machine_arn: &str,
        state: &str,
        given: Option<&str>,
    ) -> Result<String, OrchestrateError> {
        if let Some(table) = given {
            return Ok(table.to_string());
        }
        let definition = self.definition(state_machine_arn).await?;
        table_in_definition(&definition, state).ok_or_else(|| OrchestrateError::Missing {
            what: format!("state machine {state_machine_arn}"),
            reason: format!(
                "its definition has no state {state:?} with a TableName; give the table on the command line"
            ),
        })
    }

    /// Starts an execution of the generic state machine for `workflow_id`, named
    /// `execution_id`, after checking that the config table knows the workflow (the table
    /// comes from `config_table` or from the state machine's definition). Returns the ARN.
    pub async fn start(
        &self,
        state_machine_arn: &str,
        workflow_id: &str,
        execution_id: &str,
        config_table: Option<&str>,
    ) -> Result<String, OrchestrateError> {
        let table = self
            .table_of(state_machine_arn, CONFIG_STATE, config_table)
            .await?;
        self.get_config(&table, workflow_id).await?;
        // Step Functions answers a StartExecution that repeats a *running* execution's name
        // and input with that execution, as if it had started it: say so instead, since the
        // execution id keys the audit and a second run under it would mix two runs.
        let arn = execution_arn(state_machine_arn, execution_id)?;
        match self
            .sfn
            .describe_execution()
            .execution_arn(&arn)
            .send()
            .await
        {
            Ok(existing) => {
                return Err(OrchestrateError::ExecutionExists {
                    name: execution_id.to_string(),
                    detail: format!("{arn} is {}", existing.status().as_str()),
                })
            }
            Err(e) if e.code() == Some("ExecutionDoesNotExist") => {}
            Err(e) => {
                return Err(OrchestrateError::Aws {
                    what: format!("DescribeExecution {arn}"),
                    detail: describe(&e).1,
                })
            }
        }
        let input = serde_json::json!({
            "workflow_id": workflow_id,
            "workflow_execution_id": execution_id,
        });
        let out = self
            .sfn
            .start_execution()
            .state_machine_arn(state_machine_arn)
            .name(execution_id)
            .input(input.to_string())
            .send()
            .await
            .map_err(|e| {
                let (code, detail) = describe(&e);
                match code.as_deref() {
                    Some("StateMachineDoesNotExist") => OrchestrateError::NoStateMachine {
                        arn: state_machine_arn.to_string(),
                        detail,
                    },
                    Some("ExecutionAlreadyExists") => OrchestrateError::ExecutionExists {
                        name: execution_id.to_string(),
                        detail,
                    },
                    Some("InvalidName")
                    | Some("InvalidArn")
                    | Some("InvalidExecutionInput")
                    | Some("ValidationException") => OrchestrateError::Invalid {
                        what: format!("StartExecution {execution_id:?}"),
                        detail,
                    },
                    _ => OrchestrateError::Aws {
                        what: format!("StartExecution {execution_id:?} of {state_machine_arn}"),
                        detail,
                    },
                }
            })?;
        Ok(out.execution_arn().to_string())
    }

    /// The status of one execution, per job: the execution from Step Functions, the workflow
    /// audit item (its stages and jobs) and each job's audit item.
    pub async fn status(
        &self,
        state_machine_arn: &str,
        execution_id: &str,
        job_table: &str,
        workflow_table: Option<&str>,
    ) -> Result<StatusReport, OrchestrateError> {
        let execution_arn = execution_arn(state_machine_arn, execution_id)?;
        let out = self.describe_execution(&execution_arn).await?;
        let input = execution_input(&out);
        let workflow_id = input["workflow_id"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let audit = if workflow_id.is_empty() {
            None
        } else {
            self.workflow_audit(
                state_machine_arn,
                execution_id,
                &workflow_id,
                workflow_table,
            )
            .await?
        };
        let stages: Vec<Stage> = audit
            .as_ref()
            .and_then(|a| serde_json::from_value(a["workflow_stages"].clone()).ok())
            .unwrap_or_default();
        let jobs = self.job_rows(job_table, execution_id, &stages).await?;

        let date = |d: Option<&aws_sdk_sfn::primitives::DateTime>| {
            d.and_then(|d| {
                d.fmt(aws_sdk_sfn::primitives::DateTimeFormat::DateTime)
                    .ok()
            })
        };
        Ok(StatusReport {
            execution_arn,
            execution_id: execution_id.to_string(),
            workflow_id,
            execution_status: out.status().as_str().to_string(),
            started: date(Some(out.start_date())),
            stopped: date(out.stop_date()),
            error: out.error().map(str::to_string),
            cause: out.cause().map(str::to_string),
            workflow_audit_status: audit
                .as_ref()
                .and_then(|a| a["execution_status"].as_str().map(str::to_string)),
            workflow_audit_cause: audit
                .as_ref()
                .and_then(|a| a["error_cause"].as_str().map(str::to_string)),
            jobs,
        })
    }

    /// Every job the stages name, in order; with no stages (a workflow audit that is
    /// missing, or older than the config), every job the audit has for this execution.
    async fn job_rows(
        &self,
        job_table: &str,
        execution_id: &str,
        stages: &[Stage],
    ) -> Result<Vec<JobRow>, OrchestrateError> {
        let mut jobs: Vec<JobRow> = Vec::new();
        for (i, stage) in stages.iter().enumerate() {
            for script in &stage.scripts {
                let item = self.job_item(job_table, script, execution_id).await?;
                jobs.push(JobRow::from_item(
                    Some(i + 1),
                    stage.enabled(),
                    script,
                    item,
                ));
            }
        }
        if stages.is_empty() {
            for item in self.scan_jobs(job_table, execution_id).await? {
                let name = item["job_name"].as_str().unwrap_or_default().to_string();
                jobs.push(JobRow::from_item(None, true, &name, Some(item)));
            }
            jobs.sort_by(|a, b| a.start_ts.cmp(&b.start_ts));
        }
        Ok(jobs)
    }

    pub(crate) fn sfn(&self) -> &aws_sdk_sfn::Client {
        &self.sfn
    }

    /// `DescribeExecution`, its errors said the way the commands say them.
    pub(crate) async fn describe_execution(
        &self,
        execution_arn: &str,
    ) -> Result<aws_sdk_sfn::operation::describe_execution::DescribeExecutionOutput, OrchestrateError>
    {
        self.sfn
            .describe_execution()
            .execution_arn(execution_arn)
            .send()
            .await
            .map_err(|e| {
                let (code, detail) = describe(&e);
                match code.as_deref() {
                    Some("ExecutionDoesNotExist") => OrchestrateError::NoExecution {
                        execution: execution_arn.to_string(),
                        detail,
                    },
                    Some("InvalidArn") => OrchestrateError::Invalid {
                        what: format!("execution ARN {execution_arn:?}"),
                        detail,
                    },
                    _ => OrchestrateError::Aws {
                        what: format!("DescribeExecution {execution_arn}"),
                        detail,
                    },
                }
            })
    }

    /// The workflow audit item of one execution, from `workflow_table` or the table the
    /// state machine writes.
    pub(crate) async fn workflow_audit(
        &self,
        state_machine_arn: &str,
        execution_id: &str,
        workflow_id: &str,
        workflow_table: Option<&str>,
    ) -> Result<Option<Value>, OrchestrateError> {
        let table = self
            .table_of(state_machine_arn, WORKFLOW_AUDIT_STATE, workflow_table)
            .await?;
        let out = self
            .dynamodb
            .get_item()
            .table_name(&table)
            .key(
                "workflow_execution_id",
                AttributeValue::S(execution_id.to_string()),
            )
            .key("workflow_id", AttributeValue::S(workflow_id.to_string()))
            .consistent_read(true)
            .send()
            .await
            .map_err(|e| {
                dynamo_error(
                    &e,
                    &table,
                    format!("GetItem of the workflow audit from {table:?}"),
                )
            })?;
        Ok(out.item.map(|item| item_to_json(&item)))
    }

    pub(crate) async fn job_item(
        &self,
        table: &str,
        job_name: &str,
        execution_id: &str,
    ) -> Result<Option<Value>, OrchestrateError> {
        let out = self
            .dynamodb
            .get_item()
            .table_name(table)
            .key("job_name", AttributeValue::S(job_name.to_string()))
            .key(
                "workflow_execution_id",
                AttributeValue::S(execution_id.to_string()),
            )
            .consistent_read(true)
            .send()
            .await
            .map_err(|e| {
                dynamo_error(
                    &e,
                    table,
                    format!("GetItem of job {job_name:?} from {table:?}"),
                )
            })?;
        Ok(out.item.map(|item| item_to_json(&item)))
    }

    /// Every job audit item of one execution, by a filtered scan (the table's hash key is the
    /// job name, so there is no cheaper way without the job names).
    async fn scan_jobs(
        &self,
        table: &str,
        execution_id: &str,
    ) -> Result<Vec<Value>, OrchestrateError> {
        let mut items = Vec::new();
        let mut start = None;
        loop {
            let out = self
                .dynamodb
                .scan()
                .table_name(table)
                .filter_expression("workflow_execution_id = :id")
                .expression_attribute_values(":id", AttributeValue::S(execution_id.to_string()))
                .set_exclusive_start_key(start)
                .send()
                .await
                .map_err(|e| dynamo_error(&e, table, format!("Scan of {table:?}")))?;
            items.extend(out.items().iter().map(item_to_json));
            start = out.last_evaluated_key;
            if start.is_none() {
                return Ok(items);
            }
        }
    }
}

/// `arn:aws:states:R:A:stateMachine:NAME` + `ID` -> `arn:aws:states:R:A:execution:NAME:ID`.
pub fn execution_arn(
    state_machine_arn: &str,
    execution_id: &str,
) -> Result<String, OrchestrateError> {
    let parts: Vec<&str> = state_machine_arn.split(':').collect();
    match parts.as_slice() {
        [arn, partition, "states", region, account, "stateMachine", name] if *arn == "arn" => Ok(
            format!("arn:{partition}:states:{region}:{account}:execution:{name}:{execution_id}"),
        ),
        _ => Err(OrchestrateError::Invalid {
            what: format!("state machine ARN {state_machine_arn:?}"),
            detail: "expected arn:<partition>:states:<region>:<account>:stateMachine:<name>"
                .to_string(),
        }),
    }
}

/// The `TableName` of the Task state `state`, at the top level of a definition.
fn table_in_definition(definition: &Value, state: &str) -> Option<String> {
    definition["States"][state]["Parameters"]["TableName"]
        .as_str()
        .filter(|t| !t.contains("${"))
        .map(str::to_string)
}

/// The config table item of a workflow config: the legacy layout, every field as DynamoDB
/// would hold the JSON (strings `S`, lists `L`, objects `M`).
pub fn config_item(
    config: &WorkflowConfig,
) -> Result<HashMap<String, AttributeValue>, OrchestrateError> {
    let value = serde_json::to_value(config).map_err(|e| OrchestrateError::Invalid {
        what: format!("workflow {:?}", config.workflow_id),
        detail: e.to_string(),
    })?;
    let Value::Object(fields) = value else {
        return Err(OrchestrateError::Invalid {
            what: format!("workflow {:?}", config.workflow_id),
            detail: "does not serialise to a JSON object".to_string(),
        });
    };
    Ok(fields
        .into_iter()
        .filter(|(_, v)| !v.is_null())
        .map(|(k, v)| (k, json_to_attr(&v)))
        .collect())
}

/// A JSON value as a DynamoDB attribute value.
pub fn json_to_attr(value: &Value) -> AttributeValue {
    match value {
        Value::Null => AttributeValue::Null(true),
        Value::Bool(b) => AttributeValue::Bool(*b),
        Value::Number(n) => AttributeValue::N(n.to_string()),
        Value::String(s) => AttributeValue::S(s.clone()),
        Value::Array(items) => AttributeValue::L(items.iter().map(json_to_attr).collect()),
        Value::Object(fields) => AttributeValue::M(
            fields
                .iter()
                .map(|(k, v)| (k.clone(), json_to_attr(v)))
                .collect(),
        ),
    }
}

/// A DynamoDB attribute value as JSON (numbers that fit become JSON numbers; sets become
/// lists; binary becomes null, since no audit or config attribute is binary).
pub fn attr_to_json(value: &AttributeValue) -> Value {
    match value {
        AttributeValue::S(s) => Value::String(s.clone()),
        AttributeValue::N(n) => n
            .parse::<i64>()
            .map(Value::from)
            .or_else(|_| n.parse::<f64>().map(Value::from))
            .unwrap_or_else(|_| Value::String(n.clone())),
        AttributeValue::Bool(b) => Value::Bool(*b),
        AttributeValue::L(items) => Value::Array(items.iter().map(attr_to_json).collect()),
        AttributeValue::M(fields) => item_to_json(fields),
        AttributeValue::Ss(items) => Value::from(items.clone()),
        AttributeValue::Ns(items) => Value::from(items.clone()),
        _ => Value::Null,
    }
}

/// An item as a JSON object.
pub fn item_to_json(item: &HashMap<String, AttributeValue>) -> Value {
    Value::Object(
        item.iter()
            .map(|(k, v)| (k.clone(), attr_to_json(v)))
            .collect(),
    )
}

/// One job in the status report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobRow {
    /// 1-based stage number; `None` when the stages are unknown.
    pub stage: Option<usize>,
    pub job_name: String,
    /// The audit's `execution_status`, `disabled` for a skipped stage, `-` when not started.
    pub status: String,
    pub instance_id: Option<String>,
    pub exit_code: Option<i64>,
    pub duration_ms: Option<u64>,
    pub log_stream: Option<String>,
    pub start_ts: Option<String>,
    pub end_ts: Option<String>,
    pub attempt: Option<u64>,
}

impl JobRow {
    fn from_item(stage: Option<usize>, enabled: bool, job_name: &str, item: Option<Value>) -> Self {
        let item = item.unwrap_or(Value::Null);
        let s = |k: &str| item[k].as_str().map(str::to_string);
        let status = s("execution_status").unwrap_or_else(|| {
            if enabled {
                "-".to_string()
            } else {
                "disabled".to_string()
            }
        });
        JobRow {
            stage,
            job_name: job_name.to_string(),
            status,
            instance_id: s("instance_id"),
            exit_code: item["exit_code"].as_i64(),
            duration_ms: item["duration_ms"].as_u64(),
            log_stream: s("log_stream"),
            start_ts: s("execution_start_ts"),
            end_ts: s("execution_end_ts"),
            attempt: item["attempt"].as_u64(),
        }
    }
}

/// What `rsql-agent workflow status` prints.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatusReport {
    pub execution_arn: String,
    pub execution_id: String,
    pub workflow_id: String,
    /// Step Functions' status: RUNNING, SUCCEEDED, FAILED, TIMED_OUT, ABORTED.
    pub execution_status: String,
    pub started: Option<String>,
    pub stopped: Option<String>,
    pub error: Option<String>,
    pub cause: Option<String>,
    pub workflow_audit_status: Option<String>,
    pub workflow_audit_cause: Option<String>,
    pub jobs: Vec<JobRow>,
}

impl StatusReport {
    /// The per-job table and the execution's status, as printed.
    pub fn render(&self) -> String {
        let headers = [
            "stage",
            "job",
            "status",
            "instance",
            "exit",
            "duration",
            "log stream",
        ];
        let dash = || "-".to_string();
        let rows: Vec<[String; 7]> = self
            .jobs
            .iter()
            .map(|j| {
                [
                    j.stage.map(|s| s.to_string()).unwrap_or_else(dash),
                    j.job_name.clone(),
                    j.status.clone(),
                    j.instance_id.clone().unwrap_or_else(dash),
                    j.exit_code.map(|c| c.to_string()).unwrap_or_else(dash),
                    j.duration_ms
                        .map(|ms| format!("{:.1}s", ms as f64 / 1000.0))
                        .unwrap_or_else(dash),
                    j.log_stream.clone().unwrap_or_else(dash),
                ]
            })
            .collect();
        let mut out = format!(
            "workflow {}, execution {}\n\n",
            if self.workflow_id.is_empty() {
                "?"
            } else {
                &self.workflow_id
            },
            self.execution_id
        );
        out.push_str(&crate::workflow::render_table(&headers, &rows));
        let done = self.jobs.iter().filter(|j| j.status == "completed").count();
        let _ = write!(
            out,
            "\nexecution: {} ({done}/{} jobs completed)",
            self.execution_status,
            self.jobs.len()
        );
        if let Some(status) = &self.workflow_audit_status {
            let _ = write!(out, ", workflow audit: {status}");
        }
        out.push('\n');
        if let Some(started) = &self.started {
            let _ = writeln!(out, "started:   {started}");
        }
        if let Some(stopped) = &self.stopped {
            let _ = writeln!(out, "stopped:   {stopped}");
        }
        if let Some(error) = &self.error {
            let _ = writeln!(out, "error:     {error}");
        }
        if let Some(cause) = self.cause.as_ref().or(self.workflow_audit_cause.as_ref()) {
            let _ = writeln!(out, "cause:     {cause}");
        }
        let _ = writeln!(out, "arn:       {}", self.execution_arn);
        out
    }
}

#[cfg(test)]
mod tests;
