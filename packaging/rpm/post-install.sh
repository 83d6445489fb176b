#!/bin/sh
# rsql-agent: rpm %post. Creates the directories the agent and check-config need (the rpm
# cannot hold them: see agent/Cargo.toml) and reloads systemd's units. $1: 1 install, 2 upgrade.
#
# It does not enable or start rsql-agent.service: packaging/bootstrap.sh writes the real config
# first, checks it, then runs `systemctl enable --now rsql-agent`. On an upgrade a running
# agent is restarted (try-restart): jobs run under their own owner units, so the restart
# costs none of them and the new agent adopts them.
set -e

# Creates a directory only when it is missing: an operator's owner and mode stay.
make_dir() {
  [ -d "$1" ] || install -d -m "$2" -o "$3" -g "$4" "$1"
}

# The unit's StateDirectory= and LogsDirectory= also create these at start; they exist now
# so that check-config and a manual `rsql-agent run` work before then.
make_dir /var/lib/rsql-agent 0750 rsql rsql
make_dir /var/log/rsql-agent 0750 rsql rsql
# The jobs' HOME (the AWS CLI and rsql read their settings from it): root's, readable by
# the jobs and not writable by them, or one job could plant settings (a credential_process,
# an ODBC driver, a python .pth) that every later job would run.
make_dir /var/lib/rsql-job 0750 root rsql-job
# [jobs] script_dir: check-config needs it to exist and not be world-writable.
make_dir /opt/rsql 0755 root root
make_dir /opt/rsql/rsql_scripts 0755 root root

if [ -d /run/systemd/system ]; then
  systemctl daemon-reload || :
  if [ "$1" -ge 2 ]; then
    # Running jobs keep running under their owners; the new agent adopts them. The restart
    # also starts rsql-job-owner.socket (the agent's unit wants it); the socket itself is
    # never restarted here.
    systemctl try-restart rsql-agent.service || :
  fi
fi
exit 0
