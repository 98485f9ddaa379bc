#!/usr/bin/env bash
# Usage: launch/tail.sh --name NAME --zone ZONE [--worker N] [--run RUN] [--lines N]
#
# Follows the log of the job that run.sh started, on one worker (Ctrl-C stops following, not
# the job). Every worker logs; worker 0 is the one to watch.
#
#   --name NAME               the TPU
#   --zone ZONE               its zone
#   --worker N                which worker (default 0; `all` interleaves every worker's lines)
#   --run RUN                 that run's log (default: the latest run's)
#   --lines N                 lines of history to show first (default 100)
#   --project PROJECT         default: gcloud's configured project
#   --dry-run                 print the gcloud command, run nothing
#   -h, --help                this text
set -euo pipefail
# shellcheck source=launch/common.sh
source "$(dirname "$0")/common.sh"

WORKER=0
RUN=latest
LINES=100
normalize_args "$@"
set -- "${ARGS[@]}"
while (($#)); do
  case "$1" in
    --worker) WORKER=$(flag_value "$@"); shift 2 ;;
    --run) RUN=$(flag_value "$@"); shift 2 ;;
    --lines) LINES=$(flag_value "$@"); shift 2 ;;
    *) parse_common_flag "$@"; shift "$SHIFT" ;;
  esac
done
require_tpu
check_worker "$WORKER"
if [[ ! "$LINES" =~ ^[0-9]+$ ]]; then
  die_usage "--lines must be a number, not $LINES"
fi

# -F, not -f: it keeps following when latest.log is pointed at a new run.
tpu_ssh "$WORKER" "tail -n $LINES -F $(shell_quote "$REMOTE_LOGS/$RUN.log")"
