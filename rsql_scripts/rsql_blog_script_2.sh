#!/bin/bash
# rsql_blog_script_2.sh: creates the table rsql_blog.blog_table
#
# Written for rsql-agent's samples, in the shape of converted BTEQ jobs: every statement is
# followed by a check of :ERROR, and a failure prints the "Error Code -" marker, the
# SQLSTATE and the message, then exits with this script's own code (12), so the agent
# can report sql_state and message to Step Functions.
#
# Connection settings come only from the environment the agent provides:
# RSQL_HOST, RSQL_PORT, RSQL_USER, RSQL_DB and RSPASSWORD.
set -u

rsql -h "$RSQL_HOST" -p "$RSQL_PORT" -U "$RSQL_USER" -d "$RSQL_DB" <<'RSQL'
\remark rsql_blog_script_2.sh: creates the table rsql_blog.blog_table
SET query_group TO 'rsql_blog';
CREATE TABLE IF NOT EXISTS rsql_blog.blog_table (
    id          INTEGER      NOT NULL,
    script_name VARCHAR(128) NOT NULL,
    inserted_at TIMESTAMP    NOT NULL DEFAULT CURRENT_TIMESTAMP
);
\if :ERROR <> 0
  \echo Error Code -
  \echo :ERRORCODE
  \echo :LAST_ERROR_MESSAGE
  \exit 12
\endif
\remark rsql_blog_script_2.sh: done
\exit 0
RSQL
