#!/usr/bin/env bash
# Checks the packages `make package` built (`make check-package`, part of `make test`):
#
# 0. shellcheck on the shim, the deb maintainer scripts, the rpm scriptlets, this script and
#    check-glibc.sh;
# 1. the .rpm: its file list (the packaged binaries and nothing else in /usr/bin, the unit,
#    the config, the shim, the owner socket and template units, the sysusers.d file), owners
#    and modes, the config marked
#    %config(noreplace), the four scriptlets (%pre's user line, %post's directories), and its
#    glibc requirement (no GLIBC_ version above the ceiling);
# 2. the .deb: its contents, control fields (Depends: libc6 at the version the rpm requires,
#    the newest GLIBC_ symbol the binaries use), conffiles and maintainer scripts;
# 3. the .deb installed on this machine: the binaries (their version, the same bits as the
#    .rpm's, debug info stripped, symbols kept, and the glibc ceiling: the highest GLIBC_
#    symbol version in `objdump -T` of each is at most GLIBC_CEILING, 2.17 by default),
#    check-config on the installed config (as root and as the rsql user, and with every
#    commented-out example uncommented), the user,
#    the directories, the shim, `systemd-analyze verify` of the installed unit, an idempotent
#    second postinst, a reinstall that keeps a changed config, `dpkg -r` (config kept) and
#    `dpkg -P` (all gone but the user).
#    When this run had to create the rsql user, it installs once more with systemd-sysusers
#    hidden, to check the groupadd/useradd fallback, and deletes the user again at the end;
# 4. the .rpm's four scriptlets, run with /bin/sh as rpm would around an install and an erase
#    (there is no rpm database here to install into).
#
# The packaged binaries are PACKAGED_BINS, "NAME:DIRECTORY ..." (set, with GLIBC_CEILING, by
# the Makefile: run it as `make check-package`). Needs root (or passwordless sudo) for step 3
# and fails without it: never skipped. Refuses to run when a package named rsql-agent is
# already known to dpkg, or when the files it would install are already there, so it never
# touches a real install. A failure purges what it installed.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
ceiling="${GLIBC_CEILING:-2.17}"
target="${CARGO_TARGET_DIR:-$here/target}"
case "$target" in /*) ;; *) target="$here/$target" ;; esac

CONFIG=/etc/rsql-agent/agent.toml
UNIT=/usr/lib/systemd/system/rsql-agent.service
SHIM=/usr/libexec/rsql-agent/rsql_trigger.sh
CREDS=/usr/libexec/rsql-agent/legacy/get_redshift_creds.sh
SLICE=/usr/lib/systemd/system/rsql-jobs.slice
OWNER_SOCKET_UNIT=/usr/lib/systemd/system/rsql-job-owner.socket
OWNER_UNIT=/usr/lib/systemd/system/rsql-job-owner@.service
SYSUSERS=/usr/lib/sysusers.d/rsql-agent.conf

say() { echo "check-package: $*"; }
fail() {
  echo "check-package: FAIL: $*" >&2
  exit 1
}

if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    exec sudo -n env CARGO_TARGET_DIR="$target" PACKAGED_BINS="${PACKAGED_BINS:-}" \
      GLIBC_CEILING="$ceiling" bash "$0" "$@"
  fi
  fail "must run as root (or with passwordless sudo): it installs and removes the .deb"
fi
for tool in rpm dpkg-deb dpkg runuser getent readelf objdump sha256sum shellcheck; do
  command -v "$tool" >/dev/null 2>&1 || fail "$tool is missing (run .ci/install-deps)"
done

# The packaged binaries: "NAME:DIRECTORY" each, and the installed path of each.
[ -n "${PACKAGED_BINS:-}" ] || fail "PACKAGED_BINS is not set: run make check-package"
read -r -a bins <<<"$PACKAGED_BINS"
names=() paths=()
for entry in "${bins[@]}"; do
  case "$entry" in
    ?*:/?*) ;;
    *) fail "PACKAGED_BINS: '$entry' is not NAME:/DIRECTORY" ;;
  esac
  names+=("${entry%%:*}")
  paths+=("${entry#*:}/${entry%%:*}")
done
in_usr_bin="$(printf '%s\n' "${paths[@]}" | grep -c '^/usr/bin/[^/]*$')" || true

stripped="$target/release/stripped"
for name in "${names[@]}"; do
  [ -x "$stripped/$name" ] || fail "no $stripped/$name: run make package"
done
version="$("$stripped/rsql-agent" --version | awk '{print $2}')"
[ -n "$version" ] || fail "cannot read the version of $stripped/rsql-agent"
deb="$target/debian/rsql-agent_${version}-1_$(dpkg --print-architecture).deb"
rpm="$target/generate-rpm/rsql-agent-${version}-1.$(uname -m).rpm"
[ -f "$deb" ] || fail "no $deb: run make package"
[ -f "$rpm" ] || fail "no $rpm: run make package"

# Asserts that the lines of $2 hold the whole line $3 ($1 names the listing).
has_line() {
  grep -qxF -- "$3" <<<"$2" || {
    printf '%s\n' "$2" >&2
    fail "$1: no line '$3'"
  }
}

# 0. The package's shell scripts, and this one.
say "shellcheck: the shim, the deb maintainer scripts, the rpm scriptlets, check-package.sh, check-glibc.sh"
shellcheck "$here/packaging/rsql_trigger.sh" "$here/packaging/legacy/get_redshift_creds.sh" \
  "$here"/packaging/deb/* "$here"/packaging/rpm/*.sh \
  "$here/packaging/check-package.sh" "$here/packaging/check-glibc.sh" || fail "shellcheck found problems"

# The sysusers.d line, which the rpm's %pre repeats.
sysusers_line="$(grep -v '^#' "$here/packaging/sysusers.d/rsql-agent.conf")"

# 1. The .rpm.
say "rpm: $(basename "$rpm")"
rpm_files="$(rpm -qp --qf '[%{FILEMODES:perms} %{FILEUSERNAME}:%{FILEGROUPNAME} %{FILEFLAGS:fflags} %{FILENAMES}\n]' "$rpm")"
for path in "${paths[@]}"; do
  has_line "rpm -qp --qf (mode owner flags path)" "$rpm_files" "-rwxr-xr-x root:root  $path"
done
for line in \
  "-rw-r--r-- root:root  $UNIT" \
  "-rw-r----- root:rsql cn $CONFIG" \
  "-rwxr-xr-x root:root  $SHIM" \
  "-rw-r--r-- root:root  $CREDS" \
  "-rw-r--r-- root:root  $SLICE" \
  "-rw-r--r-- root:root  $OWNER_SOCKET_UNIT" \
  "-rw-r--r-- root:root  $OWNER_UNIT" \
  "-rw-r--r-- root:root  $SYSUSERS" \
  "-rw-r--r-- root:root d /usr/share/doc/rsql-agent/README.md" \
  "-rw-r--r-- root:root d /usr/share/doc/rsql-agent/docs/contract.md" \
  "-rw-r--r-- root:root d /usr/share/doc/rsql-agent/docs/operations.md"; do
  has_line "rpm -qp --qf (mode owner flags path)" "$rpm_files" "$line"
done
[ "$(rpm -qpl "$rpm" | grep -c '^/usr/bin/')" -eq "$in_usr_bin" ] ||
  fail "rpm: /usr/bin holds more than the packaged binaries: $(rpm -qpl "$rpm" | grep '^/usr/bin/' | tr '\n' ' ')"
has_line "rpm -qp --configfiles" "$(rpm -qp --configfiles "$rpm")" "$CONFIG"
# The binaries are the copies `make package` stripped of debug info (the .deb's are checked
# the same way once installed), so both packages hold the same bits.
[ "$(rpm -qp --qf '%{FILEDIGESTALGO}' "$rpm")" = 8 ] || fail "rpm: file digests are not sha256"
rpm_digests="$(rpm -qp --qf '[%{FILENAMES} %{FILEDIGESTS}\n]' "$rpm")"
for i in "${!names[@]}"; do
  has_line "rpm -qp --qf (path sha256)" "$rpm_digests" \
    "${paths[$i]} $(sha256sum <"$stripped/${names[$i]}" | cut -d' ' -f1)"
done
# Its glibc requirement, which rpm's dependency generator read off the binaries' symbols:
# libc.so.6(GLIBC_x.y)(64bit) for each version used. The highest is the real minimum.
rpm_glibc="$(rpm -qpR "$rpm" | grep -o 'GLIBC_[0-9][0-9.]*' | sed 's/^GLIBC_//' | sort -V | tail -n 1)"
[ -n "$rpm_glibc" ] || fail "rpm: no libc.so.6(GLIBC_...) in its Requires: $(rpm -qpR "$rpm" | tr '\n' ' ')"
[ "$(printf '%s\n%s\n' "$rpm_glibc" "$ceiling" | sort -V | tail -n 1)" = "$ceiling" ] ||
  fail "rpm: Requires GLIBC_$rpm_glibc, above the ceiling $ceiling"
rpm_scripts="$(rpm -qp --scripts "$rpm")"
# The directories come from %post (cargo-generate-rpm cannot put one in the rpm).
for marker in "rsql-agent: rpm %pre." "rsql-agent: rpm %post." "rsql-agent: rpm %preun." \
  "rsql-agent: rpm %postun." "sysusers='$sysusers_line'" \
  "make_dir /var/lib/rsql-agent 0750 rsql rsql" "make_dir /var/log/rsql-agent 0750 rsql rsql" \
  "make_dir /opt/rsql/rsql_scripts 0755 root root"; do
  grep -qF -- "$marker" <<<"$rpm_scripts" || fail "rpm: no '$marker' in its scriptlets"
done
for scriptlet in preinstall postinstall preuninstall postuninstall; do
  grep -q "^$scriptlet scriptlet (using /bin/sh):" <<<"$rpm_scripts" ||
    fail "rpm: no $scriptlet scriptlet"
done
[ "$(rpm -qp --qf '%{NAME} %{VERSION}-%{RELEASE}' "$rpm")" = "rsql-agent $version-1" ] ||
  fail "rpm: name or version is not rsql-agent $version-1"

# 2. The .deb.
say "deb: $(basename "$deb")"
deb_files="$(dpkg-deb -c "$deb" | awk '{print $1, $2, $6}')"
for path in "${paths[@]}"; do
  has_line "dpkg-deb -c (mode uid/gid path)" "$deb_files" "-rwxr-xr-x 0/0 .$path"
done
for line in \
  "-rw-r--r-- 0/0 .$UNIT" \
  "-rw-r----- 0/0 .$CONFIG" \
  "-rwxr-xr-x 0/0 .$SHIM" \
  "-rw-r--r-- 0/0 .$CREDS" \
  "-rw-r--r-- 0/0 .$SLICE" \
  "-rw-r--r-- 0/0 .$OWNER_SOCKET_UNIT" \
  "-rw-r--r-- 0/0 .$OWNER_UNIT" \
  "-rw-r--r-- 0/0 .$SYSUSERS" \
  "-rw-r--r-- 0/0 ./usr/share/doc/rsql-agent/docs/contract.md" \
  "-rw-r--r-- 0/0 ./usr/share/doc/rsql-agent/docs/operations.md"; do
  has_line "dpkg-deb -c (mode uid/gid path)" "$deb_files" "$line"
done
[ "$(grep -c ' ./usr/bin/.' <<<"$deb_files")" -eq "$in_usr_bin" ] ||
  fail "deb: /usr/bin holds more than the packaged binaries"
# Depends: libc6 (>= the newest glibc symbol version the binaries use), as agent/Cargo.toml
# writes it (dpkg-shlibdeps would read the build host's glibc instead).
deb_depends="$(dpkg-deb -f "$deb" Depends)"
deb_libc6="$(sed -n 's/^\(.*, \)\{0,1\}libc6 (>= \([0-9][0-9.]*\)).*/\2/p' <<<"$deb_depends")"
[ -n "$deb_libc6" ] || fail "deb: Depends has no libc6 (>= ...): $deb_depends"
# The rpm's generator read its minimum off the binaries: the .deb must state the same one.
[ "$deb_libc6" = "$rpm_glibc" ] ||
  fail "deb: Depends on libc6 (>= $deb_libc6), but the binaries need GLIBC_$rpm_glibc (the rpm's Requires)"
[ "$(dpkg-deb -f "$deb" Package Version)" = "$(printf 'Package: rsql-agent\nVersion: %s-1' "$version")" ] ||
  fail "deb: Package or Version is not rsql-agent $version-1"
has_line "dpkg-deb -I conffiles" "$(dpkg-deb -I "$deb" conffiles)" "$CONFIG"
for script in postinst prerm postrm; do
  grep -qF "rsql-agent: Debian $script." <(dpkg-deb -I "$deb" "$script") ||
    fail "deb: no $script, or not ours"
done

# 3. and 4.: install, check, remove and purge the .deb on this machine; run the rpm scriptlets.
if dpkg-query -W rsql-agent >/dev/null 2>&1; then
  fail "a package rsql-agent is already known to dpkg ($(dpkg-query -W -f='${Status}' rsql-agent)): not touching it; purge it or run this elsewhere"
fi
# A manual install, or the leftovers of one: the purge below would delete its state.
for path in "${paths[@]}" "$UNIT" /etc/rsql-agent /usr/libexec/rsql-agent \
  /var/lib/rsql-agent /var/log/rsql-agent /var/lib/rsql-job /opt/rsql/rsql_scripts; do
  [ ! -e "$path" ] || fail "$path already exists outside any package: not touching it"
done
user_existed=0
getent passwd rsql >/dev/null && user_existed=1
job_user_existed=0
getent passwd rsql-job >/dev/null && job_user_existed=1
installed=0
scriptlets=0
work="$(mktemp -d)"
# What the rpm scriptlets create; none of it existed before (checked above).
remove_scriptlet_dirs() {
  rm -rf /var/lib/rsql-agent /var/log/rsql-agent /var/lib/rsql-job
  for dir in /opt/rsql/rsql_scripts /opt/rsql /etc/rsql-agent /usr/libexec/rsql-agent; do
    if [ -d "$dir" ]; then
      rmdir "$dir"
    fi
  done
}
cleanup() {
  local rc=$?
  if [ "$scriptlets" -eq 1 ]; then
    remove_scriptlet_dirs || echo "check-package: could not remove the rpm scriptlets' directories" >&2
  fi
  if [ "$installed" -eq 1 ] && dpkg-query -W rsql-agent >/dev/null 2>&1; then
    echo "check-package: purging rsql-agent after the failure" >&2
    dpkg -P rsql-agent >/dev/null 2>&1 || echo "check-package: dpkg -P rsql-agent failed" >&2
  fi
  if [ "$user_existed" -eq 0 ] && getent passwd rsql >/dev/null; then
    userdel rsql || echo "check-package: userdel rsql failed" >&2
  fi
  if [ "$user_existed" -eq 0 ] && getent group rsql >/dev/null; then
    groupdel rsql || echo "check-package: groupdel rsql failed" >&2
  fi
  if [ "$job_user_existed" -eq 0 ] && getent passwd rsql-job >/dev/null; then
    userdel rsql-job || echo "check-package: userdel rsql-job failed" >&2
  fi
  if [ "$job_user_existed" -eq 0 ] && getent group rsql-job >/dev/null; then
    groupdel rsql-job || echo "check-package: groupdel rsql-job failed" >&2
  fi
  rm -rf "$work"
  exit "$rc"
}
trap cleanup EXIT

status() { dpkg-query -W -f='${Status}' rsql-agent 2>/dev/null || echo not-installed; }
# "MODE OWNER:GROUP" of a path, as stat prints them.
perms() { stat -c '%a %U:%G' "$1"; }
expect_perms() {
  [ "$(perms "$1")" = "$2" ] || fail "$1 is $(perms "$1"), expected $2"
}
check_user() {
  local entry
  entry="$(getent passwd rsql)" || fail "no rsql user after install ($1)"
  getent group rsql >/dev/null || fail "no rsql group after install ($1)"
  [ "$(cut -d: -f6,7 <<<"$entry")" = "/var/lib/rsql-agent:/usr/sbin/nologin" ] ||
    fail "rsql user ($1): home and shell are not /var/lib/rsql-agent and /usr/sbin/nologin: $entry"
  [ "$(id -gn rsql)" = rsql ] || fail "rsql user ($1): primary group is $(id -gn rsql)"
  [ "$(cut -d: -f3 <<<"$entry")" -lt 1000 ] || fail "rsql user ($1) is not a system user: $entry"
  # The jobs' user: a system user of its own, never in the agent's group.
  entry="$(getent passwd rsql-job)" || fail "no rsql-job user after install ($1)"
  [ "$(cut -d: -f6,7 <<<"$entry")" = "/var/lib/rsql-job:/usr/sbin/nologin" ] ||
    fail "rsql-job user ($1): home and shell are not /var/lib/rsql-job and /usr/sbin/nologin: $entry"
  [ "$(cut -d: -f3 <<<"$entry")" -lt 1000 ] || fail "rsql-job user ($1) is not a system user: $entry"
  ! id -Gn rsql-job | tr ' ' '\n' | grep -qx rsql || fail "rsql-job user ($1) is in the rsql group"
}
check_config_as_rsql() {
  runuser -u rsql -- /usr/bin/rsql-agent check-config "$CONFIG" >/dev/null ||
    fail "rsql-agent check-config $CONFIG fails as the rsql user"
}

say "dpkg -i $(basename "$deb")"
installed=1
dpkg -i "$deb"
[ "$(status)" = "install ok installed" ] || fail "after dpkg -i, status is '$(status)'"
check_user "dpkg -i"
for i in "${!names[@]}"; do
  bin="${paths[$i]}"
  # Every packaged binary answers --version with its name and the package's version.
  [ "$("$bin" --version)" = "${names[$i]} $version" ] ||
    fail "$bin --version says '$("$bin" --version)'"
  cmp -s "$bin" "$stripped/${names[$i]}" || fail "$bin is not $stripped/${names[$i]}"
  sections="$(readelf -S -W "$bin")"
  ! grep -qE ' \.debug_(info|line|str) ' <<<"$sections" || fail "$bin still has debug info"
  grep -q ' \.symtab ' <<<"$sections" || fail "$bin lost its symbol table"
done
# The glibc ceiling, on the installed binaries.
glibc_report="$(GLIBC_CEILING="$ceiling" bash "$here/packaging/check-glibc.sh" "${paths[@]}")" ||
  fail "a packaged binary needs a glibc newer than $ceiling"
printf '%s\n' "$glibc_report"
expect_perms /etc/rsql-agent "755 root:root"
expect_perms "$CONFIG" "640 root:rsql"
expect_perms /opt/rsql/rsql_scripts "755 root:root"
expect_perms /var/lib/rsql-agent "750 rsql:rsql"
expect_perms /var/log/rsql-agent "750 rsql:rsql"
expect_perms /var/lib/rsql-job "750 root:rsql-job"
/usr/bin/rsql-agent check-config "$CONFIG" || fail "rsql-agent check-config $CONFIG fails"
check_config_as_rsql
# Every commented-out `# key = value` example and `# [table]` header, uncommented, is valid.
sed -e 's/^# \([a-z_]* = \)/\1/' -e 's/^# \(\[[a-z.]*\]\)$/\1/' "$CONFIG" >"$work/examples.toml"
/usr/bin/rsql-agent check-config "$work/examples.toml" >/dev/null ||
  fail "the commented-out examples in $CONFIG do not pass check-config once uncommented"

[ -x "$SHIM" ] || fail "$SHIM is not executable"
[ "$("$SHIM" --version)" = "rsql-wrapper $version" ] || fail "$SHIM --version does not reach rsql-wrapper"
"$SHIM" --help >"$work/shim.help" || fail "$SHIM --help failed"
grep -q '^Legacy form: rsql-wrapper TOKEN' "$work/shim.help" || fail "$SHIM --help is not rsql-wrapper's"
rc=0
"$SHIM" >"$work/shim.out" 2>&1 || rc=$?
if [ "$rc" -ne 2 ] || ! grep -q 'Usage: rsql-wrapper' "$work/shim.out"; then
  cat "$work/shim.out" >&2
  fail "$SHIM with no arguments exited $rc, expected rsql-wrapper's usage error (2)"
fi
# The drop-in creds helper legacy scripts source: it maps the agent's variables.
creds_out="$(RSQL_HOST=h RSQL_PORT=5439 RSQL_USER=u RSQL_DB=d RSPASSWORD=p bash -c \
  '. "$1" secret && echo "$HOST $PORT $USER $DB"' creds "$CREDS")" || fail "sourcing $CREDS failed"
[ "$creds_out" = "h 5439 u d" ] || fail "$CREDS set '$creds_out', expected 'h 5439 u d'"
# The 11 legacy arguments reach rsql-wrapper's legacy form, which finds no agent, cannot run
# the job here (no config) and cannot fail its task (no AWS here): 69.
rc=0
RSQL_AGENT_SOCKET="$work/no-agent.sock" RSQL_AGENT_CONFIG="$work/no-config.toml" \
  AWS_ENDPOINT_URL=http://127.0.0.1:9 AWS_ACCESS_KEY_ID=x AWS_SECRET_ACCESS_KEY=x \
  AWS_REGION=us-east-1 AWS_EC2_METADATA_DISABLED=true \
  "$SHIM" token wf exec-1 /opt/rsql/rsql_scripts/job.sh \
  i-0 secret /var/log/job.log audit /rsql/logs /opt/rsql/rsql_scripts us-east-1 \
  >"$work/shim.out" 2>&1 || rc=$?
[ "$rc" -eq 69 ] || {
  cat "$work/shim.out" >&2
  fail "$SHIM with the 11 legacy arguments and no agent exited $rc, expected 69 (agent not reachable)"
}

if command -v systemd-analyze >/dev/null 2>&1; then
  out="$(systemd-analyze verify --man=no "$UNIT" "$SLICE" "$OWNER_SOCKET_UNIT" 2>&1)" || {
    printf '%s\n' "$out" >&2
    fail "systemd-analyze verify $UNIT $SLICE failed"
  }
  [ -z "$out" ] || {
    printf '%s\n' "$out" >&2
    fail "systemd-analyze verify $UNIT is not clean"
  }
  verified="systemd-analyze verify clean"
else
  verified="systemd-analyze missing: unit not verified"
fi

say "postinst configure again (must change nothing)"
before="$(perms "$CONFIG") $(perms /var/lib/rsql-agent) $(getent passwd rsql)"
/var/lib/dpkg/info/rsql-agent.postinst configure "$version-1"
[ "$(perms "$CONFIG") $(perms /var/lib/rsql-agent) $(getent passwd rsql)" = "$before" ] ||
  fail "a second postinst changed owners, modes or the user"

say "dpkg -i again over a changed config (the change must stay)"
echo "# changed by check-package" >>"$CONFIG"
dpkg -i "$deb" >/dev/null
grep -qx "# changed by check-package" "$CONFIG" || fail "reinstalling replaced the changed $CONFIG"
expect_perms "$CONFIG" "640 root:rsql"
check_config_as_rsql

say "dpkg -r rsql-agent (the config must stay)"
dpkg -r rsql-agent
[ "$(status)" = "deinstall ok config-files" ] || fail "after dpkg -r, status is '$(status)'"
for path in "${paths[@]}" "$UNIT" "$SHIM" "$CREDS" "$SLICE" "$OWNER_SOCKET_UNIT" "$OWNER_UNIT" "$SYSUSERS"; do
  [ ! -e "$path" ] || fail "$path is still there after dpkg -r"
done
[ -f "$CONFIG" ] || fail "dpkg -r removed the conffile $CONFIG"
[ -d /var/lib/rsql-agent ] || fail "dpkg -r removed /var/lib/rsql-agent (only purge may)"

say "dpkg -P rsql-agent (everything but the user must go)"
dpkg -P rsql-agent
installed=0
dpkg -s rsql-agent >/dev/null 2>&1 && fail "dpkg -s rsql-agent still finds it after dpkg -P"
for path in "$CONFIG" /etc/rsql-agent /usr/libexec/rsql-agent /var/lib/rsql-agent /var/log/rsql-agent \
  /var/lib/rsql-job /opt/rsql/rsql_scripts /opt/rsql; do
  [ ! -e "$path" ] || fail "$path is still there after dpkg -P"
done
! dpkg-statoverride --list "$CONFIG" >/dev/null || fail "dpkg -P left the stat override of $CONFIG"
getent passwd rsql >/dev/null || fail "dpkg -P deleted the rsql user (it must stay)"
getent passwd rsql-job >/dev/null || fail "dpkg -P deleted the rsql-job user (it must stay)"

if [ "$user_existed" -eq 0 ]; then
  # A machine without systemd-sysusers: the same PATH, less that one program.
  say "dpkg -i with systemd-sysusers hidden (the groupadd/useradd fallback)"
  userdel rsql
  ! getent group rsql >/dev/null || groupdel rsql
  if [ "$job_user_existed" -eq 0 ]; then
    userdel rsql-job
    ! getent group rsql-job >/dev/null || groupdel rsql-job
  fi
  mkdir "$work/bin"
  IFS=: read -ra dirs <<<"$PATH"
  for dir in "${dirs[@]}"; do
    [ -d "$dir" ] || continue
    for prog in "$dir"/*; do
      name="${prog##*/}"
      if [ "$name" != systemd-sysusers ] && [ ! -e "$work/bin/$name" ] && [ -x "$prog" ]; then
        ln -s "$prog" "$work/bin/$name"
      fi
    done
  done
  [ ! -e "$work/bin/systemd-sysusers" ] || fail "could not hide systemd-sysusers"
  installed=1
  PATH="$work/bin" dpkg -i "$deb"
  check_user "groupadd/useradd"
  check_config_as_rsql
  dpkg -P rsql-agent >/dev/null
  installed=0
  fallback="groupadd/useradd fallback checked (the rsql user this run created is deleted on exit)"
else
  fallback="the rsql user existed before: its creation was not checked, and it stays"
fi

# The rpm's scriptlets, taken out of the .rpm and run by /bin/sh as rpm would run them around
# an install and an erase; rpm itself does not run here (this is not an rpm system).
say "rpm scriptlets run with sh: %pre 1, %post 1, %preun 0, %postun 0"
if [ "$user_existed" -eq 0 ]; then
  userdel rsql
  ! getent group rsql >/dev/null || groupdel rsql
fi
if [ "$job_user_existed" -eq 0 ]; then
  userdel rsql-job
  ! getent group rsql-job >/dev/null || groupdel rsql-job
fi
for tag in PREIN POSTIN PREUN POSTUN; do
  rpm -qp --qf "%{$tag}" "$rpm" >"$work/$tag.sh"
done
scriptlets=1
/bin/sh "$work/PREIN.sh" 1 || fail "rpm %pre failed"
check_user "rpm %pre"
/bin/sh "$work/POSTIN.sh" 1 || fail "rpm %post failed"
expect_perms /var/lib/rsql-agent "750 rsql:rsql"
expect_perms /var/log/rsql-agent "750 rsql:rsql"
expect_perms /var/lib/rsql-job "750 root:rsql-job"
expect_perms /opt/rsql/rsql_scripts "755 root:root"
# What rpm would have unpacked and, on erase, removed again: the directories stay behind.
mkdir -p /etc/rsql-agent /usr/libexec/rsql-agent
/bin/sh "$work/PREUN.sh" 0 || fail "rpm %preun failed"
/bin/sh "$work/POSTUN.sh" 0 || fail "rpm %postun failed"
for path in /etc/rsql-agent /usr/libexec/rsql-agent; do
  [ ! -e "$path" ] || fail "rpm %postun left the empty $path"
done
remove_scriptlet_dirs
scriptlets=0

say "ok"
say "  $(basename "$deb"): $(du -h "$deb" | cut -f1), Depends: $deb_depends"
libs="$(rpm -qpR "$rpm" | grep -o '^[a-z_]*\.so\.[0-9]*()' | tr -d '()' | sort -u | tr '\n' ' ')"
say "  $(basename "$rpm"): $(du -h "$rpm" | cut -f1), Requires: /bin/sh ${libs}(newest symbol GLIBC_$rpm_glibc)"
while read -r line; do say "  ${line#check-glibc: }"; done <<<"$glibc_report"
say "  installed, checked (check-config as root and rsql, shim, $verified), reinstalled, removed, purged"
say "  $fallback"
say "  rpm scriptlets: user from %pre, directories from %post, empty directories gone after %postun"
