#!/bin/sh
# rsql-agent: rpm %preun. On erase ($1 = 0), stops and disables rsql-agent.service and
# rsql-job-owner.socket. Running jobs are not stopped: they finish under their owner units.
# An upgrade ($1 = 1) leaves the agent running.
if [ "$1" -eq 0 ]; then
  if [ -d /run/systemd/system ]; then
    systemctl stop rsql-agent.service rsql-job-owner.socket ||
      echo "rsql-agent: systemctl stop rsql-agent failed; erasing anyway" >&2
  fi
  if command -v systemctl >/dev/null 2>&1; then
    systemctl --no-reload disable rsql-agent.service rsql-job-owner.socket >/dev/null 2>&1 || :
  fi
fi
exit 0
