#!/bin/sh
# rsql-agent: rpm %pre. Creates the rsql and rsql-job users and groups before the files are laid down, so
# that the config (root:rsql 0640) and /var/lib/rsql-agent, /var/log/rsql-agent (rsql:rsql)
# get their owners. /usr/lib/sysusers.d/rsql-agent.conf is not on disk yet, so its line is
# given on stdin (packaging/check-package.sh checks that the two match). groupadd/useradd
# where systemd-sysusers is missing, too old for --replace, or fails. $1: 1 install, 2 upgrade.
set -e

# The `u` lines of packaging/sysusers.d/rsql-agent.conf, word for word.
sysusers='u rsql - "rsql-agent" /var/lib/rsql-agent /usr/sbin/nologin
u rsql-job - "rsql-agent jobs" /var/lib/rsql-job /usr/sbin/nologin'
if command -v systemd-sysusers >/dev/null 2>&1; then
  printf '%s\n' "$sysusers" |
    systemd-sysusers --replace=/usr/lib/sysusers.d/rsql-agent.conf - ||
    echo "rsql-agent: systemd-sysusers failed; using groupadd/useradd" >&2
fi
if ! getent group rsql >/dev/null; then
  groupadd --system rsql
fi
if ! getent passwd rsql >/dev/null; then
  useradd --system --gid rsql --home-dir /var/lib/rsql-agent --no-create-home \
    --shell /usr/sbin/nologin --comment rsql-agent rsql
fi
if ! getent group rsql-job >/dev/null; then
  groupadd --system rsql-job
fi
if ! getent passwd rsql-job >/dev/null; then
  useradd --system --gid rsql-job --home-dir /var/lib/rsql-job --no-create-home \
    --shell /usr/sbin/nologin --comment "rsql-agent jobs" rsql-job
fi
exit 0
