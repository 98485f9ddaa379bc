#!/usr/bin/env bash
# Usage: launch/worker.sh --log FILE [--log-bucket URL] [--sync-seconds S] -- COMMAND...
#
# Runs on each TPU worker, started there by launch/run.sh: runs COMMAND with its output
# appended to FILE, points latest.log beside FILE at it and, with --log-bucket, copies FILE to
# URL/HOSTNAME.log every S seconds (default 60) and once more at the end. Exits with COMMAND's
# status, which it also writes at the end of FILE.
set -euo pipefail
# shellcheck source=launch/common.sh
source "$(dirname "$0")/common.sh"

LOG=""
LOG_BUCKET=""
SYNC_SECONDS=60
normalize_args "$@"
set -- "${ARGS[@]}"
while (($#)); do
  case "$1" in
    --log) LOG=$(flag_value "$@"); shift 2 ;;
    --log-bucket) LOG_BUCKET=$(flag_value "$@"); shift 2 ;;
    --sync-seconds) SYNC_SECONDS=$(flag_value "$@"); shift 2 ;;
    --) shift; break ;;
    *) parse_common_flag "$@"; shift "$SHIFT" ;;
  esac
done
require LOG --log
if [[ ! "$SYNC_SECONDS" =~ ^[1-9][0-9]*$ ]]; then
  die_usage "--sync-seconds must be a positive number, not $SYNC_SECONDS"
fi
if (($# == 0)); then
  die_usage "no COMMAND after --"
fi

# Hostnames differ between the workers of a pod (t1v-n-...-w-0, -w-1, ...).
dest="${LOG_BUCKET%/}/$(hostname).log"
sync_log() {
  # A failed copy (a network blip) must not end the job's supervision.
  gcloud storage cp --quiet "$LOG" "$dest" >/dev/null 2>&1 || echo "[worker] copy to $dest failed" >&2
}

mkdir -p "$(dirname "$LOG")"
ln -sfn "$(basename "$LOG")" "$(dirname "$LOG")/latest.log"
echo "[worker] $(date -u '+%F %T') on $(hostname): $(quoted "$@")" >>"$LOG"
"$@" >>"$LOG" 2>&1 &
pid=$!
if [[ -n "$LOG_BUCKET" ]]; then
  # Polls every second, so that the last copy follows the job's end within a second.
  waited=0
  while kill -0 "$pid" 2>/dev/null; do
    if ((waited % SYNC_SECONDS == 0)); then
      sync_log
    fi
    sleep 1
    waited=$((waited + 1))
  done
fi
status=0
wait "$pid" || status=$?
echo "[worker] $(date -u '+%F %T') exit status $status" >>"$LOG"
if [[ -n "$LOG_BUCKET" ]]; then
  sync_log
fi
exit "$status"
