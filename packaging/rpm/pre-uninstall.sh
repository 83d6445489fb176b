#!/bin/sh
# rsql-agent: rpm %preun. On erase ($1 = 0), stops and disables rsql-agent.service; the stop
# lets running jobs finish first (up to [agent] shutdown_grace, 5m by default). An upgrade
# ($1 = 1) leaves the agent running.
if [ "$1" -eq 0 ]; then
  if [ -d /run/systemd/system ]; then
    systemctl stop rsql-agent.service ||
      echo "rsql-agent: systemctl stop rsql-agent failed; erasing anyway" >&2
  fi
  if command -v systemctl >/dev/null 2>&1; then
    systemctl --no-reload disable rsql-agent.service >/dev/null 2>&1 || :
  fi
fi
exit 0
