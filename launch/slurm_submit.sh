#!/usr/bin/env bash
# Builds and runs the sbatch command for launch/slurm_gpu.sbatch. `--help` for usage.
set -euo pipefail

LAUNCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(dirname "$LAUNCH_DIR")
# shellcheck source=launch/lib.sh
. "$LAUNCH_DIR/lib.sh"

usage() {
  cat <<'EOF'
Usage: launch/slurm_submit.sh --config FILE[:ARGS] --workdir DIR [FLAGS] [-- --config.a.b=V ...]

Submits launch/slurm_gpu.sbatch: NODES nodes, one task per node, each task using all GPUS
of its node; srun runs `python -m coatnet_jax.main --config=.. --workdir=.. [overrides]` on every
task and jax.distributed.initialize() finds the cluster from SLURM's variables.

Flags:
  --config FILE[:ARGS]   required, e.g. configs/in1k.py:variant=coatnet_0
  --workdir DIR          required; a directory every node sees (shared file system or gs://)
  --nodes N              default 1
  --gpus-per-node G      default 8
  --cpus-per-task C      CPUs for each node's task (input pipeline); default: the cluster's
  --partition P, --account A, --qos Q, --time T (e.g. 2-00:00:00), --job-name NAME (default coatnet)
  --venv DIR             virtualenv the tasks activate (default .venv in this checkout)
  --sbatch-arg ARG       passed to sbatch as is (repeatable), e.g. --sbatch-arg=--exclusive
  --dry-run              print the sbatch command, then the srun command the job runs; run nothing
  -h, --help             this text
  -- ARGS...             everything after -- goes to coatnet_jax.main unchanged

Logs: logs/slurm/NAME-JOBID.out (the batch script) and logs/slurm/NAME-JOBID/task-<t>.log (one
per node). A failed run names the failed task(s) in the .out file.

Example:
  launch/slurm_submit.sh --nodes 4 --gpus-per-node 8 --partition gpu --time 3-00:00:00 \
      --config configs/in1k.py:variant=coatnet_0 --workdir /shared/ckpt/c0 -- --config.accum_steps=2
EOF
}

nodes=1 gpus=8 cpus='' partition='' account='' qos='' time_limit='' job_name=coatnet
venv="$REPO_ROOT/.venv" config='' workdir=''
sbatch_extra=() train_extra=()
while [[ $# -gt 0 ]]; do
  case $1 in
    -h | --help) usage; exit 0 ;;
    --dry-run) DRY_RUN=1 ;;
    --config) need_value "$@"; config=$2; shift ;;
    --workdir) need_value "$@"; workdir=$2; shift ;;
    --nodes) need_value "$@"; nodes=$2; shift ;;
    --gpus-per-node) need_value "$@"; gpus=$2; shift ;;
    --cpus-per-task) need_value "$@"; cpus=$2; shift ;;
    --partition) need_value "$@"; partition=$2; shift ;;
    --account) need_value "$@"; account=$2; shift ;;
    --qos) need_value "$@"; qos=$2; shift ;;
    --time) need_value "$@"; time_limit=$2; shift ;;
    --job-name) need_value "$@"; job_name=$2; shift ;;
    --venv) need_value "$@"; venv=$2; shift ;;
    --sbatch-arg=*) sbatch_extra+=("${1#--sbatch-arg=}") ;;
    --sbatch-arg) [[ $# -ge 2 ]] || die "--sbatch-arg needs a value"; sbatch_extra+=("$2"); shift ;;
    --) shift; train_extra=("$@"); break ;;
    *) die "unknown flag '$1' (see --help)" ;;
  esac
  shift
done
require --config "$config"
require --workdir "$workdir"
for pair in "--nodes:$nodes" "--gpus-per-node:$gpus" "--cpus-per-task:${cpus:-1}"; do
  [[ ${pair#*:} =~ ^[1-9][0-9]*$ ]] || die "${pair%%:*} must be a positive integer, got '${pair#*:}'"
done
[[ $job_name =~ ^[A-Za-z0-9_.-]+$ ]] || die "--job-name may hold only letters, digits, _ . -"

sbatch=(sbatch --job-name="$job_name" --nodes="$nodes" --ntasks-per-node=1
  --gpus-per-node="$gpus" --chdir="$REPO_ROOT" --output="logs/slurm/%x-%j.out"
  "--export=ALL,COATNET_VENV=$venv")
[[ -n $cpus ]] && sbatch+=(--cpus-per-task="$cpus")
[[ -n $partition ]] && sbatch+=(--partition="$partition")
[[ -n $account ]] && sbatch+=(--account="$account")
[[ -n $qos ]] && sbatch+=(--qos="$qos")
[[ -n $time_limit ]] && sbatch+=(--time="$time_limit")
train=(--config="$config" --workdir="$workdir" ${train_extra[@]+"${train_extra[@]}"})

sbatch+=(${sbatch_extra[@]+"${sbatch_extra[@]}"} "$LAUNCH_DIR/slurm_gpu.sbatch" "${train[@]}")

if [[ $DRY_RUN == 1 ]]; then
  run "${sbatch[@]}"
  # What the batch script then runs on the allocation (JOBID is SLURM's job id).
  SLURM_JOB_NAME=$job_name SLURM_NNODES=$nodes \
    "$LAUNCH_DIR/slurm_gpu.sbatch" --dry-run "${train[@]}"
  exit 0
fi
mkdir -p "$REPO_ROOT/logs/slurm"
run "${sbatch[@]}"
