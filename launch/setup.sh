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
WORKER=all
normalize_args "$@"
set -- "${ARGS[@]}"
while (($#)); do
  case "$1" in
    --repo) REPO=$(flag_value "$@"); shift 2 ;;
    --ref) REF=$(flag_value "$@"); shift 2 ;;
    --worker) WORKER=$(flag_value "$@"); shift 2 ;;
    *) parse_common_flag "$@"; shift "$SHIFT" ;;
  esac
done
require_tpu
check_worker "$WORKER"
if [[ -n "$REF" && -z "$REPO" ]]; then
  die_usage "--ref needs --repo"
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
