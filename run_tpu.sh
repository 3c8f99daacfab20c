#!/usr/bin/env bash
# run_tpu.sh: create a Cloud TPU VM slice, install ssl_jax on every worker, and run or watch training and
# evaluation on it. Run `./run_tpu.sh help` for the full usage; README section "Running on a TPU pod".
#
# Everything is driven by `gcloud compute tpus ...`; `--dry-run` prints every command (one per line,
# prefixed with "+ ") and runs nothing.
set -euo pipefail

PROG=${0##*/}
REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

# Configuration: environment variables, overridden by the equivalent flags.
NAME=${NAME:-}
ZONE=${ZONE:-}
ACCELERATOR=${ACCELERATOR:-}
RUNTIME_VERSION=${RUNTIME_VERSION:-}
BUCKET=${BUCKET:-}
PROJECT=${PROJECT:-}
SPOT=${SPOT:-0}
RUN=${RUN:-}
DATA_DIR=${DATA_DIR:-}
WORKER=${WORKER:-0}
DRY_RUN=${DRY_RUN:-0}
MAX_RESTARTS=${MAX_RESTARTS:-20}
POLL_SECONDS=${POLL_SECONDS:-120}
ACTIVE_TIMEOUT=${ACTIVE_TIMEOUT:-0}
STOP_TIMEOUT=${STOP_TIMEOUT:-600}
LOG_LINES=${LOG_LINES:-100}
COMMAND=""
CONFIG=""
JAX_VERSION=""
EXTRA_ARGS=()
GCLOUD_FLAGS=()

# Layout on every worker (paths relative to the remote $HOME).
REMOTE_SRC=ssl_jax                 # the code (git HEAD), replaced by every `setup`
REMOTE_TARBALL=ssl_jax-src.tar.gz
REMOTE_VENV=ssl_jax-venv           # kept across `setup`s
REMOTE_RUNS=ssl_jax-runs           # JOB.log, JOB.pid (the python process), JOB.rc (its exit status)

usage() {
  cat <<EOF
Usage: $PROG [options] COMMAND [args...]

Commands:
  create                  create the TPU VM slice (SPOT=1: a spot queued resource; waits until ACTIVE)
  setup                   copy git HEAD to every worker and install it (venv, requirements.txt, jax[tpu])
  train CONFIG [ARGS...]  start \`python -m ssl_jax.main --config=CONFIG\` on all workers, detached; it
                          resumes from the latest checkpoint in the workdir; ARGS are forwarded
                          (e.g. --config.num_epochs=100)
  watch CONFIG [ARGS...]  create the slice if needed, setup, train, then poll; after a preemption delete
                          and recreate the slice, setup and relaunch (resuming), at most MAX_RESTARTS times
  eval [CONFIG] PROTOCOL [ARGS...]
                          start \`python -m ssl_jax.evaluate --protocol=PROTOCOL\` (knn or linear) on the
                          run's workdir on all workers, detached; CONFIG only names the run (as for train)
  logs                    follow the log of the latest job on worker 0 (--worker=N; --run=RUN for another)
  ssh                     interactive ssh to worker 0 (--worker=N)
  stop                    SIGTERM the job on all workers (training saves a checkpoint and exits), wait
  delete                  delete the TPU VM (SPOT=1: the queued resource and its TPU VM)
  help                    this message

Settings (environment variable, or flag):
  NAME             --name=NAME            TPU VM name (also the queued-resource id with SPOT=1)
  ZONE             --zone=ZONE            e.g. us-central2-b (v4), europe-west4-a (v3)
  ACCELERATOR      --accelerator=TYPE     e.g. v4-64, v3-128, v5litepod-64 (create, watch)
  RUNTIME_VERSION  --runtime-version=V    default by family: v2/v3/v4 tpu-ubuntu2204-base,
                                          v5e (v5litepod-*) v2-alpha-tpuv5-lite, v5p v2-alpha-tpuv5,
                                          v6e v2-alpha-tpuv6e
  BUCKET           --bucket=gs://B        data in \$BUCKET/tensorflow_datasets (or DATA_DIR),
                                          workdirs in \$BUCKET/workdirs/\$RUN (train, watch, eval)
  PROJECT          --project=P            optional; gcloud's default project otherwise
  SPOT=1           --spot                 spot capacity through a queued resource
  RUN              --run=RUN              run name; default from CONFIG: configs/simclr.py:imagenet
                                          -> simclr-imagenet
  DATA_DIR                                default \$BUCKET/tensorflow_datasets
  WORKER           --worker=N             worker for logs and ssh (default 0)
  DRY_RUN=1        --dry-run              print every command ("+ ..."), run nothing
  MAX_RESTARTS (20), POLL_SECONDS (120)   watch: recreations allowed, seconds between polls
  ACTIVE_TIMEOUT (0 = none)               create with SPOT=1: seconds to wait for ACTIVE
  STOP_TIMEOUT (600)                      stop: seconds to wait for the jobs to exit
  LOG_LINES (100)                         logs: lines shown before following

Arguments after \`--\` are forwarded to train/eval verbatim. Jobs write
~/$REMOTE_RUNS/JOB.log on every worker; one job runs at a time per slice.

Example (v4-64):
  export NAME=ssl ZONE=us-central2-b ACCELERATOR=v4-64 BUCKET=gs://my-bucket
  $PROG create && $PROG setup && $PROG train configs/simclr.py:imagenet
  $PROG logs; $PROG eval configs/simclr.py:imagenet linear; $PROG delete
EOF
}

die() {
  printf '%s: error: %s\n' "$PROG" "$*" >&2
  exit 2
}

fail() {
  printf '%s: error: %s\n' "$PROG" "$*" >&2
  exit 1
}

note() {
  printf '%s: %s\n' "$PROG" "$*" >&2
}

# Quotes one word for a POSIX shell: bare when it only has safe characters, otherwise in single quotes.
shquote() {
  local s=$1
  if [[ -n $s && $s =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
    printf '%s' "$s"
  else
    printf "'%s'" "${s//\'/\'\\\'\'}"
  fi
}

# A command line for display, pasteable into a shell: every word quoted, `--flag=value` as --flag='value'.
show_command() {
  local word out=""
  for word in "$@"; do
    if [[ $word =~ ^(--[A-Za-z0-9-]+=)(.*)$ ]]; then
      out+="${BASH_REMATCH[1]}$(shquote "${BASH_REMATCH[2]}") "
    else
      out+="$(shquote "$word") "
    fi
  done
  printf '%s\n' "${out% }"
}

# Runs a command, or with --dry-run only prints it. Dry-run traces go to fd 3 (the script's stdout, also
# from inside command substitutions); real runs trace to stderr.
run() {
  if ((DRY_RUN)); then
    printf '+ %s\n' "$(show_command "$@")" >&3
    return 0
  fi
  printf '+ %s\n' "$(show_command "$@")" >&2
  "$@"
}

# Runs a query whose output is used (not traced: watch polls often); with --dry-run prints it, outputs nothing.
query() {
  if ((DRY_RUN)); then
    printf '+ %s\n' "$(show_command "$@")" >&3
    return 0
  fi
  "$@"
}

# Joins shell statements with "; " so that a remote script is one line (each must be complete on its own).
join_statements() {
  local out="" statement
  for statement in "$@"; do out+="$statement; "; done
  printf '%s\n' "${out%; }"
}

require() {
  local var flag
  for var in "$@"; do
    if [[ -z ${!var} ]]; then
      flag=${var,,}
      flag=--${flag//_/-}
      die "$var is not set: '$COMMAND' needs it (export $var=... or pass $flag=...)"
    fi
  done
}

no_arguments() {
  (($# == 0)) || die "'$COMMAND' takes no arguments, got: $*"
}

validate_settings() {
  if [[ -n $NAME && ! $NAME =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ ]]; then
    die "NAME must be lower-case letters, digits and hyphens, starting with a letter; got '$NAME'"
  fi
  if [[ -n $BUCKET ]]; then
    [[ $BUCKET =~ ^gs://[A-Za-z0-9._/-]+$ ]] || die "BUCKET must be a gs:// URL, got '$BUCKET'"
    BUCKET=${BUCKET%/}
  fi
  if [[ -n $DATA_DIR && ! $DATA_DIR =~ ^gs://[A-Za-z0-9._/-]+$ ]]; then
    die "DATA_DIR must be a gs:// URL (the workers cannot see local paths), got '$DATA_DIR'"
  fi
  if [[ -n $RUN && ! $RUN =~ ^[A-Za-z0-9][A-Za-z0-9._-]*$ ]]; then
    die "RUN must be letters, digits, '.', '_' and '-', got '$RUN'"
  fi
  [[ $WORKER =~ ^[0-9]+$ ]] || die "WORKER (--worker) must be a worker index (0, 1, ...), got '$WORKER'"
  local var
  for var in MAX_RESTARTS POLL_SECONDS ACTIVE_TIMEOUT STOP_TIMEOUT LOG_LINES; do
    [[ ${!var} =~ ^[0-9]+$ ]] || die "$var must be a non-negative integer, got '${!var}'"
  done
  [[ $SPOT == 0 || $SPOT == 1 ]] || die "SPOT must be 0 or 1, got '$SPOT'"
}

# Sets RUNTIME_VERSION from the accelerator family unless given.
resolve_runtime_version() {
  if [[ -n $RUNTIME_VERSION ]]; then return 0; fi
  case $ACCELERATOR in
    v2-* | v3-* | v4-*) RUNTIME_VERSION=tpu-ubuntu2204-base ;;
    v5litepod-* | v5e-*) RUNTIME_VERSION=v2-alpha-tpuv5-lite ;;
    v5p-*) RUNTIME_VERSION=v2-alpha-tpuv5 ;;
    v6e-*) RUNTIME_VERSION=v2-alpha-tpuv6e ;;
    *) die "no default runtime version for ACCELERATOR=$ACCELERATOR: set RUNTIME_VERSION (--runtime-version)" ;;
  esac
}

# Sets JAX_VERSION to the jax pinned in requirements.txt; the workers install jax[tpu] at that version.
resolve_jax_version() {
  JAX_VERSION=$(sed -n 's/^jax==\([0-9][0-9.]*\).*/\1/p' "$REPO_ROOT/requirements.txt")
  [[ -n $JAX_VERSION ]] || fail "no 'jax==VERSION' line in $REPO_ROOT/requirements.txt"
}

# gcloud flags shared by every command (in GCLOUD_FLAGS).
set_gcloud_flags() {
  GCLOUD_FLAGS=("--zone=$ZONE")
  if [[ -n $PROJECT ]]; then GCLOUD_FLAGS+=("--project=$PROJECT"); fi
}

tpu_ssh() {  # tpu_ssh WORKER REMOTE_COMMAND
  run gcloud compute tpus tpu-vm ssh "$NAME" "${GCLOUD_FLAGS[@]}" "--worker=$1" "--command=$2"
}

# ---------------------------------------------------------------------------------------------------------
# The slice. Every function returns non-zero on failure (they also run inside `if`, where set -e is off).

create_slice() {
  if ((SPOT)); then
    run gcloud compute tpus queued-resources create "$NAME" "${GCLOUD_FLAGS[@]}" "--node-id=$NAME" \
      "--accelerator-type=$ACCELERATOR" "--runtime-version=$RUNTIME_VERSION" --spot || return
    wait_active
  else
    run gcloud compute tpus tpu-vm create "$NAME" "${GCLOUD_FLAGS[@]}" "--accelerator-type=$ACCELERATOR" \
      "--version=$RUNTIME_VERSION"
  fi
}

delete_slice() {
  if ((SPOT)); then
    run gcloud compute tpus queued-resources delete "$NAME" "${GCLOUD_FLAGS[@]}" --force --quiet
  else
    run gcloud compute tpus tpu-vm delete "$NAME" "${GCLOUD_FLAGS[@]}" --quiet
  fi
}

# The slice's state: the queued resource's (SPOT=1: WAITING_FOR_RESOURCES, PROVISIONING, ACTIVE,
# SUSPENDED, FAILED, ...) or the TPU VM's (READY, PREEMPTED, ...); MISSING when it does not exist, UNKNOWN
# when gcloud failed otherwise.
slice_state() {
  local out cmd=(gcloud compute tpus tpu-vm describe "$NAME" "${GCLOUD_FLAGS[@]}" "--format=value(state)")
  if ((SPOT)); then
    cmd=(gcloud compute tpus queued-resources describe "$NAME" "${GCLOUD_FLAGS[@]}" "--format=value(state.state)")
  fi
  if ((DRY_RUN)); then
    query "${cmd[@]}"
    echo MISSING
  elif out=$("${cmd[@]}" 2>&1); then
    out=$(tail -n 1 <<<"$out")
    printf '%s\n' "${out:-UNKNOWN}"
  elif grep -qiE 'NOT_FOUND|not found' <<<"$out"; then
    echo MISSING
  else
    note "could not read the state of $NAME: $(tail -n 1 <<<"$out")"
    echo UNKNOWN
  fi
}

# Waits until the queued resource is ACTIVE (at most ACTIVE_TIMEOUT seconds when that is not 0).
wait_active() {
  local start=$SECONDS state
  if ((DRY_RUN)); then
    slice_state >/dev/null
    return 0
  fi
  while true; do
    state=$(slice_state)
    case $state in
      ACTIVE) note "queued resource $NAME is ACTIVE"; return 0 ;;
      FAILED | SUSPENDED | SUSPENDING | MISSING)
        note "queued resource $NAME is $state (gcloud compute tpus queued-resources describe $NAME --zone=$ZONE)"
        return 1 ;;
    esac
    if ((ACTIVE_TIMEOUT > 0 && SECONDS - start >= ACTIVE_TIMEOUT)); then
      note "queued resource $NAME still $state after ${ACTIVE_TIMEOUT}s; it stays queued ('$PROG delete' cancels it)"
      return 1
    fi
    note "queued resource $NAME is $state; waiting (${POLL_SECONDS}s between checks)"
    sleep "$POLL_SECONDS"
  done
}

# ---------------------------------------------------------------------------------------------------------
# Code and jobs on the workers. Remote scripts are POSIX sh (the login shell runs them), one line each.

# Defines `alive PIDFILE` on a worker: true while the ssl_jax process it names runs.
REMOTE_ALIVE="alive() { [ -s \"\$1\" ] && ps -ww -p \"\$(cat \"\$1\")\" -o args= 2>/dev/null | grep ssl_jax >/dev/null; }"

setup_workers() {
  local tarball install venv_python="\"\$HOME/$REMOTE_VENV/bin/python\""
  tarball=${TMPDIR:-/tmp}/ssl_jax-src-$$.tar.gz
  if [[ -n $(git -C "$REPO_ROOT" status --porcelain --untracked-files=no 2>/dev/null) ]]; then
    note "warning: uncommitted changes are not copied (setup ships git HEAD)"
  fi
  run git -C "$REPO_ROOT" archive --format=tar.gz "--output=$tarball" HEAD || return
  if ! run gcloud compute tpus tpu-vm scp "$tarball" "$NAME:$REMOTE_TARBALL" "${GCLOUD_FLAGS[@]}" --worker=all; then
    rm -f "$tarball"
    return 1
  fi
  run rm -f "$tarball"
  # Python >= 3.11 is needed (numpy/jax pins); the Ubuntu 22.04 TPU images have 3.10, so uv provides it.
  install=$(join_statements \
    "set -eu" \
    "rm -rf \"\$HOME/$REMOTE_SRC\"" \
    "mkdir -p \"\$HOME/$REMOTE_SRC\"" \
    "tar -xzf \"\$HOME/$REMOTE_TARBALL\" -C \"\$HOME/$REMOTE_SRC\"" \
    "rm -f \"\$HOME/$REMOTE_TARBALL\"" \
    "if [ ! -x \"\$HOME/$REMOTE_VENV/bin/python\" ]; then if python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' && python3 -m venv \"\$HOME/$REMOTE_VENV\"; then :; else rm -rf \"\$HOME/$REMOTE_VENV\"; python3 -m pip --version >/dev/null 2>&1 || { sudo apt-get update -q && sudo apt-get install -y -q python3-pip; }; python3 -m pip install --user --quiet uv; \"\$HOME/.local/bin/uv\" venv --seed --python 3.11 \"\$HOME/$REMOTE_VENV\"; fi; fi" \
    "cd \"\$HOME/$REMOTE_SRC\"" \
    "$venv_python -m pip install --quiet --upgrade pip" \
    "$venv_python -m pip install --quiet -r requirements.txt" \
    "$venv_python -m pip install --quiet \"jax[tpu]==$JAX_VERSION\"" \
    "echo \"\$(hostname): ssl_jax installed with jax \$($venv_python -c 'import jax; print(jax.__version__)')\"")
  tpu_ssh all "$install"
}

# launch_job JOB PYTHON_ARGS...: starts `python PYTHON_ARGS` in the code directory on every worker, under
# setsid + nohup so that it outlives the ssh session; ~/ssl_jax-runs/JOB.log gets its output, JOB.pid the
# python process id (what `stop` signals), JOB.rc its exit status. Refuses while another job runs. Returns
# once JOB.pid exists (at most 30 s), so that a status check right after the launch sees the job running.
launch_job() {
  local job=$1 arg python_cmd=python runs="\$HOME/$REMOTE_RUNS" inner remote
  shift
  for arg in "$@"; do python_cmd+=" $(shquote "$arg")"; done
  inner=$(join_statements \
    ". \"\$HOME/$REMOTE_VENV/bin/activate\"" \
    "export PYTHONUNBUFFERED=1" \
    "$python_cmd & echo \$! > \"$runs/$job.pid\"" \
    "wait \$!" \
    "echo \$? > \"$runs/$job.rc\"")
  remote=$(join_statements \
    "set -eu" \
    "$REMOTE_ALIVE" \
    "mkdir -p \"$runs\"" \
    "for f in \"$runs\"/*.pid; do if alive \"\$f\"; then echo \"\$(hostname): a job is already running (\$f): '$PROG stop' first\" >&2; exit 1; fi; done" \
    "cd \"\$HOME/$REMOTE_SRC\"" \
    "rm -f \"$runs/$job.pid\" \"$runs/$job.rc\"" \
    "ln -sfn \"$job.log\" \"$runs/latest.log\"" \
    "i=0" \
    "setsid nohup bash -c $(shquote "$inner") > \"$runs/$job.log\" 2>&1 < /dev/null & while [ ! -s \"$runs/$job.pid\" ] && [ \$i -lt 300 ]; do sleep 0.1; i=\$((i + 1)); done" \
    "echo \"\$(hostname): started $job (log ~/$REMOTE_RUNS/$job.log)\"")
  tpu_ssh all "$remote"
}

# One word about JOB on worker 0: running, finished, sigterm (exit status 0 after a SIGTERM), failed:RC,
# none (neither running nor ended), unknown (ssh failed).
job_status() {
  local job=$1 runs="\$HOME/$REMOTE_RUNS" remote out
  remote=$(join_statements \
    "$REMOTE_ALIVE" \
    "if [ -s \"$runs/$job.rc\" ]; then rc=\$(cat \"$runs/$job.rc\"); if [ \"\$rc\" != 0 ]; then echo \"failed:\$rc\"; elif grep -q 'after SIGTERM' \"$runs/$job.log\"; then echo sigterm; else echo finished; fi; elif alive \"$runs/$job.pid\"; then echo running; else echo none; fi")
  if out=$(query gcloud compute tpus tpu-vm ssh "$NAME" "${GCLOUD_FLAGS[@]}" --worker=0 "--command=$remote" 2>/dev/null); then
    out=$(tail -n 1 <<<"$out")
    printf '%s\n' "${out:-unknown}"
  else
    echo unknown
  fi
}

# SIGTERM to every running job on every worker (training saves a checkpoint, exits 0), then waits for them.
stop_jobs() {
  local runs="\$HOME/$REMOTE_RUNS" remote
  remote=$(join_statements \
    "$REMOTE_ALIVE" \
    "pids=" \
    "for f in \"$runs\"/*.pid; do if alive \"\$f\"; then p=\$(cat \"\$f\"); kill -TERM \"\$p\" && pids=\"\$pids \$p\" && echo \"\$(hostname): SIGTERM sent to \$p (\$f)\"; fi; done" \
    "if [ -z \"\$pids\" ]; then echo \"\$(hostname): no job running\"; exit 0; fi" \
    "waited=0" \
    "while [ \"\$waited\" -lt $STOP_TIMEOUT ]; do running=; for p in \$pids; do if kill -0 \"\$p\" 2>/dev/null; then running=1; fi; done; if [ -z \"\$running\" ]; then echo \"\$(hostname): stopped\"; exit 0; fi; sleep 2; waited=\$((waited + 2)); done" \
    "echo \"\$(hostname): still running after ${STOP_TIMEOUT}s (kill -KILL\$pids forces it)\" >&2" \
    "exit 1")
  tpu_ssh all "$remote"
}

# ---------------------------------------------------------------------------------------------------------
# Commands.

run_from_config() {  # configs/simclr.py:imagenet,tiny -> simclr-imagenet-tiny
  local config=$1 base variant="" name
  base=${config%%:*}
  base=${base##*/}
  base=${base%.py}
  if [[ $config == *:* ]]; then variant=${config#*:}; fi
  name=$base${variant:+-$variant}
  printf '%s\n' "${name//[^A-Za-z0-9._-]/-}"
}

check_config() {
  local config=$1
  [[ $config =~ ^[A-Za-z0-9_./-]+\.py(:[A-Za-z0-9_,+-]*)?$ ]] ||
    die "CONFIG must look like configs/<method>.py[:variant], got '$config'"
  [[ -f $REPO_ROOT/${config%%:*} ]] || die "config file ${config%%:*} not found in $REPO_ROOT"
}

# Sets CONFIG, EXTRA_ARGS and RUN for train/watch from their arguments.
parse_train_args() {
  (($# > 0)) || die "'$COMMAND' needs a CONFIG, e.g. $PROG $COMMAND configs/simclr.py:imagenet"
  CONFIG=$1
  shift
  EXTRA_ARGS=("$@")
  check_config "$CONFIG"
  RUN=${RUN:-$(run_from_config "$CONFIG")}
}

launch_train() {
  launch_job "$RUN" -m ssl_jax.main "--config=$CONFIG" \
    "--config.data_dir=${DATA_DIR:-$BUCKET/tensorflow_datasets}" "--workdir=$BUCKET/workdirs/$RUN" \
    "${EXTRA_ARGS[@]}"
}

cmd_create() {
  require NAME ZONE ACCELERATOR
  no_arguments "$@"
  resolve_runtime_version
  create_slice || fail "creating $NAME failed"
}

cmd_setup() {
  require NAME ZONE
  no_arguments "$@"
  resolve_jax_version
  setup_workers || fail "setup of $NAME failed"
}

cmd_train() {
  require NAME ZONE BUCKET
  parse_train_args "$@"
  launch_train || fail "launching $RUN on $NAME failed"
  if ((SPOT)); then
    note "spot slice: a preemption ends this run; '$PROG watch $CONFIG' recreates the slice and resumes it"
  fi
}

cmd_eval() {
  require NAME ZONE BUCKET
  if (($# > 0)) && [[ $1 == *.py || $1 == *.py:* ]]; then
    check_config "$1"
    RUN=${RUN:-$(run_from_config "$1")}
    shift
  fi
  (($# > 0)) || die "'eval' needs a PROTOCOL (knn or linear), e.g. $PROG eval configs/simclr.py:imagenet linear"
  local protocol=$1
  shift
  [[ $protocol == knn || $protocol == linear ]] || die "PROTOCOL must be knn or linear, got '$protocol'"
  [[ -n $RUN ]] || die "'eval' needs the run: give the training CONFIG or set RUN (--run=RUN)"
  launch_job "$RUN-eval-$protocol" -m ssl_jax.evaluate "--workdir=$BUCKET/workdirs/$RUN" \
    "--protocol=$protocol" "$@" || fail "launching the $protocol evaluation of $RUN on $NAME failed"
}

cmd_logs() {
  require NAME ZONE
  no_arguments "$@"
  local log=latest.log
  if [[ -n $RUN ]]; then log=$RUN.log; fi
  tpu_ssh "$WORKER" "tail -n $LOG_LINES -F \"\$HOME/$REMOTE_RUNS/$log\""
}

cmd_ssh() {
  require NAME ZONE
  no_arguments "$@"
  run gcloud compute tpus tpu-vm ssh "$NAME" "${GCLOUD_FLAGS[@]}" "--worker=$WORKER"
}

cmd_stop() {
  require NAME ZONE
  no_arguments "$@"
  stop_jobs || fail "stopping the jobs on $NAME failed or timed out"
}

cmd_delete() {
  require NAME ZONE
  no_arguments "$@"
  delete_slice || fail "deleting $NAME failed"
}

# watch: bring the run up, then poll; after a preemption delete + recreate the slice, setup, relaunch.
WATCH_RESTARTS=0

count_restart() {
  WATCH_RESTARTS=$((WATCH_RESTARTS + 1))
  ((WATCH_RESTARTS <= MAX_RESTARTS)) || fail "$1, and all MAX_RESTARTS=$MAX_RESTARTS restarts are used: giving up"
  note "$1: restart $WATCH_RESTARTS of $MAX_RESTARTS"
}

# bring_up setup|relaunch: installs the code (setup) or stops leftovers (relaunch), then launches training.
bring_up() {
  case $1 in
    setup) setup_workers || return ;;
    relaunch) stop_jobs || return ;;
  esac
  launch_train
}

cmd_watch() {
  require NAME ZONE ACCELERATOR BUCKET
  parse_train_args "$@"
  resolve_runtime_version
  resolve_jax_version
  local state status pending="" sigterm_polls=0

  if ((DRY_RUN)); then
    slice_state >/dev/null
    create_slice
    bring_up setup
    slice_state >/dev/null
    job_status "$RUN" >/dev/null
    note "dry run: watch would poll every ${POLL_SECONDS}s and recreate the slice at most $MAX_RESTARTS times"
    return 0
  fi

  # Initial bring-up: failures here end the command.
  state=$(slice_state)
  case $state in
    ACTIVE | READY)
      if [[ $(job_status "$RUN") == running ]]; then
        note "$RUN is already running on $NAME: watching it"
      else
        bring_up setup || fail "bringing $RUN up on $NAME failed"
      fi ;;
    MISSING)
      create_slice || fail "creating $NAME failed"
      bring_up setup || fail "bringing $RUN up on $NAME failed" ;;
    ACCEPTED | WAITING_FOR_RESOURCES | PROVISIONING | CREATING)
      if ((SPOT)); then wait_active || fail "$NAME did not become ACTIVE"; fi
      pending=setup ;;
    *)
      note "slice $NAME is $state: deleting and recreating it"
      delete_slice || fail "deleting $NAME failed"
      create_slice || fail "creating $NAME failed"
      bring_up setup || fail "bringing $RUN up on $NAME failed" ;;
  esac

  while true; do
    sleep "$POLL_SECONDS"
    state=$(slice_state)
    case $state in
      ACTIVE | READY)
        if [[ -n $pending ]]; then
          if bring_up "$pending"; then pending=""; else count_restart "bringing $RUN up on $NAME failed"; fi
          continue
        fi
        status=$(job_status "$RUN")
        case $status in
          running) sigterm_polls=0 ;;
          finished)
            note "$RUN finished (exit status 0); the slice is still up: '$PROG delete' releases it"
            return 0 ;;
          failed:*) fail "$RUN exited with status ${status#failed:} on worker 0, not after a preemption: see '$PROG logs'" ;;
          sigterm)
            # A preemption's SIGTERM is soon followed by the slice leaving ACTIVE/READY; a `stop` is not.
            sigterm_polls=$((sigterm_polls + 1))
            if ((sigterm_polls >= 3)); then
              note "$RUN was stopped by SIGTERM ('$PROG stop'?) while $NAME stayed up: not relaunching"
              return 0
            fi ;;
          none)
            count_restart "$RUN is not running on worker 0 of $NAME"
            pending=relaunch
            if bring_up relaunch; then pending=""; fi ;;
          *) note "could not read the status of $RUN on worker 0; retrying in ${POLL_SECONDS}s" ;;
        esac ;;
      PREEMPTED | TERMINATED | STOPPED | SUSPENDING | SUSPENDED | FAILED | MISSING)
        count_restart "slice $NAME is $state"
        if [[ $state != MISSING ]]; then delete_slice || note "deleting $NAME failed; retrying later"; fi
        pending=setup
        sigterm_polls=0
        # A failed step leaves a state that the next poll handles again.
        if create_slice && bring_up setup; then pending=""; fi ;;
      *) note "slice $NAME is $state; waiting" ;;
    esac
  done
}

# ---------------------------------------------------------------------------------------------------------
# Argument parsing: the settings' flags may appear anywhere before `--`; everything else is positional
# (the command, its arguments, and for train/watch/eval the arguments forwarded to Python).

main() {
  local args=() value
  while (($# > 0)); do
    case $1 in
      --) shift; args+=("$@"); break ;;
      -h | --help) args=(help); break ;;
      --spot) SPOT=1 ;;
      --dry-run) DRY_RUN=1 ;;
      --name=* | --zone=* | --accelerator=* | --runtime-version=* | --bucket=* | --project=* | --run=* | --worker=*)
        value=${1#*=}
        set_setting "${1%%=*}" "$value" ;;
      --name | --zone | --accelerator | --runtime-version | --bucket | --project | --run | --worker)
        (($# > 1)) || die "$1 needs a value"
        set_setting "$1" "$2"
        shift ;;
      *) args+=("$1") ;;
    esac
    shift
  done
  [[ $DRY_RUN == 0 || $DRY_RUN == 1 ]] || die "DRY_RUN must be 0 or 1, got '$DRY_RUN'"

  if ((${#args[@]} == 0)); then
    usage >&2
    exit 2
  fi
  COMMAND=${args[0]}
  args=("${args[@]:1}")
  case $COMMAND in
    help | create | setup | train | watch | eval | logs | ssh | stop | delete) ;;
    *) die "unknown command '$COMMAND' (commands: create setup train watch eval logs ssh stop delete help)" ;;
  esac
  validate_settings
  set_gcloud_flags
  exec 3>&1

  case $COMMAND in
    help | train | watch | eval) ;;
    *)
      local arg
      for arg in "${args[@]}"; do
        [[ $arg != -* ]] || die "unknown option '$arg' for '$COMMAND' (see '$PROG help')"
      done ;;
  esac

  case $COMMAND in
    help) usage ;;
    create) cmd_create "${args[@]}" ;;
    setup) cmd_setup "${args[@]}" ;;
    train) cmd_train "${args[@]}" ;;
    watch) cmd_watch "${args[@]}" ;;
    eval) cmd_eval "${args[@]}" ;;
    logs) cmd_logs "${args[@]}" ;;
    ssh) cmd_ssh "${args[@]}" ;;
    stop) cmd_stop "${args[@]}" ;;
    delete) cmd_delete "${args[@]}" ;;
  esac
}

set_setting() {
  case $1 in
    --name) NAME=$2 ;;
    --zone) ZONE=$2 ;;
    --accelerator) ACCELERATOR=$2 ;;
    --runtime-version) RUNTIME_VERSION=$2 ;;
    --bucket) BUCKET=$2 ;;
    --project) PROJECT=$2 ;;
    --run) RUN=$2 ;;
    --worker) WORKER=$2 ;;
  esac
}

main "$@"
