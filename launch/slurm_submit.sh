#!/usr/bin/env bash
# Submit launch/slurm.sbatch: N nodes x G GPUs, one training process per GPU.
#
#   launch/slurm_submit.sh [options] CONFIG WORKDIR [-- FLAGS...]
#
# Options (--name=value or --name value)
#   --nodes N           nodes (default 1)
#   --gpus-per-node G   GPUs, hence processes, per node (default 8)
#   --cpus-per-gpu C    CPU cores per process, for tf.data (default 12)
#   --time T            time limit per job, e.g. 24:00:00 (the job requeues
#                       itself at the limit and resumes; default 24:00:00)
#   --partition P, --account A, --qos Q   passed to sbatch
#   --venv DIR          Python environment with odin_jax[cuda] (default: the
#                       active one)
#   --dry-run           print the sbatch and srun commands, submit nothing
#
# e.g. launch/slurm_submit.sh --nodes=4 --partition=gpu \
#        configs/detcon_b.py /shared/runs/detcon_b -- --config.model.dtype=bfloat16
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
NODES=1
GPUS=8
CPUS=12
TIME="24:00:00"
PARTITION=""
ACCOUNT=""
QOS=""
VENV="${VIRTUAL_ENV:-}"
DRY_RUN=0
POSITIONAL=()
FLAGS=()

die() { echo "slurm_submit.sh: $*" >&2; exit 2; }
# The comment block at the top of this file.
usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "${BASH_SOURCE[0]}"; }

# shellcheck source=launch/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

# Prints a command as it would be typed.
show() { command_line "$@"; }

while (( $# )); do
  arg="$1"
  value=""
  case "$arg" in
    --) shift; FLAGS=("$@"); break ;;
    --*=*) value="${arg#*=}"; arg="${arg%%=*}" ;;
  esac
  case "$arg" in
    --dry-run) DRY_RUN=1 ;;
    --nodes|--gpus-per-node|--cpus-per-gpu|--time|--partition|--account|\
    --qos|--venv)
      if [[ -z "$value" ]]; then
        (( $# >= 2 )) || die "$arg needs a value"
        value="$2"
        shift
      fi
      case "$arg" in
        --nodes) NODES="$value" ;;
        --gpus-per-node) GPUS="$value" ;;
        --cpus-per-gpu) CPUS="$value" ;;
        --time) TIME="$value" ;;
        --partition) PARTITION="$value" ;;
        --account) ACCOUNT="$value" ;;
        --qos) QOS="$value" ;;
        --venv) VENV="$value" ;;
      esac ;;
    -h|--help) usage; exit 0 ;;
    -*) die "unknown option $arg (see --help)" ;;
    *) POSITIONAL+=("$arg") ;;
  esac
  shift
done

(( ${#POSITIONAL[@]} == 2 )) || die "expected CONFIG WORKDIR (see --help)"
CONFIG="${POSITIONAL[0]}"
WORKDIR="${POSITIONAL[1]}"
for n in "$NODES" "$GPUS" "$CPUS"; do
  [[ "$n" =~ ^[1-9][0-9]*$ ]] || die "--nodes/--gpus-per-node/--cpus-per-gpu must be >= 1, got $n"
done
if [[ "$WORKDIR" != /* && "$WORKDIR" != gs://* ]]; then
  die "WORKDIR must be an absolute path on a shared filesystem (or gs://...), got $WORKDIR"
fi

# Command-line options override the #SBATCH defaults in the script.
SBATCH=(sbatch "--nodes=$NODES" "--ntasks-per-node=$GPUS"
        "--gpus-per-node=$GPUS" "--cpus-per-task=$CPUS" "--time=$TIME")
if [[ -n "$PARTITION" ]]; then SBATCH+=("--partition=$PARTITION"); fi
if [[ -n "$ACCOUNT" ]]; then SBATCH+=("--account=$ACCOUNT"); fi
if [[ -n "$QOS" ]]; then SBATCH+=("--qos=$QOS"); fi
if [[ -n "$VENV" ]]; then SBATCH+=("--export=ALL,ODIN_JAX_VENV=$VENV"); fi
SCRIPT_ARGS=("$CONFIG" "$WORKDIR")
if (( ${#FLAGS[@]} )); then SCRIPT_ARGS+=(-- "${FLAGS[@]}"); fi
SBATCH+=("$HERE/slurm.sbatch" "${SCRIPT_ARGS[@]}")

if (( DRY_RUN )); then
  show "${SBATCH[@]}"
  echo "# each job then runs, on $((NODES * GPUS)) processes:"
  DRY_RUN=1 bash "$HERE/slurm.sbatch" "${SCRIPT_ARGS[@]}"
  exit 0
fi
"${SBATCH[@]}"
