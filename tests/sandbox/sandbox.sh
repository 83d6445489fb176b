#!/bin/bash
# A real systemd as PID 1 for the system tests (tests/src/sandbox.rs drives it):
#   sandbox.sh boot          boots the distribution's systemd in new PID, mount, cgroup, UTS
#                            and IPC namespaces, on an overlay of / whose writes go to a tmpfs;
#                            prints pid=... boot=...s once `systemctl is-system-running --wait`
#                            has answered
#   sandbox.sh exec CMD...   runs CMD inside (all its namespaces and its root)
#   sandbox.sh stop          powers it off (SIGRTMIN+4 to its PID 1), SIGKILLs PID 1 after
#                            STOP_TIMEOUT seconds, and removes its cgroup
# Environment: SANDBOX_DIR (required: one sandbox per directory; SANDBOX_DIR/share is /share
# inside, read-write), SANDBOX_NET=host keeps the host's network namespace (the tests' AWS
# emulator listens on the host's loopback). Needs root; the host's own init is untouched.
# Not a security boundary: there is no user namespace, root inside is root.
set -euo pipefail
D=${SANDBOX_DIR:?SANDBOX_DIR must name this sandbox\'s directory}
here=$(cd "$(dirname "$0")" && pwd)

cgroup2_mount() { awk '$3 == "cgroup2" {print $2; exit}' /proc/self/mounts; }

# PID 1 of the new PID namespace: builds the root and execs systemd.
stage2() {
  local R=$D/root L=$D/layer
  mount --make-rprivate /
  mkdir -p "$R" "$L"
  mount -t tmpfs -o mode=755 sandbox-layer "$L"
  mkdir -p "$L/upper" "$L/work"
  mount -t overlay sandbox-root -o "lowerdir=/,upperdir=$L/upper,workdir=$L/work" "$R"
  # /proc/sys and /sys read-only and a private cgroup2 read-write, as a container gets them.
  mount -t proc -o nosuid,nodev,noexec proc "$R/proc"
  for p in sys sysrq-trigger; do
    [ -e "$R/proc/$p" ] || continue
    mount --bind "$R/proc/$p" "$R/proc/$p"
    mount -o remount,bind,ro "$R/proc/$p"
  done
  mount -t sysfs -o ro,nosuid,nodev,noexec sysfs "$R/sys"
  mount -t cgroup2 -o nosuid,nodev,noexec cgroup2 "$R/sys/fs/cgroup"
  mount -t tmpfs -o mode=755,nosuid sandbox-dev "$R/dev"
  for n in null zero full random urandom tty; do
    touch "$R/dev/$n"
    mount --bind "/dev/$n" "$R/dev/$n"
  done
  touch "$R/dev/console"
  mount --bind /dev/null "$R/dev/console"
  mkdir -p "$R/dev/pts" "$R/dev/shm" "$R/dev/mqueue"
  mount -t devpts -o newinstance,ptmxmode=0666,mode=620,gid=5 devpts "$R/dev/pts"
  ln -s pts/ptmx "$R/dev/ptmx"
  mount -t tmpfs -o mode=1777,nosuid,nodev sandbox-shm "$R/dev/shm"
  ln -s /proc/self/fd "$R/dev/fd"
  ln -s /proc/self/fd/0 "$R/dev/stdin"
  ln -s /proc/self/fd/1 "$R/dev/stdout"
  ln -s /proc/self/fd/2 "$R/dev/stderr"
  mount -t tmpfs -o mode=755,nosuid,nodev sandbox-run "$R/run"
  mount -t tmpfs -o mode=1777,nosuid,nodev sandbox-tmp "$R/tmp"
  mkdir -p "$D/share" "$R/share"
  mount --bind "$D/share" "$R/share"
  # Boot to a target of our own: no timers and none of the host's services.
  cat >"$R/etc/systemd/system/sandbox.target" <<'UNIT'
[Unit]
Description=rsql-agent test sandbox
Requires=sysinit.target sockets.target slices.target
After=sysinit.target sockets.target slices.target
AllowIsolate=yes
UNIT
  echo sandbox >"$R/etc/hostname"
  cd "$R"
  mkdir -p "$R/.oldroot"
  pivot_root . .oldroot
  umount -l /.oldroot
  rmdir /.oldroot || true
  hostname sandbox
  exec env -i container=other TERM=dumb PATH=/usr/sbin:/usr/bin:/sbin:/bin \
    setpriv --bounding-set -sys_module,-sys_time,-sys_rawio,-sys_pacct,-syslog,-mac_admin,-mac_override,-wake_alarm,-block_suspend,-audit_control,-audit_read \
    /lib/systemd/systemd systemd.unit=sandbox.target \
    systemd.mask=systemd-firstboot.service systemd.mask=systemd-repart.service \
    systemd.mask=systemd-pcrphase-sysinit.service systemd.mask=systemd-pcrphase.service
}

pid1() {
  local p
  p=$(cat "$D/pid" 2>/dev/null) || return 1
  [ "$(cat "/proc/$p/comm" 2>/dev/null)" = systemd ] || return 1
  echo "$p"
}

in_sandbox() {
  local p
  p=$(pid1) || { echo "no sandbox runs in $D" >&2; exit 1; }
  exec nsenter -t "$p" -a env -i container=other TERM=dumb PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root "$@"
}

boot() {
  if pid1 >/dev/null; then echo "already running in $D" >&2; exit 1; fi
  local cg2 cg t0 t1 u p state
  cg2=$(cgroup2_mount)
  [ -n "$cg2" ] || { echo "this host has no cgroup2 mount" >&2; exit 1; }
  cg=$cg2/$(basename "$D")
  mkdir -p "$D/share" "$cg"
  echo "$cg" >"$D/cgroup"
  netns=--net
  [ "${SANDBOX_NET:-}" = host ] && netns=
  t0=$(date +%s.%N)
  # Into the sandbox's cgroup first, so that it becomes the root of the new cgroup namespace.
  # shellcheck disable=SC2086
  setsid bash -c "echo \$\$ >$cg/cgroup.procs; exec unshare --pid --fork --kill-child --mount --cgroup --uts --ipc $netns $here/sandbox.sh stage2" \
    </dev/null >"$D/console.log" 2>&1 &
  local outer=$!
  p=
  for _ in $(seq 100); do
    u=$(pgrep -P "$outer" -x unshare 2>/dev/null || true)
    [ -n "$u" ] || u=$outer
    p=$(pgrep -P "$u" 2>/dev/null | head -n 1 || true)
    [ -n "$p" ] && [ "$(cat "/proc/$p/comm" 2>/dev/null)" = systemd ] && break
    sleep 0.1
  done
  if [ -z "$p" ] || [ "$(cat "/proc/$p/comm" 2>/dev/null)" != systemd ]; then
    echo "systemd did not start:" >&2
    cat "$D/console.log" >&2
    exit 1
  fi
  echo "$p" >"$D/pid"
  echo "$u" >"$D/unshare.pid"
  # unshare stays outside the PID namespace: out of the sandbox's root cgroup with it, or PID
  # 1 sees a process with pid 0 there.
  echo "$u" >"$cg2/cgroup.procs"
  for _ in $(seq 100); do
    [ -S "/proc/$p/root/run/systemd/private" ] && break
    sleep 0.05
  done
  state=$(timeout 60 nsenter -t "$p" -a env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin systemctl is-system-running --wait 2>&1 || true)
  t1=$(date +%s.%N)
  echo "pid=$p state=$state boot=$(awk "BEGIN{printf \"%.2f\", $t1-$t0}")s"
}

stop() {
  local p u cg
  if p=$(pid1); then
    kill -s SIGRTMIN+4 "$p"
    for _ in $(seq $((${STOP_TIMEOUT:-60} * 10))); do
      kill -0 "$p" 2>/dev/null || break
      sleep 0.1
    done
    if kill -0 "$p" 2>/dev/null; then
      echo "poweroff timed out; SIGKILL $p"
      kill -KILL "$p"
    fi
  fi
  u=$(cat "$D/unshare.pid" 2>/dev/null || true)
  if [ -n "$u" ]; then
    for _ in $(seq 50); do
      [ "$(cat "/proc/$u/comm" 2>/dev/null)" = unshare ] || break
      sleep 0.1
    done
  fi
  rm -f "$D/pid" "$D/unshare.pid"
  cg=$(cat "$D/cgroup" 2>/dev/null || true)
  if [ -n "$cg" ] && [ -d "$cg" ]; then
    find "$cg" -mindepth 1 -depth -type d -exec rmdir {} \; 2>/dev/null || true
    rmdir "$cg" 2>/dev/null || echo "still busy: $cg"
  fi
  echo stopped
}

case "${1:-}" in
  boot) boot ;;
  stage2) stage2 ;;
  exec) shift; in_sandbox "$@" ;;
  stop) stop ;;
  *) echo "usage: sandbox.sh boot | exec CMD... | stop" >&2; exit 2 ;;
esac
