#!/usr/bin/env bash
# Checks systemd/rsql-agent.service: `systemd-analyze verify` must print nothing, and the
# `systemd-analyze security --offline=true` exposure must stay at or under MAX_EXPOSURE.
#
# verify insists that every Exec*= binary exists. On a machine without the package
# installed (CI, a laptop), the check runs on a temporary copy of the unit whose
# /usr/bin/rsql-agent is replaced by a stub executable in a temporary directory; every other
# line is the shipped unit's. With the package installed, the shipped unit is checked as is.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
unit="${1:-$here/systemd/rsql-agent.service}"
# In tenths, as --threshold takes it: 20 is an exposure of 2.0.
max_exposure="${MAX_EXPOSURE:-20}"

if ! command -v systemd-analyze >/dev/null 2>&1; then
  echo "check-systemd: systemd-analyze is missing (run .ci/install-deps)" >&2
  exit 1
fi

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
checked="$work/rsql-agent.service"
if [ -x /usr/bin/rsql-agent ]; then
  cp "$unit" "$checked"
else
  mkdir -p "$work/bin"
  printf '#!/bin/sh\nexit 0\n' >"$work/bin/rsql-agent"
  chmod 0755 "$work/bin/rsql-agent"
  sed "s#/usr/bin/rsql-agent#$work/bin/rsql-agent#g" "$unit" >"$checked"
fi

echo "check-systemd: systemd-analyze verify $(basename "$unit")"
out="$(systemd-analyze verify --man=no "$checked" 2>&1)" || {
  printf '%s\n' "$out" >&2
  echo "check-systemd: verify failed" >&2
  exit 1
}
if [ -n "$out" ]; then
  printf '%s\n' "$out" >&2
  echo "check-systemd: verify is not clean" >&2
  exit 1
fi

echo "check-systemd: systemd-analyze security --offline=true (threshold $max_exposure tenths)"
sec="$(systemd-analyze security --offline=true --threshold="$max_exposure" "$checked" 2>&1)" || {
  printf '%s\n' "$sec" >&2
  echo "check-systemd: exposure above $max_exposure tenths" >&2
  exit 1
}
printf '%s\n' "$sec" | grep -F 'Overall exposure level'
echo "check-systemd: ok"
