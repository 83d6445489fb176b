#!/bin/sh
# rsql-agent: rpm %postun. Reloads systemd's units; on erase, also removes /etc/rsql-agent,
# /usr/libexec/rsql-agent/legacy and /usr/libexec/rsql-agent when empty (the rpm does not own
# them: see agent/Cargo.toml).
# $1: 0 erase, 1 upgrade.
#
# rpm has no purge: on erase a changed config stays as /etc/rsql-agent/agent.toml.rpmsave,
# and the state (/var/lib/rsql-agent), the job logs (/var/log/rsql-agent), the scripts dir
# (/opt/rsql/rsql_scripts) and the rsql user and group all stay.
if [ "$1" -eq 0 ]; then
  for dir in /usr/libexec/rsql-agent/legacy /usr/libexec/rsql-agent /etc/rsql-agent; do
    if [ -d "$dir" ]; then
      rmdir --ignore-fail-on-non-empty "$dir" || :
    fi
  done
fi
if [ -d /run/systemd/system ]; then
  systemctl daemon-reload || :
fi
exit 0
