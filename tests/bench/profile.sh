#!/bin/bash
# `make bench-profile`: where a job's overhead goes, for the previous main and the current
# tree, in one sitting. Runs `rsql-bench --only cpu` (JOBS trivial jobs per build, the builds
# taking turns in rounds) with each agent, and so its owners and their jobs, under
# `perf record -g`, then tests/bench/perf_breakdown.py on each build's samples.
#   profile.sh RSQL_BENCH BASELINE_BIN_DIR OUT_DIR [JOBS]
# OUT_DIR gets perf-{previous,new}.data, their `perf script` text, breakdown-*.txt, cpu.json.
set -euo pipefail
bench=${1:?usage: profile.sh RSQL_BENCH BASELINE_BIN_DIR OUT_DIR [JOBS]}
baseline=${2:?usage: profile.sh RSQL_BENCH BASELINE_BIN_DIR OUT_DIR [JOBS]}
out=${3:?usage: profile.sh RSQL_BENCH BASELINE_BIN_DIR OUT_DIR [JOBS]}
jobs=${4:-300}
if ! command -v perf >/dev/null; then
  echo "profile.sh: perf is not installed (Debian: apt-get install linux-perf); nothing was measured" >&2
  exit 1
fi
mkdir -p "$out"
RSQL_BENCH_WRAP="perf record -g -F 1999 -o $out/perf-{build}.data --" \
  "$bench" --only cpu --jobs "$jobs" --baseline-bin-dir "$baseline" --out "$out/cpu.json"
for build in previous new; do
  perf script -i "$out/perf-$build.data" -F comm,tid,ip,sym,dso >"$out/perf-$build.txt" 2>/dev/null
  python3 "$(dirname "$0")/perf_breakdown.py" "$out/perf-$build.txt" "$jobs" both \
    >"$out/breakdown-$build.txt"
  echo "== $build (ms of CPU per job, sampled)"
  cat "$out/breakdown-$build.txt"
done
