#!/bin/sh
# rsql_trigger.sh: the entry point the old invoke Lambda ran through SSM Run Command, kept
# for workflows not yet moved to the SSM document. Its 11 positional arguments (token,
# workflow id, workflow execution id, script path, instance id, secret id, log path, audit
# table, log group, instance code dir, region) and the script's own arguments go unchanged
# to rsql-wrapper, which hands the job to the running rsql-agent and returns at once. The
# script gets the instance code dir and the secret id as $1 and $2, as the old trigger gave
# them. With no agent reachable, rsql-wrapper runs the job here itself (config:
# $RSQL_AGENT_CONFIG, else /etc/rsql-agent/agent.toml), or, when it cannot, fails the task
# as Rsql.Interrupted: no execution waits for its timeout.
# Installed as /usr/libexec/rsql-agent/rsql_trigger.sh: point the Lambda's command there.
# RSQL_WRAPPER names another rsql-wrapper binary (tests run the build's).
exec "${RSQL_WRAPPER:-/usr/bin/rsql-wrapper}" "$@"
