#!/usr/bin/env bash
# Train odin_jax on a Cloud TPU VM or pod slice.
#
#   launch/tpu_vm.sh [--dry-run] COMMAND [options] [-- EXTRA_TRAIN_FLAGS...]
#
# Commands
#   create   create the slice (a queued resource unless --no-queue)
#   setup    copy this checkout to every worker, pip install '.[tpu]' there
#   train    python -m odin_jax.main on every worker (--worker=all); the
#            output of all workers streams here and is kept in
#            ~/odin_jax_train.log on each worker
#   run      create, setup, train, delete
#   resume   like run, for preemptible slices: whenever the slice is
#            preempted it is deleted, created again and the same command
#            rerun; training resumes from the latest checkpoint in --workdir.
#            Training lives in the ssh sessions: run this in tmux on an
#            always-on machine (Cloud Shell, a small VM), not on a laptop
#   delete   delete the slice (and its queued resource)
#   status   print the slice's state
#
# Options (--name=value or --name value)
#   --tpu NAME                slice / queued resource name (default odin-jax)
#   --zone ZONE               e.g. us-central2-b (required)
#   --project PROJECT         default: gcloud's configured project
#   --accelerator-type TYPE   e.g. v4-64, v3-128 (default v4-8)
#   --runtime-version V       default tpu-ubuntu2204-base (v2-v4); v5e:
#                             v2-alpha-tpuv5-lite, v5p: v2-alpha-tpuv5
#   --spot                    Spot VMs (cheap, may be preempted any time)
#   --preemptible             preemptible TPU (tpu-vm create only)
#   --no-queue                `tpu-vm create` instead of a queued resource
#   --config CONFIG           e.g. configs/detcon_b.py or ...:demo (required
#                             for train/run/resume)
#   --workdir gs://BUCKET/DIR checkpoints and metrics; must be on GCS so
#                             every worker and every re-created slice sees it
#   --gcsfuse BUCKET          setup: also mount gs://BUCKET read-only at
#                             /gcs/BUCKET on every worker (precomputed mask
#                             records: --config.dataset.records_dir=/gcs/...)
#   --max-attempts N          resume: give up after N slices (default 20)
#   --dry-run                 print every command, run none
# Flags after `--` go to python -m odin_jax.main, e.g.
#   -- --config.model.dtype=bfloat16 --config.dataset.records_dir=/gcs/x
#
# Example (ImageNet DetCon-B on a v4-64 Spot slice, see docs/launch.md):
#   launch/tpu_vm.sh resume --tpu=detcon --zone=us-central2-b \
#     --accelerator-type=v4-64 --spot --config=configs/detcon_b.py \
#     --workdir=gs://my-bucket/detcon_b_in1k -- --config.model.dtype=bfloat16
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TPU="odin-jax"
ZONE=""
PROJECT=""
ACCELERATOR="v4-8"
RUNTIME="tpu-ubuntu2204-base"
SPOT=0
PREEMPTIBLE=0
QUEUED=1
CONFIG=""
WORKDIR=""
MAX_ATTEMPTS=20
GCSFUSE_BUCKET=""
DRY_RUN=0
COMMAND=""
TRAIN_FLAGS=()
COMMON=()      # --zone / --project, shared by every gcloud call
CREATED=0      # set by create, cleared by delete (for dry runs)
REMOTE_DIR="odin_jax"   # on each worker, relative to the home directory
RETRY_SLEEP="${ODIN_JAX_RETRY_SLEEP:-30}"   # seconds between resume attempts

die() { echo "tpu_vm.sh: $*" >&2; exit 2; }
# The comment block at the top of this file.
usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "${BASH_SOURCE[0]}"; }
log() { echo "tpu_vm.sh: $*" >&2; }

# shellcheck source=launch/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

# Prints a command as it would be typed.
show() { command_line "$@" >&2; }

# Prints the command; runs it unless --dry-run.
run() {
  show "$@"
  if (( ! DRY_RUN )); then "$@"; fi
}

# Prints the command and echoes its output (its errors silenced, empty if it
# fails); with --dry-run runs nothing and echoes the stand-in value $1.
query() {
  local dry_value="$1"
  shift
  show "$@"
  if (( DRY_RUN )); then
    echo "$dry_value"
  else
    "$@" 2>/dev/null || true
  fi
}

parse_args() {
  while (( $# )); do
    local arg="$1" value=""
    case "$arg" in
      --) shift; TRAIN_FLAGS=("$@"); return ;;
      --*=*) value="${arg#*=}"; arg="${arg%%=*}" ;;
    esac
    case "$arg" in
      --dry-run) DRY_RUN=1 ;;
      --spot) SPOT=1 ;;
      --preemptible) PREEMPTIBLE=1 ;;
      --no-queue) QUEUED=0 ;;
      --tpu|--zone|--project|--accelerator-type|--runtime-version|--config|\
      --workdir|--max-attempts|--gcsfuse)
        if [[ -z "$value" ]]; then
          (( $# >= 2 )) || die "$arg needs a value"
          value="$2"
          shift
        fi
        case "$arg" in
          --tpu) TPU="$value" ;;
          --zone) ZONE="$value" ;;
          --project) PROJECT="$value" ;;
          --accelerator-type) ACCELERATOR="$value" ;;
          --runtime-version) RUNTIME="$value" ;;
          --config) CONFIG="$value" ;;
          --workdir) WORKDIR="$value" ;;
          --max-attempts) MAX_ATTEMPTS="$value" ;;
          --gcsfuse) GCSFUSE_BUCKET="${value#gs://}" ;;
        esac ;;
      -h|--help) usage; exit 0 ;;
      -*) die "unknown option $arg (see --help)" ;;
      *)
        [[ -z "$COMMAND" ]] || die "two commands: $COMMAND and $arg"
        COMMAND="$arg" ;;
    esac
    shift
  done
}

check_args() {
  [[ -n "$COMMAND" ]] || die "no command (create, setup, train, run, resume, delete, status)"
  [[ -n "$ZONE" ]] || die "--zone is required"
  (( SPOT + PREEMPTIBLE <= 1 )) || die "--spot and --preemptible exclude each other"
  if (( QUEUED && PREEMPTIBLE )); then
    die "queued resources take --spot, not --preemptible (or use --no-queue)"
  fi
  [[ "$MAX_ATTEMPTS" =~ ^[1-9][0-9]*$ ]] || die "--max-attempts must be >= 1"
  case "$COMMAND" in
    train|run|resume)
      [[ -n "$CONFIG" ]] || die "--config is required for $COMMAND"
      [[ "$WORKDIR" == gs://* ]] || die \
        "--workdir must be gs://...: workers of a pod (and the slice that replaces a preempted one) share no disk"
      ;;
    create|setup|delete|status) ;;
    *) die "unknown command $COMMAND" ;;
  esac
}

create() {
  local -a flags=("--accelerator-type=$ACCELERATOR" "${COMMON[@]}")
  if (( QUEUED )); then
    if (( SPOT )); then flags+=(--spot); fi
    run gcloud compute tpus queued-resources create "$TPU" --node-id="$TPU" \
      --runtime-version="$RUNTIME" "${flags[@]}" || return
    CREATED=1
    wait_active
  else
    if (( SPOT )); then flags+=(--spot); fi
    if (( PREEMPTIBLE )); then flags+=(--preemptible); fi
    run gcloud compute tpus tpu-vm create "$TPU" --version="$RUNTIME" \
      "${flags[@]}" || return
    CREATED=1
  fi
}

# Waits until the queued resource is ACTIVE (its slice exists and is ready).
wait_active() {
  local state
  while true; do
    state="$(query ACTIVE gcloud compute tpus queued-resources describe \
      "$TPU" "${COMMON[@]}" --format='value(state.state)')"
    case "$state" in
      ACTIVE) log "queued resource $TPU is ACTIVE"; return 0 ;;
      FAILED|SUSPENDED) log "queued resource $TPU is $state"; return 1 ;;
      *) log "queued resource $TPU is ${state:-not visible yet}; waiting"
         sleep 60 ;;
    esac
  done
}

# READY, PREEMPTED, ... of the slice; empty if there is none. (A dry run
# pretends the slice exists once `create` has run.)
node_state() {
  local pretend=""
  if (( CREATED )); then pretend=READY; fi
  query "$pretend" gcloud compute tpus tpu-vm describe "$TPU" "${COMMON[@]}" \
    --format='value(state)'
}

delete() {
  if (( QUEUED )); then
    # --force deletes the slice first, then the queued resource.
    run gcloud compute tpus queued-resources delete "$TPU" "${COMMON[@]}" \
      --force --quiet
  else
    run gcloud compute tpus tpu-vm delete "$TPU" "${COMMON[@]}" --quiet
  fi
  CREATED=0
}

# The same command on every worker; output of all of them streams here.
on_all_workers() {
  run gcloud compute tpus tpu-vm ssh "$TPU" "${COMMON[@]}" --worker=all \
    --command="$1"
}

setup() {
  local tarball
  tarball="${TMPDIR:-/tmp}/odin_jax_code.tar.gz"
  # Tracked and untracked-but-not-ignored files: what `git status` shows,
  # so local edits travel without committing them.
  # (`|| return`: set -e does not apply inside `setup && train`.)
  if (( DRY_RUN )); then
    echo "+ (cd $(quote "$REPO") && git ls-files -co --exclude-standard | tar czf $(quote "$tarball") -T -)" >&2
  else
    (cd "$REPO" && git ls-files -co --exclude-standard | tar czf "$tarball" -T -) || return
  fi
  run gcloud compute tpus tpu-vm scp "$tarball" "$TPU:odin_jax_code.tar.gz" \
    "${COMMON[@]}" --worker=all || return
  on_all_workers "rm -rf ~/$REMOTE_DIR && mkdir -p ~/$REMOTE_DIR && tar xzf ~/odin_jax_code.tar.gz -C ~/$REMOTE_DIR && cd ~/$REMOTE_DIR && python3 -m pip install --quiet --upgrade pip && python3 -m pip install --quiet -e '.[tpu]'" || return
  if [[ -n "$GCSFUSE_BUCKET" ]]; then
    on_all_workers "$(gcsfuse_command)" || return
  fi
}

# Installs Cloud Storage FUSE and mounts the bucket read-only at the same
# path on every worker (the mask records are read with local file calls).
gcsfuse_command() {
  local mount="/gcs/$GCSFUSE_BUCKET"
  printf '%s' "set -e; if ! command -v gcsfuse >/dev/null; then" \
    " curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg | sudo tee /usr/share/keyrings/cloud.google.asc >/dev/null;" \
    " echo \"deb [signed-by=/usr/share/keyrings/cloud.google.asc] https://packages.cloud.google.com/apt gcsfuse-\$(lsb_release -c -s) main\" | sudo tee /etc/apt/sources.list.d/gcsfuse.list >/dev/null;" \
    " sudo apt-get update -qq && sudo apt-get install -y -qq fuse gcsfuse; fi;" \
    " sudo mkdir -p $mount && sudo chown \$(id -u):\$(id -g) $mount;" \
    " mountpoint -q $mount || gcsfuse --implicit-dirs -o ro $GCSFUSE_BUCKET $mount"
}

# The training command each worker runs. ODIN_JAX_DISTRIBUTED=1 makes every
# worker join the JAX distributed runtime (runtime.py), which multi-host
# checkpoints and the preemption sync need.
train_command() {
  local cmd flag
  cmd="set -o pipefail; cd ~/$REMOTE_DIR && ODIN_JAX_DISTRIBUTED=1 python3 -m odin_jax.main"
  cmd+=" $(quote "--config=$CONFIG") $(quote "--workdir=$WORKDIR")"
  for flag in "${TRAIN_FLAGS[@]+"${TRAIN_FLAGS[@]}"}"; do
    cmd+=" $(quote "$flag")"
  done
  echo "$cmd 2>&1 | tee -a ~/odin_jax_train.log"
}

train() {
  on_all_workers "$(train_command)"
}

# create -> setup -> train until training ends on a live slice; a preempted
# slice (training exits or the ssh drops, and the slice is no longer READY)
# is deleted and created again. Training restarts from the latest checkpoint.
resume() {
  local attempt rc state installed=0   # installed: setup done on this slice
  for (( attempt = 1; attempt <= MAX_ATTEMPTS; attempt++ )); do
    if (( attempt > 1 && ! DRY_RUN )); then sleep "$RETRY_SLEEP"; fi
    state="$(node_state)"
    if [[ "$state" != READY ]]; then
      if [[ -n "$state" ]]; then
        log "slice $TPU is $state: deleting it"
        delete || true
      fi
      installed=0
      create || { log "creating slice $TPU failed; trying again"; continue; }
    fi
    if (( ! installed )); then
      # A slice can be preempted while it is set up: then check it again.
      setup || { log "setting up slice $TPU failed; trying again"; continue; }
      installed=1
    fi
    log "attempt $attempt: training"
    rc=0
    train || rc=$?
    state="$(node_state)"
    if [[ "$state" == READY ]]; then
      if (( rc == 0 )); then log "training finished"; return 0; fi
      log "training failed (exit $rc) on a live slice: not retrying"
      return "$rc"
    fi
    log "slice $TPU is ${state:-gone} (preempted?): recreating it"
  done
  die "gave up after $MAX_ATTEMPTS attempts"
}

main() {
  parse_args "$@"
  check_args
  COMMON=("--zone=$ZONE")
  if [[ -n "$PROJECT" ]]; then COMMON+=("--project=$PROJECT"); fi
  case "$COMMAND" in
    create) create ;;
    setup) setup ;;
    train) train ;;
    delete) delete ;;
    status) node_state ;;
    run)
      create
      local rc=0
      { setup && train; } || rc=$?
      delete
      return "$rc" ;;
    resume)
      local rc=0
      resume || rc=$?
      delete
      return "$rc" ;;
  esac
}

main "$@"
