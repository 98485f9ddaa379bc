# Shared by the launch scripts (sourced, not run): flag parsing, the dry-run wrapper and the
# gcloud flags every command takes. Each script's usage is its header comment, so --help and the
# file cannot disagree.
# shellcheck shell=bash
# The variables set here are read by the scripts that source this file:
# shellcheck disable=SC2034

# An empty array under `set -u` is an error before bash 4.4, and macOS ships bash 3.2.
if ((BASH_VERSINFO[0] * 100 + BASH_VERSINFO[1] < 404)); then
  echo "error: $0 needs bash 4.4 or later, not $BASH_VERSION (on macOS: brew install bash)" >&2
  exit 1
fi

# Where things live on each worker, relative to the home directory that ssh and scp start in.
REMOTE_CODE=dqo_jax
REMOTE_VENV=dqo_venv
REMOTE_LOGS=dqo_logs

DRY_RUN=0
NAME=""
ZONE=""
PROJECT=""

# The header comment of the running script (after the shebang, up to the first non-comment line).
usage() {
  awk 'NR == 1 { next } /^#/ { sub(/^# ?/, ""); print; next } { exit }' "$0"
}

# One line naming what is wrong, exit status 2: the convention for bad command lines.
die_usage() {
  echo "error: $1 (see $0 --help)" >&2
  exit 2
}

die() {
  echo "error: $1" >&2
  exit 1
}

# The value of flag $1, which must be followed by one: `VALUE=$(flag_value "$@")`.
flag_value() {
  if (($# < 2)) || [[ "$2" == --* ]]; then
    die_usage "$1 needs a value"
  fi
  printf '%s' "$2"
}

# Parses the flags every script takes into DRY_RUN, NAME, ZONE and PROJECT and sets SHIFT to the
# number of arguments used; an unknown flag is an error.
parse_common_flag() {
  SHIFT=1
  case "$1" in
    --dry-run) DRY_RUN=1 ;;
    -h | --help)
      usage
      exit 0
      ;;
    # Not `X=$(...) && SHIFT=2`: set -e ignores a failure left of &&.
    --name) NAME=$(flag_value "$@"); SHIFT=2 ;;
    --zone) ZONE=$(flag_value "$@"); SHIFT=2 ;;
    --project) PROJECT=$(flag_value "$@"); SHIFT=2 ;;
    -*) die_usage "unknown flag $1" ;;
    *) die_usage "unexpected argument $1" ;;
  esac
}

# ARGS: the arguments with each `--flag=value` split in two, so a script's case statement sees
# one form only; what follows `--` is passed on untouched.
normalize_args() {
  ARGS=()
  while (($#)); do
    if [[ "$1" == -- ]]; then
      ARGS+=("$@")
      return
    elif [[ "$1" == --*=* ]]; then
      ARGS+=("${1%%=*}" "${1#*=}")
    else
      ARGS+=("$1")
    fi
    shift
  done
}

# Exits with a usage error naming the flag when the variable named $1 is empty.
require() {
  if [[ -z "${!1}" ]]; then
    die_usage "$2 is required"
  fi
}

# Needs --name and --zone, then fills GCLOUD_FLAGS with the flags that locate the TPU.
require_tpu() {
  require NAME --name
  require ZONE --zone
  GCLOUD_FLAGS=("--zone=$ZONE")
  if [[ -n "$PROJECT" ]]; then
    GCLOUD_FLAGS+=("--project=$PROJECT")
  fi
}

# One word quoted for a POSIX shell the way Python's shlex.quote does it: bare when it is safe,
# else in single quotes, so a printed line can be pasted into a terminal as it is.
shell_quote() {
  if [[ -n "$1" && "$1" =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]]; then
    printf '%s' "$1"
  else
    printf "'%s'" "${1//\'/\'\"\'\"\'}"
  fi
}

# A command, quoted, on one line.
quoted() {
  local out="" word
  for word in "$@"; do
    out+="${out:+ }$(shell_quote "$word")"
  done
  printf '%s\n' "$out"
}

# Runs a command, or with --dry-run only prints it on stdout; a real run echoes it on stderr
# first, so a log shows what was done.
run() {
  if ((DRY_RUN)); then
    quoted "$@"
  else
    echo "+ $(quoted "$@")" >&2
    "$@"
  fi
}

# --worker's value: `all` or a worker's index.
check_worker() {
  if [[ ! "$1" =~ ^(all|[0-9]+)$ ]]; then
    die_usage "--worker must be all or a worker index, not $1"
  fi
}

# Runs the shell command $2 on worker $1 (`all`: on every worker at once) of the TPU.
tpu_ssh() {
  run gcloud compute tpus tpu-vm ssh "$NAME" "${GCLOUD_FLAGS[@]}" --worker="$1" --command="$2"
}
