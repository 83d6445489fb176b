#!/bin/bash
# rsql_blog_script_4.sh: inserts one row into rsql_blog.blog_table
#
# Written for rsql-agent's samples, in the shape of converted BTEQ jobs: every statement is
# followed by a check of :ERROR, and a failure prints the "Error Code -" marker, the
# SQLSTATE and the message, then exits with this script's own code (14), so the agent
# can report sql_state and message to Step Functions.
#
# Connection settings come only from the environment the agent provides:
# RSQL_HOST, RSQL_PORT, RSQL_USER, RSQL_DB and RSPASSWORD.
set -u

rsql -h "$RSQL_HOST" -p "$RSQL_PORT" -U "$RSQL_USER" -d "$RSQL_DB" <<'RSQL'
\remark rsql_blog_script_4.sh: inserts one row into rsql_blog.blog_table
SET query_group TO 'rsql_blog';
INSERT INTO rsql_blog.blog_table (id, script_name) VALUES (4, 'rsql_blog_script_4.sh');
\if :ERROR <> 0
  \echo Error Code -
  \echo :ERRORCODE
  \echo :LAST_ERROR_MESSAGE
  \exit 14
\endif
\remark rsql_blog_script_4.sh: done
\exit 0
RSQL
