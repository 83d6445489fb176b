#!/usr/bin/env bash
# rsql-agent: EC2 user data. Installs the package, mounts EFS for the fleet lock, writes the
# config and starts the service. Safe to run again: each step checks first and changes only
# what differs (a second run with the same flags changes nothing).
#
#   bootstrap.sh --package URL-or-PATH (.deb or .rpm; give both: the one that fits this
#                                       distribution, from /etc/os-release, is installed)
#                [--config-parameter NAME]         config from SSM Parameter Store (SecureString ok)
#                [--queue-url URL] [--log-group G] [--job-table T] [--workflow-table T]
#                [--secret-id ID] [--script-dir DIR]  config from flags (when no --config-parameter)
#                [--fleet NAME]                    the Fleet dimension of the metrics (stack FleetName)
#                [--auto-scaling-group NAME]       [fleet] auto_scaling_group (empty: asked of Auto Scaling)
#                [--lifecycle-hook NAME]           [fleet] lifecycle_hook, the EC2_INSTANCE_TERMINATING hook
#                [--efs fs-XXXX|DNS] [--region R]  EFS for the fleet lock, mounted at /mnt/efs
#                [--dry-run]                       print each action instead of doing it
#
# The mount uses the options docs/operations.md documents for the lock (NFSv4.1; never nolock or
# local_lock): nfsvers=4.1,rsize=1048576,wsize=1048576,hard,timeo=600,retrans=2,noresvport.
# An fstab entry at /mnt/efs or below it is left as it is, and mounted if it is not: the stack's
# user data mounts its EFS access point at /mnt/efs/rsql-agent that way.
# BOOTSTRAP_OS_RELEASE and BOOTSTRAP_FSTAB name other os-release and fstab files to read (the
# tests' fixtures).
set -euo pipefail

readonly CONFIG=/etc/rsql-agent/agent.toml
readonly MOUNT_POINT=/mnt/efs
readonly LOCK_DIR=/mnt/efs/rsql-agent/locks
readonly NFS_OPTIONS=nfsvers=4.1,rsize=1048576,wsize=1048576,hard,timeo=600,retrans=2,noresvport
readonly SERVICE=rsql-agent
readonly OS_RELEASE="${BOOTSTRAP_OS_RELEASE:-/etc/os-release}"
readonly FSTAB="${BOOTSTRAP_FSTAB:-/etc/fstab}"

packages=() package="" config_parameter="" queue_url="" log_group="" job_table="" workflow_table=""
secret_id="" script_dir=/opt/rsql/rsql_scripts efs="" region="" dry_run=0 fleet=""
auto_scaling_group="" lifecycle_hook=""

usage() {
  sed -n '2,22p' "$0" | sed 's/^# \{0,1\}//' >&2
  exit 2
}

die() {
  echo "bootstrap: $*" >&2
  exit 1
}

while [ $# -gt 0 ]; do
  case "$1" in
    --package) packages+=("${2:?--package needs a value}"); shift 2 ;;
    --config-parameter) config_parameter="${2:?--config-parameter needs a value}"; shift 2 ;;
    --queue-url) queue_url="${2:?--queue-url needs a value}"; shift 2 ;;
    --log-group) log_group="${2:?--log-group needs a value}"; shift 2 ;;
    --job-table) job_table="${2:?--job-table needs a value}"; shift 2 ;;
    --workflow-table) workflow_table="${2:?--workflow-table needs a value}"; shift 2 ;;
    --secret-id) secret_id="${2:?--secret-id needs a value}"; shift 2 ;;
    --script-dir) script_dir="${2:?--script-dir needs a value}"; shift 2 ;;
    --fleet) fleet="${2:?--fleet needs a value}"; shift 2 ;;
    --auto-scaling-group) auto_scaling_group="${2:?--auto-scaling-group needs a value}"; shift 2 ;;
    --lifecycle-hook) lifecycle_hook="${2:?--lifecycle-hook needs a value}"; shift 2 ;;
    --efs) efs="${2:?--efs needs a value}"; shift 2 ;;
    --region) region="${2:?--region needs a value}"; shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    -h | --help) usage ;;
    *) echo "bootstrap: unknown argument: $1" >&2; usage ;;
  esac
done
[ ${#packages[@]} -gt 0 ] || die "--package is required"
for value in "$queue_url" "$log_group" "$job_table" "$workflow_table" "$secret_id" "$script_dir" "$fleet" \
  "$auto_scaling_group" "$lifecycle_hook"; do
  case "$value" in
    *'"'* | *\\* | *$'\n'*) die "a quote, backslash or newline is not allowed in a config value: $value" ;;
  esac
done
# Auto Scaling's own limits: a group name of up to 255 characters; a hook name of up to 255
# letters, digits, '-', '_' and '/'.
[ ${#auto_scaling_group} -le 255 ] || die "--auto-scaling-group is longer than 255 characters"
if [ -n "$lifecycle_hook" ] && ! [[ "$lifecycle_hook" =~ ^[A-Za-z0-9/_-]{1,255}$ ]]; then
  die "--lifecycle-hook must be 1 to 255 letters, digits, '-', '_' or '/': $lifecycle_hook"
fi

# Runs a command, or prints it (on stderr, like every dry-run action) under --dry-run.
run() {
  if [ "$dry_run" -eq 1 ]; then
    echo "+ $*" >&2
  else
    "$@"
  fi
}

# Writes stdin to PATH with MODE and OWNER:GROUP, only when the content differs.
# Prints 'changed' on stdout when it wrote.
write_file() {
  local path="$1" mode="$2" owner="$3" tmp
  tmp="$(mktemp)"
  cat >"$tmp"
  if [ -f "$path" ] && cmp -s "$tmp" "$path"; then
    rm -f "$tmp"
    return 0
  fi
  if [ "$dry_run" -eq 1 ]; then
    echo "+ write $path (mode $mode, owner $owner):" >&2
    sed 's/^/|   /' "$tmp" >&2
    rm -f "$tmp"
  else
    install -D -m "$mode" -o "${owner%%:*}" -g "${owner##*:}" "$tmp" "$path"
    rm -f "$tmp"
  fi
  echo changed
}

# A TOML basic string; the values were checked for quotes, backslashes and newlines above.
toml_string() {
  printf '"%s"' "$1"
}

region_of_instance() {
  if [ -n "$region" ]; then
    echo "$region"
    return
  fi
  local token
  token="$(curl -fsS -X PUT -H 'X-aws-ec2-metadata-token-ttl-seconds: 60' \
    http://169.254.169.254/latest/api/token)" || die "no --region and no instance metadata"
  curl -fsS -H "X-aws-ec2-metadata-token: $token" \
    http://169.254.169.254/latest/meta-data/placement/region
}

# 0. The distribution, from os-release: which kind of package it takes and which tool
# installs it. Sets distro (for messages), kind (deb or rpm) and installer (apt-get, dnf or
# yum); kind and installer stay empty when os-release names no distribution we know.
distro="" kind="" installer=""
detect_distribution() {
  [ -r "$OS_RELEASE" ] || return 0
  local id="" like="" version="" pretty="" major
  # os-release is a list of shell variable assignments (os-release(5)); read in a subshell.
  # shellcheck source=/dev/null
  {
    read -r id
    read -r version
    read -r pretty
    read -r like
  } < <(
    . "$OS_RELEASE"
    printf '%s\n' "${ID:-}" "${VERSION_ID:-}" "${PRETTY_NAME:-}" "${ID_LIKE:-}"
  )
  distro="${pretty:-$id $version}"
  major="${version%%.*}"
  case " $id $like " in
    *" debian "* | *" ubuntu "*)
      kind=deb installer=apt-get
      ;;
    *" rhel "* | *" fedora "* | *" centos "* | *" amzn "*)
      kind=rpm installer=dnf
      # Amazon Linux 2 and the Enterprise Linux 7 family have yum and no dnf.
      if [ "$id" = amzn ] && [ "$major" = 2 ]; then
        installer=yum
      elif [ "$id" != amzn ] && [ "$id" != fedora ] && [ -n "$major" ] && [ "$major" -le 7 ] 2>/dev/null; then
        installer=yum
      fi
      ;;
  esac
}

# 1. The package: the one --package whose kind fits the distribution.
choose_package() {
  local candidate
  if [ -z "$kind" ]; then
    [ ${#packages[@]} -eq 1 ] ||
      die "cannot tell which --package fits this host: $OS_RELEASE names no distribution known here (${distro:-none}); give one --package"
    package="${packages[0]}"
    case "$package" in
      *.deb) installer=apt-get ;;
      *.rpm) installer=yum; command -v dnf >/dev/null 2>&1 && installer=dnf ;;
      *) die "--package must end in .deb or .rpm: $package" ;;
    esac
    return
  fi
  package=""
  for candidate in "${packages[@]}"; do
    case "$candidate" in
      *.deb | *.rpm) ;;
      *) die "--package must end in .deb or .rpm: $candidate" ;;
    esac
    if [ "${candidate##*.}" = "$kind" ]; then
      [ -z "$package" ] || die "more than one .$kind --package: $package and $candidate"
      package="$candidate"
    fi
  done
  [ -n "$package" ] || die "this host is $distro, which installs .$kind packages: no --package is a .$kind (${packages[*]})"
}

install_package() {
  local file="$package"
  case "$package" in
    http://* | https://* | s3://*)
      file="/var/tmp/$(basename "$package")"
      if [ ! -f "$file" ]; then
        case "$package" in
          s3://*) run aws s3 cp "$package" "$file" ;;
          *) run curl -fsSL --retry 5 -o "$file" "$package" ;;
        esac
      fi
      ;;
  esac
  case "$installer" in
    apt-get)
      # User data has no terminal: on an upgrade whose default config changed, keep the
      # installed agent.toml (step 3 rewrites it anyway) instead of waiting for an answer.
      run env DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
        -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold \
        "$(realpath -m "$file")"
      ;;
    *) run "$installer" install -y -q "$(realpath -m "$file")" ;;
  esac
}

# The mount point of the first fstab entry at MOUNT_POINT or below it; nothing when none.
fstab_mount_point() {
  awk -v mp="$MOUNT_POINT" '$1 !~ /^#/ && ($2 == mp || index($2, mp "/") == 1) { print $2; exit }' \
    "$FSTAB" 2>/dev/null || true
}

# 2. EFS at /mnt/efs (fstab entry + mount) and the lock dir on it. An fstab entry someone else
# wrote at /mnt/efs or below (the stack's access point) is kept, and only mounted.
mount_efs() {
  [ -n "$efs" ] || return 0
  local existing
  existing="$(fstab_mount_point)"
  if [ -n "$existing" ]; then
    mountpoint -q "$existing" 2>/dev/null || run mount "$existing"
  else
    local dns="$efs"
    case "$efs" in
      fs-*.*) ;;
      fs-*) dns="$efs.efs.$(region_of_instance).amazonaws.com" ;;
    esac
    local line="$dns:/ $MOUNT_POINT nfs4 $NFS_OPTIONS,_netdev 0 0"
    if ! command -v mount.nfs4 >/dev/null 2>&1 && ! command -v mount.nfs >/dev/null 2>&1; then
      if [ "$installer" = apt-get ]; then
        run env DEBIAN_FRONTEND=noninteractive apt-get install -y -q nfs-common
      else
        run "$installer" install -y -q nfs-utils
      fi
    fi
    [ -d "$MOUNT_POINT" ] || run mkdir -p "$MOUNT_POINT"
    if [ "$dry_run" -eq 1 ]; then
      echo "+ append to $FSTAB: $line" >&2
    else
      echo "$line" >>"$FSTAB"
    fi
    if ! mountpoint -q "$MOUNT_POINT" 2>/dev/null; then
      run mount -t nfs4 -o "$NFS_OPTIONS" "$dns:/" "$MOUNT_POINT"
    fi
  fi
  [ -d "$LOCK_DIR" ] || run install -d -m 0750 -o rsql -g rsql "$LOCK_DIR"
}

# 3. The config: from SSM Parameter Store, or from the flags.
config_text() {
  if [ -n "$config_parameter" ]; then
    if [ "$dry_run" -eq 1 ]; then
      echo "+ aws ssm get-parameter --name $config_parameter --with-decryption" >&2
      echo "# (the value of SSM parameter $config_parameter)"
      return
    fi
    aws ssm get-parameter --name "$config_parameter" --with-decryption \
      --query Parameter.Value --output text
    return
  fi
  echo "# Written by packaging/bootstrap.sh; re-running it with other flags rewrites this file."
  echo "[agent]"
  echo "state_dir = \"/var/lib/rsql-agent\""
  echo "[jobs]"
  echo "script_dir = $(toml_string "$script_dir")"
  echo "log_dir = \"/var/log/rsql-agent/jobs\""
  if [ -n "$queue_url" ]; then
    echo "[intake.sqs]"
    echo "queue_url = $(toml_string "$queue_url")"
  fi
  echo "[intake.socket]"
  echo "path = \"/run/rsql-agent/agent.sock\""
  if [ -n "$efs" ]; then
    echo "[lock]"
    echo "dir = \"$LOCK_DIR\""
  fi
  if [ -n "$log_group" ]; then
    echo "[logs.cloudwatch]"
    echo "log_group = $(toml_string "$log_group")"
  fi
  if [ -n "$fleet" ]; then
    echo "[metrics]"
    echo "fleet = $(toml_string "$fleet")"
  fi
  if [ -n "$job_table" ] || [ -n "$workflow_table" ]; then
    echo "[report.audit]"
    [ -z "$job_table" ] || echo "job_table = $(toml_string "$job_table")"
    [ -z "$workflow_table" ] || echo "workflow_table = $(toml_string "$workflow_table")"
  fi
  if [ -n "$secret_id" ]; then
    echo "[database]"
    echo "secret_id = $(toml_string "$secret_id")"
  fi
  if [ -n "$auto_scaling_group" ] || [ -n "$lifecycle_hook" ]; then
    echo "[fleet]"
    [ -z "$auto_scaling_group" ] || echo "auto_scaling_group = $(toml_string "$auto_scaling_group")"
    [ -z "$lifecycle_hook" ] || echo "lifecycle_hook = $(toml_string "$lifecycle_hook")"
  fi
}

main() {
  detect_distribution
  choose_package
  if [ "$dry_run" -eq 1 ]; then
    echo "+ host: ${distro:-unknown (no $OS_RELEASE)}; package: $package, with $installer" >&2
  fi
  install_package
  mount_efs
  local text changed
  text="$(config_text)"
  changed="$(printf '%s\n' "$text" | write_file "$CONFIG" 0640 root:rsql)"
  if [ "$dry_run" -eq 0 ]; then
    run /usr/bin/rsql-agent check-config "$CONFIG"
  else
    echo "+ /usr/bin/rsql-agent check-config $CONFIG" >&2
  fi
  if [ -n "$changed" ] && systemctl is-active --quiet "$SERVICE" 2>/dev/null; then
    run systemctl restart "$SERVICE"
  fi
  run systemctl enable --now "$SERVICE"
}

main
