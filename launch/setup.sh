#!/usr/bin/env bash
# Usage: launch/setup.sh --name NAME --zone ZONE [options]
#
# Puts the code on every worker of the TPU (~/dqo_jax, replaced if present) and installs it in a
# Python 3.11 virtual environment (~/dqo_venv) with requirements.txt and jax[tpu] of the pinned
# version. By default it copies this checkout's last commit (git archive HEAD: commit first).
#
#   --name NAME               the TPU
#   --zone ZONE               its zone
#   --repo URL                git clone URL on each worker instead of copying this checkout
#   --ref REF                 with --repo: the branch, tag or commit to check out
#   --mount-bucket BUCKET     also mount gs://BUCKET with gcsfuse on every worker (installed from
#                             Google's apt repository if missing; skipped where mounted already),
#                             so that `run.sh --workdir /gcs/BUCKET/...` is shared by the workers
#   --mount-point DIR         where to mount it (default: /gcs/BUCKET)
#   --worker W                all (default) or one worker's index
#   --project PROJECT         default: gcloud's configured project
#   --dry-run                 print the commands, run nothing
#   -h, --help                this text
set -euo pipefail
# shellcheck source=launch/common.sh
source "$(dirname "$0")/common.sh"

ROOT=$(cd "$(dirname "$0")/.." && pwd)
REPO=""
REF=""
BUCKET=""
MOUNT_POINT=""
WORKER=all
normalize_args "$@"
set -- "${ARGS[@]}"
while (($#)); do
  case "$1" in
    --repo) REPO=$(flag_value "$@"); shift 2 ;;
    --ref) REF=$(flag_value "$@"); shift 2 ;;
    --mount-bucket) BUCKET=$(flag_value "$@"); shift 2 ;;
    --mount-point) MOUNT_POINT=$(flag_value "$@"); shift 2 ;;
    --worker) WORKER=$(flag_value "$@"); shift 2 ;;
    *) parse_common_flag "$@"; shift "$SHIFT" ;;
  esac
done
require_tpu
check_worker "$WORKER"
if [[ -n "$REF" && -z "$REPO" ]]; then
  die_usage "--ref needs --repo"
fi
BUCKET=${BUCKET#gs://}
BUCKET=${BUCKET%/}
if [[ -n "$MOUNT_POINT" && -z "$BUCKET" ]]; then
  die_usage "--mount-point needs --mount-bucket"
fi
# Bucket names: 3 to 222 lowercase letters, digits, dots, dashes and underscores (safe unquoted).
if [[ -n "$BUCKET" && ! "$BUCKET" =~ ^[a-z0-9][a-z0-9._-]{1,220}[a-z0-9]$ ]]; then
  die_usage "--mount-bucket takes a bucket name such as my-bucket, not $BUCKET"
fi
MOUNT_POINT=${MOUNT_POINT:-/gcs/$BUCKET}
if [[ -n "$BUCKET" && "$MOUNT_POINT" != /* ]]; then
  die_usage "--mount-point must be an absolute path, not $MOUNT_POINT"
fi

# The TPU wheel of exactly the jax that requirements.txt pins (jax[tpu] adds libtpu).
JAX_VERSION=$(sed -n 's/^jax==//p' "$ROOT/requirements.txt")
if [[ -z "$JAX_VERSION" ]]; then
  die "no jax==VERSION line in $ROOT/requirements.txt"
fi

if [[ -n "$REPO" ]]; then
  fetch="rm -rf $REMOTE_CODE; git clone -q $(shell_quote "$REPO") $REMOTE_CODE"
  if [[ -n "$REF" ]]; then
    fetch+="; git -C $REMOTE_CODE checkout -q $(shell_quote "$REF")"
  fi
else
  tarball="${TMPDIR:-/tmp}/dqo_jax-$NAME.tar.gz"
  if ((!DRY_RUN)) && [[ -n "$(git -C "$ROOT" status --porcelain --untracked-files=no)" ]]; then
    echo "warning: uncommitted changes in $ROOT are not copied (git archive HEAD)" >&2
  fi
  run git -C "$ROOT" archive --format=tar.gz -o "$tarball" HEAD
  run gcloud compute tpus tpu-vm scp "$tarball" "$NAME:$REMOTE_CODE.tar.gz" \
    "${GCLOUD_FLAGS[@]}" --worker="$WORKER"
  fetch="rm -rf $REMOTE_CODE; mkdir $REMOTE_CODE; tar -xzf $REMOTE_CODE.tar.gz -C $REMOTE_CODE"
fi

# The TPU images are Ubuntu 22.04, whose python3 is 3.10; the pinned requirements need 3.11.
# A fresh VM's unattended upgrades can hold the dpkg lock for minutes: wait for it.
apt="sudo apt-get -q -o DPkg::Lock::Timeout=600"
install="$apt update; $apt install -y python3.11 python3.11-venv"
install+="; python3.11 -m venv $REMOTE_VENV; $REMOTE_VENV/bin/pip install -q -U pip"
install+="; $REMOTE_VENV/bin/pip install -q -r $REMOTE_CODE/requirements.txt"
install+=" $(shell_quote "jax[tpu]==$JAX_VERSION")"
tpu_ssh "$WORKER" "set -e; $fetch; $install"

if [[ -n "$BUCKET" ]]; then
  # Google's apt repository for gcsfuse, set up as its install guide does.
  key=/usr/share/keyrings/cloud.google.asc
  repo="deb [signed-by=$key] https://packages.cloud.google.com/apt"
  repo+=" gcsfuse-\$(lsb_release -c -s) main"
  install_gcsfuse="echo \"$repo\" | sudo tee /etc/apt/sources.list.d/gcsfuse.list >/dev/null"
  install_gcsfuse+="; sudo curl -fsSL -o $key https://packages.cloud.google.com/apt/doc/apt-key.gpg"
  install_gcsfuse+="; $apt update; $apt install -y gcsfuse"
  # Every host reads what the others have just written (process 0's samples, the checkpoints
  # that all hosts write), so no metadata is cached that could hide it (gcsfuse keeps it 60 s by
  # default, and for good on v5e, v5p and v6e VMs). The file cache keeps data read on the local
  # disk, checked against the object's generation at each open. Orbax commits a checkpoint on a
  # local path by renaming its directory, which gcsfuse does on a bucket without hierarchical
  # namespace (object by object) only below --rename-dir-limit objects.
  cache="\$HOME/gcsfuse_cache/$BUCKET"
  mnt=$(shell_quote "$MOUNT_POINT")
  mount="gcsfuse --implicit-dirs --rename-dir-limit=200000 --metadata-cache-ttl-secs=0"
  mount+=" --cache-dir=\"$cache\" --file-cache-max-size-mb=20480 $BUCKET $mnt"
  tpu_ssh "$WORKER" "set -e; if ! command -v gcsfuse >/dev/null; then $install_gcsfuse; fi; \
if mountpoint -q $mnt; then echo $mnt is mounted already; else sudo mkdir -p $mnt; \
sudo chown \"\$(id -u):\$(id -g)\" $mnt; mkdir -p \"$cache\"; $mount; fi"
fi
