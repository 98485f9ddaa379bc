#!/usr/bin/env bash
# Usage: launch/create.sh --name NAME --zone ZONE --accelerator TYPE [options]
#
# Creates a Cloud TPU VM (one host, or a pod slice of several workers).
#
#   --name NAME               the TPU (and, with --queued, the queued resource) name
#   --zone ZONE               e.g. us-east5-a; the accelerator must be offered there
#   --accelerator TYPE        e.g. v5p-16, v5litepod-16, v4-32, v6e-8
#   --runtime-version V       TPU software version; by default the one for the accelerator:
#                             v4 tpu-ubuntu2204-base, v5p v2-alpha-tpuv5,
#                             v5litepod v2-alpha-tpuv5-lite, v6e v2-alpha-tpuv6e
#   --spot                    a Spot VM: much cheaper, may be preempted at any time
#   --queued                  request it as a queued resource, granted when capacity frees up;
#                             watch it with `gcloud compute tpus queued-resources describe NAME`
#   --project PROJECT         default: gcloud's configured project
#   --dry-run                 print the gcloud command, run nothing
#   -h, --help                this text
set -euo pipefail
# shellcheck source=launch/common.sh
source "$(dirname "$0")/common.sh"

ACCELERATOR=""
RUNTIME_VERSION=""
SPOT=0
QUEUED=0
normalize_args "$@"
set -- "${ARGS[@]}"
while (($#)); do
  case "$1" in
    --accelerator) ACCELERATOR=$(flag_value "$@"); shift 2 ;;
    --runtime-version) RUNTIME_VERSION=$(flag_value "$@"); shift 2 ;;
    --spot) SPOT=1; shift ;;
    --queued) QUEUED=1; shift ;;
    *) parse_common_flag "$@"; shift "$SHIFT" ;;
  esac
done
require_tpu
require ACCELERATOR --accelerator

# The base images JAX runs on (Ubuntu 22.04); jax[tpu] is installed by setup.sh.
if [[ -z "$RUNTIME_VERSION" ]]; then
  case "$ACCELERATOR" in
    v4-*) RUNTIME_VERSION=tpu-ubuntu2204-base ;;
    v5p-*) RUNTIME_VERSION=v2-alpha-tpuv5 ;;
    v5litepod-*) RUNTIME_VERSION=v2-alpha-tpuv5-lite ;;
    v6e-*) RUNTIME_VERSION=v2-alpha-tpuv6e ;;
    *) die_usage "no default runtime version for --accelerator=$ACCELERATOR; pass --runtime-version" ;;
  esac
fi

# The two commands differ in more than their verb: `tpu-vm create` names the software version
# --version, `queued-resources create` names it --runtime-version and takes the TPU's name as
# --node-id. The queued resource gets the TPU's name too, so delete.sh needs only --name.
if ((QUEUED)); then
  cmd=(gcloud compute tpus queued-resources create "$NAME" --node-id="$NAME"
    --runtime-version="$RUNTIME_VERSION")
else
  cmd=(gcloud compute tpus tpu-vm create "$NAME" --version="$RUNTIME_VERSION")
fi
cmd+=(--accelerator-type="$ACCELERATOR" "${GCLOUD_FLAGS[@]}")
if ((SPOT)); then
  cmd+=(--spot)
fi
run "${cmd[@]}"
