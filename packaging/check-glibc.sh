#!/usr/bin/env bash
# Asserts the glibc ceiling of the packaged binaries: the highest GLIBC_ symbol version that
# each BINARY asks of the dynamic linker (`objdump -T`) is at most GLIBC_CEILING (default 2.17).
# A binary that needs a newer symbol does not start on the oldest glibc the packages promise.
#
#   check-glibc.sh BINARY...
#
# Prints one line per binary: its name, the highest version, and its NEEDED libraries.
set -euo pipefail

ceiling="${GLIBC_CEILING:-2.17}"
[ $# -gt 0 ] || {
  echo "usage: check-glibc.sh BINARY..." >&2
  exit 2
}
command -v objdump >/dev/null 2>&1 || {
  echo "check-glibc: objdump is missing (binutils; run .ci/install-deps)" >&2
  exit 1
}

status=0
for bin in "$@"; do
  symbols="$(objdump -T "$bin")" || {
    echo "check-glibc: FAIL: objdump -T $bin failed" >&2
    exit 1
  }
  highest="$(grep -o 'GLIBC_[0-9][0-9.]*' <<<"$symbols" | sed 's/^GLIBC_//' | sort -V | tail -n 1)"
  if [ -z "$highest" ]; then
    echo "check-glibc: FAIL: $bin has no GLIBC_ symbol versions (not a glibc binary?)" >&2
    exit 1
  fi
  needed="$(objdump -p "$bin" | awk '$1 == "NEEDED" {print $2}' | tr '\n' ' ')"
  if [ "$(printf '%s\n%s\n' "$highest" "$ceiling" | sort -V | tail -n 1)" != "$ceiling" ]; then
    echo "check-glibc: FAIL: $bin needs GLIBC_$highest, above the ceiling $ceiling:" >&2
    grep -E "GLIBC_$highest([^0-9.]|$)" <<<"$symbols" >&2 || true
    status=1
  else
    echo "check-glibc: $(basename "$bin"): highest GLIBC_$highest (ceiling $ceiling); NEEDED ${needed% }"
  fi
done
exit "$status"
