#!/usr/bin/env bash
# Usage: launch/run.sh --name NAME --zone ZONE --config FILE --workdir DIR [options] [-- ARGS]
#
# Starts `python -m dqo_jax.main` on every worker at once, detached so that it outlives the ssh
# session. The workers form one JAX job: on a TPU VM pod jax.distributed.initialize() finds its
# peers through the TPU metadata, so no coordinator address is passed. Each worker logs to
# ~/dqo_logs/RUN.log (and ~/dqo_logs/latest.log); launch/tail.sh follows it.
#
#   --name NAME               the TPU, set up with launch/setup.sh
#   --zone ZONE               its zone
#   --config FILE             e.g. configs/gsm8k.py:qwen2_7b (relative to the repository)
#   --workdir DIR             where the run writes, the same for every worker: gs://BUCKET/PATH
#                             (checkpoints written there, other files copied up from a local
#                             cache), or an absolute path they share, e.g. a bucket mounted by
#                             `setup.sh --mount-bucket BUCKET` at /gcs/BUCKET/PATH
#   --run RUN                 the log's name (default: the workdir's last path component)
#   --log-bucket URL          also copy each worker's log to URL/RUN/HOSTNAME.log every minute
#   --env KEY=VALUE           set in the job's environment (repeatable)
#   --worker W                all (default; a pod job needs every worker) or one index
#   --project PROJECT         default: gcloud's configured project
#   --dry-run                 print the gcloud command, run nothing
#   -h, --help                this text
#   -- ARGS                   passed on to dqo_jax.main, e.g. -- --config.dqo.beta=0.05
set -euo pipefail
# shellcheck source=launch/common.sh
source "$(dirname "$0")/common.sh"

CONFIG=""
WORKDIR=""
RUN=""
LOG_BUCKET=""
WORKER=all
# Unbuffered, so that the log shows each line when it is printed.
ENV_VARS=(PYTHONUNBUFFERED=1)
OVERRIDES=()
normalize_args "$@"
set -- "${ARGS[@]}"
while (($#)); do
  case "$1" in
    --config) CONFIG=$(flag_value "$@"); shift 2 ;;
    --workdir) WORKDIR=$(flag_value "$@"); shift 2 ;;
    --run) RUN=$(flag_value "$@"); shift 2 ;;
    --log-bucket) LOG_BUCKET=$(flag_value "$@"); shift 2 ;;
    --env)
      var=$(flag_value "$@")
      if [[ ! "$var" =~ ^[A-Za-z_][A-Za-z0-9_]*= ]]; then
        die_usage "--env takes KEY=VALUE, not $var"
      fi
      ENV_VARS+=("$var")
      shift 2
      ;;
    --worker) WORKER=$(flag_value "$@"); shift 2 ;;
    --) shift; OVERRIDES=("$@"); break ;;
    *) parse_common_flag "$@"; shift "$SHIFT" ;;
  esac
done
require_tpu
require CONFIG --config
require WORKDIR --workdir
check_worker "$WORKER"
if [[ "$WORKDIR" =~ ^[A-Za-z][A-Za-z0-9+.-]*:// && "$WORKDIR" != gs://* ]]; then
  die_usage "--workdir must be gs://BUCKET/PATH or a path every worker shares, not $WORKDIR"
fi
# A relative workdir would land in ~/dqo_jax, which the next setup.sh deletes.
if [[ "$WORKDIR" != /* && "$WORKDIR" != gs://* ]]; then
  die_usage "--workdir must be an absolute path, not $WORKDIR"
fi
if [[ -n "$LOG_BUCKET" && "$LOG_BUCKET" != gs://* ]]; then
  die_usage "--log-bucket must be a gs:// path, not $LOG_BUCKET"
fi
if [[ -z "$RUN" ]]; then
  RUN=$(basename "${WORKDIR%/}")
fi

worker=(bash launch/worker.sh --log "../$REMOTE_LOGS/$RUN.log")
if [[ -n "$LOG_BUCKET" ]]; then
  worker+=(--log-bucket "${LOG_BUCKET%/}/$RUN")
fi
job=(env "${ENV_VARS[@]}" "../$REMOTE_VENV/bin/python" -m dqo_jax.main --config="$CONFIG"
  --workdir="$WORKDIR" "${OVERRIDES[@]}")
# setsid + nohup + every stream redirected, backgrounded inside braces so that the remote shell
# itself exits: ssh returns at once and a hangup does not reach the job.
tpu_ssh "$WORKER" "cd $REMOTE_CODE && { setsid nohup $(quoted "${worker[@]}" -- "${job[@]}") \
>/dev/null 2>&1 </dev/null & }"
