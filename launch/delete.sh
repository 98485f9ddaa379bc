#!/usr/bin/env bash
# Usage: launch/delete.sh --name NAME --zone ZONE [--queued] [--yes]
#
# Deletes the TPU, and with --queued its queued resource, so nothing is billed any more. Check
# with `gcloud compute tpus tpu-vm list --zone=ZONE` and
# `gcloud compute tpus queued-resources list --zone=ZONE`.
#
#   --name NAME               the TPU (and queued resource) name given to create.sh
#   --zone ZONE               its zone
#   --queued                  it was created with create.sh --queued: delete the queued resource
#                             and the TPU in it (deleting only the TPU leaves the request behind)
#   --yes                     do not ask for confirmation
#   --project PROJECT         default: gcloud's configured project
#   --dry-run                 print the gcloud command, run nothing
#   -h, --help                this text
set -euo pipefail
# shellcheck source=launch/common.sh
source "$(dirname "$0")/common.sh"

QUEUED=0
YES=0
normalize_args "$@"
set -- "${ARGS[@]}"
while (($#)); do
  case "$1" in
    --queued) QUEUED=1; shift ;;
    --yes) YES=1; shift ;;
    *) parse_common_flag "$@"; shift "$SHIFT" ;;
  esac
done
require_tpu

if ((QUEUED)); then
  # --force deletes the TPU first; without it an ACTIVE queued resource refuses to go.
  cmd=(gcloud compute tpus queued-resources delete "$NAME" "${GCLOUD_FLAGS[@]}" --force)
else
  cmd=(gcloud compute tpus tpu-vm delete "$NAME" "${GCLOUD_FLAGS[@]}")
fi
if ((YES)); then
  cmd+=(--quiet)
fi
run "${cmd[@]}"
