#!/bin/bash
# `make bench-baseline`: the release binaries of the previous main, for `make bench` to measure
# side by side with the current tree's.
#   baseline.sh REV DIR TARGET_DIR
# REV is checked out (detached) as a git worktree in DIR/src, reused when it is already there
# (moved to REV when it is at another commit); it is built with the shared TARGET_DIR, so only
# its own crates compile; rsql-agent, rsql-job-owner and rsql-wrapper are copied to DIR/bin,
# side by side as the agent expects its owner (next to itself), with DIR/bin/COMMIT saying
# which commit they are. Up to date when DIR/bin/COMMIT is REV's commit: nothing is built.
#
# The build is `--workspace`, like `make release`: a build of fewer packages resolves the
# dependencies' features differently (futures-util, memchr, ...) and would compile much of
# the AWS SDK a second time. It leaves the baseline's binaries in TARGET_DIR/release, where the
# current tree's are expected: `make bench` builds the current tree after this, never before.
set -euo pipefail
rev=${1:?usage: baseline.sh REV DIR TARGET_DIR}
dir=${2:?usage: baseline.sh REV DIR TARGET_DIR}
target=${3:?usage: baseline.sh REV DIR TARGET_DIR}
cargo=${CARGO:-cargo}
bins=(rsql-agent rsql-job-owner rsql-wrapper)

commit=$(git rev-parse --verify --quiet "$rev^{commit}") || {
  echo "baseline.sh: $rev is not a commit of this repository" >&2
  exit 1
}
src=$dir/src
all_copied() {
  local b
  for b in "${bins[@]}"; do [ -x "$dir/bin/$b" ] || return 1; done
}
if [ "$(cat "$dir/bin/COMMIT" 2>/dev/null || true)" = "$commit" ] && all_copied; then
  echo "bench baseline: $dir/bin is $rev ($commit), already built"
  exit 0
fi

# A worktree whose directory was removed is still registered until pruned.
git worktree prune
if [ -e "$src/.git" ]; then
  if [ "$(git -C "$src" rev-parse HEAD)" != "$commit" ]; then
    git -C "$src" checkout --quiet --force --detach "$commit"
  fi
else
  rm -rf "$src"
  mkdir -p "$dir"
  git worktree add --detach "$src" "$commit"
fi
# A worktree of the build only: whatever was edited there goes.
git -C "$src" reset --quiet --hard "$commit"
# Its own version, by build metadata (0.1.0 -> 0.1.0+bench-baseline), which changes nothing
# in the code but the version string the binaries print. Cargo names a workspace crate's
# artifacts by its package name, its version and its path relative to the workspace: without
# this, the baseline's crates and the current tree's would share file names in the shared
# target directory, each build overwriting the other's, and cargo, which judges freshness by
# the source files' times, could take one tree's artifacts for the other's.
sed -i '0,/^version = "\([^"+]*\)"/s//version = "\1+bench-baseline"/' "$src/Cargo.toml"
grep -q '^version = ".*+bench-baseline"' "$src/Cargo.toml" || {
  echo "baseline.sh: could not give $src/Cargo.toml its +bench-baseline version" >&2
  exit 1
}

echo "bench baseline: building $rev ($commit) in $src, target dir $target"
(cd "$src" && CARGO_TARGET_DIR=$target "$cargo" build --release --workspace --bins)

mkdir -p "$dir/bin"
rm -f "$dir/bin/COMMIT"
for b in "${bins[@]}"; do
  cp -f "$target/release/$b" "$dir/bin/$b.tmp"
  mv -f "$dir/bin/$b.tmp" "$dir/bin/$b"
done
echo "$commit" >"$dir/bin/COMMIT"
echo "bench baseline: $dir/bin holds ${bins[*]} of $rev ($commit)"
