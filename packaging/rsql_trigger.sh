#!/bin/sh
# rsql_trigger.sh: the entry point the old invoke Lambda ran through SSM Run Command, kept
# for workflows not yet moved to the SSM document. Its 11 positional arguments (token,
# workflow id, workflow execution id, script path, instance id, secret id, log path, audit
# table, log group, instance code dir, region) and the script's own arguments go unchanged
# to rsql-wrapper, which hands the job to the running rsql-agent and returns at once.
# Installed as /usr/libexec/rsql-agent/rsql_trigger.sh: point the Lambda's command there.
exec /usr/bin/rsql-wrapper "$@"
