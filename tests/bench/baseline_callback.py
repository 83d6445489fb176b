#!/usr/bin/env python3
"""The baseline for `make bench`: the per-job callback of the approach rsql-agent replaces.

The old `rsql_trigger.sh` ran each RSQL job under `nohup`, then started a fresh Python +
boto3 process to report the result. This program makes the same calls that callback made,
in the same order, with fresh clients in a fresh interpreter:

1. DynamoDB DescribeTable on the job audit table;
2. DynamoDB UpdateItem: the job's final status;
3. CloudWatch Logs CreateLogStream;
4. CloudWatch Logs PutLogEvents with the whole log file (the logs only leave the box now);
5. Step Functions SendTaskSuccess (SendTaskFailure when the job failed).

AWS settings come from the standard environment (AWS_ENDPOINT_URL points at the emulator).
On success it prints one JSON line: when SendTaskSuccess returned (`acked_ns`, wall clock,
ns since the epoch) and the process's own CPU time (`cpu_s`, interpreter start included).

Usage: baseline_callback.py TOKEN WORKFLOW_ID EXECUTION_ID JOB_NAME INSTANCE_ID LOG_FILE
                            AUDIT_TABLE LOG_GROUP EXIT_CODE
"""

import datetime
import json
import os
import sys
import time

import boto3


def main() -> None:
    (token, workflow_id, execution_id, job_name, instance_id, log_file, table, log_group,
     exit_code) = sys.argv[1:10]
    exit_code = int(exit_code)
    now = datetime.datetime.now(datetime.timezone.utc).isoformat()
    status = "completed" if exit_code == 0 else "failed"

    dynamodb = boto3.client("dynamodb")
    dynamodb.describe_table(TableName=table)
    dynamodb.update_item(
        TableName=table,
        Key={"job_name": {"S": job_name}, "workflow_execution_id": {"S": execution_id}},
        UpdateExpression="SET execution_status = :s, execution_end_ts = :e, "
        "instance_id = :i, workflow_id = :w",
        ExpressionAttributeValues={
            ":s": {"S": status},
            ":e": {"S": now},
            ":i": {"S": instance_id},
            ":w": {"S": workflow_id},
        },
    )

    logs = boto3.client("logs")
    stream = f"{workflow_id}/{execution_id}/{job_name}"
    logs.create_log_stream(logGroupName=log_group, logStreamName=stream)
    with open(log_file, "r", errors="replace") as f:
        lines = f.read().splitlines()
    ts = int(time.time() * 1000)
    events = [{"timestamp": ts, "message": line} for line in lines if line] or [
        {"timestamp": ts, "message": "(empty log)"}
    ]
    logs.put_log_events(logGroupName=log_group, logStreamName=stream, logEvents=events)

    sfn = boto3.client("stepfunctions")
    output = {"job_name": job_name, "workflow_execution_id": execution_id, "status": status,
              "exit_code": exit_code, "instance_id": instance_id}
    if exit_code == 0:
        sfn.send_task_success(taskToken=token, output=json.dumps(output))
    else:
        sfn.send_task_failure(taskToken=token, error="Rsql.ScriptFailed",
                              cause=json.dumps(output))
    acked_ns = time.time_ns()
    t = os.times()
    print(json.dumps({"acked_ns": acked_ns, "cpu_s": t.user + t.system}), flush=True)


if __name__ == "__main__":
    main()
