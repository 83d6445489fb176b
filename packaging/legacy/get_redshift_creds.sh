# shellcheck shell=sh
# get_redshift_creds.sh: rsql-agent's drop-in for the helper of the same name that scripts
# written for the replaced SSM framework source on their first line:
#
#     source $1/get_redshift_creds.sh $2
#
# Point the scripts' instance code dir ($1: [jobs.legacy] instance_code_dir, or the invoke
# Lambda's instance_code_dir) at /usr/libexec/rsql-agent/legacy and this file sets HOST,
# PORT, USER and DB, and exports RSPASSWORD, from the credentials rsql-agent already resolved
# for the job ([database], with its secret_id read from Secrets Manager once per TTL). It
# makes no AWS call and puts the password on no command line.
#
# $1 is the secret id the script asks for. When the agent resolved a secret (RSQL_SECRET_ID)
# and the script asks for another one, it refuses: connecting with another secret's
# credentials would be worse than failing.
#
# Sourced by bash; POSIX sh only, no exit (it would end the calling script): return.

_rsql_creds_secret="${1:-}"
if [ -n "${RSQL_SECRET_ID:-}" ] && [ -n "$_rsql_creds_secret" ] &&
  [ "$_rsql_creds_secret" != "$RSQL_SECRET_ID" ]; then
  echo "get_redshift_creds.sh: the script asks for secret $_rsql_creds_secret, but rsql-agent resolved [database] secret_id = $RSQL_SECRET_ID; set [database] secret_id (or the job's secret id) to the same secret" >&2
  unset _rsql_creds_secret
  return 1
fi
unset _rsql_creds_secret
if [ -z "${RSQL_HOST:-}" ]; then
  echo "get_redshift_creds.sh: rsql-agent gave this job no database settings: configure [database] (host, or secret_id) in the agent's config" >&2
  return 1
fi
HOST="$RSQL_HOST"
PORT="${RSQL_PORT:-5439}"
USER="${RSQL_USER:-}"
DB="${RSQL_DB:-}"
export HOST PORT USER DB
export RSPASSWORD="${RSPASSWORD:-}"
