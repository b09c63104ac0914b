#!/usr/bin/env bash
# Cloud TPU VM slices for coatnet_jax: create (queued resources), setup, run, logs, delete.
# Run `launch/tpu_vm.sh --help` for usage; every subcommand takes --dry-run.
set -euo pipefail

LAUNCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(dirname "$LAUNCH_DIR")
# shellcheck source=launch/lib.sh
. "$LAUNCH_DIR/lib.sh"

usage() {
  cat <<'EOF'
Usage: launch/tpu_vm.sh SUBCOMMAND --name NAME --zone ZONE --project PROJECT [FLAGS] [--dry-run]

Subcommands:
  create   Request a TPU VM slice through a queued resource (the queued resource is named NAME too).
             --accelerator-type TYPE   required, e.g. v4-32, v5p-64, v5litepod-16, v6e-64
             --runtime-version VER     default from the TPU generation (v2/v3/v4: tpu-ubuntu2204-base,
                                       v5e: v2-alpha-tpuv5-lite, v5p: v2-alpha-tpuv5, v6e: v2-alpha-tpuv6e)
             --spot | --reserved       capacity type (default: on-demand quota)
             --wait                    poll until the slice is ACTIVE (fails on FAILED/SUSPENDED)
  setup    On every worker: copy the code, make a venv, pip install -r requirements.txt "jax[tpu]==V"
           (V is the jax pin in requirements.txt). Code: a tarball of this checkout (tracked and
           untracked files, without .git/.venv/logs/workdirs), or --git-ref REF [--repo-url URL]
           to clone (URL defaults to this checkout's origin).
             --python PY               interpreter for the venv (default python3.11; installed with
                                       apt if the image lacks it)
  run      Run `python -m coatnet_jax.main` on all workers (--worker=all), after clearing stale TPU
           users (processes holding /dev/accel* or /dev/vfio/*, and /tmp/libtpu_lockfile).
             --config FILE[:ARGS]      required, e.g. configs/in1k.py:variant=coatnet_0
             --workdir DIR             required; use gs://... on multi-host slices
             -- --config.a.b=V ...     everything after -- goes to coatnet_jax.main unchanged
           Each worker's output goes to logs/NAME/run-<UTC time>/worker-<i>.log (logs/NAME/latest
           points at the newest run); the terminal shows worker 0. If any worker fails, the script
           names it, points to its log, shows the log's tail and exits 1.
  logs     Follow a run's logs on this machine: tail -F logs/NAME/latest/worker-<i>.log.
             --worker I|all            default 0
  delete   Delete the queued resource and its slice (--force --quiet).

Common flags:
  --name NAME          TPU VM (node) and queued-resource name (required)
  --zone ZONE          e.g. us-central2-b (required except for logs)
  --project PROJECT    GCP project id (required except for logs)
  --num-workers N      hosts in the slice; by default `gcloud ... tpu-vm describe` counts them, and
                       --dry-run derives them from --accelerator-type (see "Hosts" below)
  --remote-dir DIR     code directory on the workers, relative to $HOME (default coatnet_jax)
  --venv DIR           venv on the workers, relative to $HOME (default .venvs/coatnet_jax)
  --dry-run            print every command, one per line, and run nothing
  -h, --help           this text

Hosts (TPU VM workers) per accelerator type, used only when gcloud is not asked:
  v2-N, v3-N, v4-N, v5p-N : N counts TensorCores, 8 per host (4 chips)  -> N/8 hosts (v4-32: 4)
  v5litepod-N, v6e-N      : N counts chips; N <= 8 is one host, larger slices are made of 4-chip
                            hosts -> N/4 hosts (v5litepod-16: 4, v6e-256: 64)

Environment (for tests): COATNET_LAUNCH_REMOTE_EXEC=PROGRAM replaces
  `gcloud compute tpus tpu-vm ssh NAME --zone=.. --project=.. --worker=W --command=CMD` with
  `PROGRAM W CMD`; PROGRAM must behave like the ssh (run CMD with bash on each worker W names, with
  TPU_WORKER_ID set to the worker index).

Examples:
  launch/tpu_vm.sh create --name c0 --zone us-central2-b --project my-proj --accelerator-type v4-32 --spot
  launch/tpu_vm.sh setup  --name c0 --zone us-central2-b --project my-proj
  launch/tpu_vm.sh run    --name c0 --zone us-central2-b --project my-proj \
      --config configs/in1k.py:variant=coatnet_0 --workdir gs://BUCKET/c0 -- --config.accum_steps=2
  launch/tpu_vm.sh delete --name c0 --zone us-central2-b --project my-proj
EOF
}

# Runs on each worker: prefix every output line with "[worker I] " (so one --worker=all stream
# can be split into one log per worker here), then print the status marker. I comes from
# TPU_WORKER_ID or the metadata server (the attribute jax's Cloud TPU cluster detection reads).
# shellcheck disable=SC2016  # Expanded on the worker.
WORKER_WRAPPER='id=${TPU_WORKER_ID:-$(curl -sf -H Metadata-Flavor:Google http://metadata.google.internal/computeMetadata/v1/instance/attributes/agent-worker-number)}; id=${id:-unknown}; "$@" 2>&1 | sed -u "s/^/[worker $id] /"; rc=${PIPESTATUS[0]}; echo "[worker $id] '"$STATUS_MARKER"' $rc"; exit "$rc"'

# Kills whatever still holds the TPU (a crashed or interrupted earlier run) and drops libtpu's lock.
# shellcheck disable=SC2016
CLEAR_STALE='pids=$(sudo lsof -t -w /dev/accel* /dev/vfio/* 2>/dev/null | sort -u | tr "\n" " "); if [ -n "$pids" ]; then echo "$(hostname): killing stale TPU users: $pids"; sudo kill -9 $pids; sleep 2; fi; sudo rm -f /tmp/libtpu_lockfile'

# Activates the venv ($1), enters the code directory ($2), then runs the rest.
# shellcheck disable=SC2016
ENTER_AND_RUN='. "$1/bin/activate" && cd "$2" && shift 2 && PYTHONUNBUFFERED=1 exec "$@"'

subcommand=${1:-}
case $subcommand in
  -h | --help) usage; exit 0 ;;
  create | setup | run | logs | delete) shift ;;
  '') die "missing subcommand: create, setup, run, logs or delete (see --help)" ;;
  *) die "unknown subcommand '$subcommand': use create, setup, run, logs or delete (see --help)" ;;
esac

name='' zone='' project='' accelerator='' runtime='' capacity='' wait_active=0 num_workers=''
git_ref='' repo_url='' python=python3.11 remote_dir=coatnet_jax venv=.venvs/coatnet_jax
config='' workdir='' log_worker=0
train_extra=()
while [[ $# -gt 0 ]]; do
  case $1 in
    -h | --help) usage; exit 0 ;;
    --dry-run) DRY_RUN=1 ;;
    --name) need_value "$@"; name=$2; shift ;;
    --zone) need_value "$@"; zone=$2; shift ;;
    --project) need_value "$@"; project=$2; shift ;;
    --accelerator-type) need_value "$@"; accelerator=$2; shift ;;
    --runtime-version) need_value "$@"; runtime=$2; shift ;;
    --spot) capacity=--spot ;;
    --reserved) capacity=--reserved ;;
    --wait) wait_active=1 ;;
    --num-workers) need_value "$@"; num_workers=$2; shift ;;
    --git-ref) need_value "$@"; git_ref=$2; shift ;;
    --repo-url) need_value "$@"; repo_url=$2; shift ;;
    --python) need_value "$@"; python=$2; shift ;;
    --remote-dir) need_value "$@"; remote_dir=$2; shift ;;
    --venv) need_value "$@"; venv=$2; shift ;;
    --config) need_value "$@"; config=$2; shift ;;
    --workdir) need_value "$@"; workdir=$2; shift ;;
    --worker) need_value "$@"; log_worker=$2; shift ;;
    --) shift; train_extra=("$@"); break ;;
    *) die "unknown flag '$1' for $subcommand (see --help)" ;;
  esac
  shift
done

require --name "$name"
if [[ $subcommand != run && ${#train_extra[@]} -gt 0 ]]; then
  die "arguments after -- go to coatnet_jax.main and only 'run' takes them"
fi
if [[ $subcommand != logs ]]; then
  require --zone "$zone"
  require --project "$project"
fi
if [[ -n $num_workers && ! $num_workers =~ ^[1-9][0-9]*$ ]]; then
  die "--num-workers must be a positive integer, got '$num_workers'"
fi
where=(--zone="$zone" --project="$project")
log_root="logs/$name"

# Hosts in a slice of accelerator type $1 (rule in --help).
hosts_for_type() {
  local size=${1##*-}
  [[ $size =~ ^[0-9]+$ ]] || die "cannot read the size of accelerator type '$1'; pass --num-workers"
  case $1 in
    v2-* | v3-* | v4-* | v5p-*) echo $(((size + 7) / 8)) ;;
    v5litepod-* | v5e-* | v6e-*) if ((size <= 8)); then echo 1; else echo $((size / 4)); fi ;;
    *) die "no host rule for accelerator type '$1'; pass --num-workers" ;;
  esac
}

runtime_for_type() {
  case $1 in
    v2-* | v3-* | v4-*) echo tpu-ubuntu2204-base ;;
    v5litepod-* | v5e-*) echo v2-alpha-tpuv5-lite ;;
    v5p-*) echo v2-alpha-tpuv5 ;;
    v6e-*) echo v2-alpha-tpuv6e ;;
    *) die "no default runtime for accelerator type '$1'; pass --runtime-version" ;;
  esac
}

# Sets num_workers: --num-workers, else gcloud describe (or, under --dry-run, the type's rule).
resolve_num_workers() {
  [[ -n $num_workers ]] && return
  local endpoints
  if [[ $DRY_RUN == 1 ]]; then
    [[ -n $accelerator ]] || die "--dry-run needs --num-workers N or --accelerator-type TYPE"
    num_workers=$(hosts_for_type "$accelerator")
    run gcloud compute tpus tpu-vm describe "$name" "${where[@]}" \
      '--format=value(networkEndpoints[].ipAddress)'
  else
    endpoints=$(gcloud compute tpus tpu-vm describe "$name" "${where[@]}" \
      '--format=value(networkEndpoints[].ipAddress)')
    num_workers=$(tr ';' '\n' <<<"$endpoints" | grep -c .) || true
    [[ $num_workers -gt 0 ]] || die "gcloud describe found no workers for TPU VM '$name'" 1
  fi
  info "$num_workers worker(s)"
}

# remote_exec WORKER CMD: one gcloud ssh (or the test stand-in) running CMD on WORKER (0.. or all).
remote_exec() {
  if [[ -n ${COATNET_LAUNCH_REMOTE_EXEC:-} ]]; then
    run "$COATNET_LAUNCH_REMOTE_EXEC" "$1" "$2"
  else
    run gcloud compute tpus tpu-vm ssh "$name" "${where[@]}" --worker="$1" --command="$2"
  fi
}

# Shows one worker's lines (worker 0) and every status and gcloud line; writes each worker's lines,
# without the "[worker I] " prefix, to DIR/worker-I.log and anything unprefixed to DIR/gcloud.log.
split_worker_logs() {
  awk -v dir="$1" '
    match($0, /^\[worker [0-9a-z]+\] /) {
      id = substr($0, 9, RLENGTH - 10); line = substr($0, RLENGTH + 1); f = dir "/worker-" id ".log"
      print line >> f; fflush(f)
      if (id == "0" || index(line, "'"$STATUS_MARKER"'") == 1) { print; fflush() }
      next
    }
    { f = dir "/gcloud.log"; print >> f; fflush(f); print; fflush() }'
}

# on_all_workers WHAT CMD...: runs the argv CMD on every worker at once (--worker=all), one log per
# worker under logs/NAME/WHAT-<time>/; names the workers that failed and returns 1 if any did.
on_all_workers() {
  local what=$1 command
  shift
  command=$(quote bash -c "$WORKER_WRAPPER" _ "$@")
  if [[ $DRY_RUN == 1 ]]; then
    remote_exec all "$command"
    return
  fi
  local dir rc=0
  dir="$log_root/$what-$(date -u +%Y%m%dT%H%M%SZ)"
  mkdir -p "$dir"
  local link=latest
  [[ $what == run ]] || link=latest-$what
  ln -sfn "$(basename "$dir")" "$log_root/$link"
  info "$what: one log per worker in $dir/worker-<i>.log"
  remote_exec all "$command" 2>&1 | split_worker_logs "$dir" || rc=$?
  if ! check_status_logs worker "$num_workers" "$dir/worker-%d.log"; then
    return 1
  fi
  if [[ $rc != 0 ]]; then
    echo "${LAUNCH_PROG}: error: every worker reported status 0 but the ssh exited $rc; see $dir/gcloud.log" >&2
    return 1
  fi
  info "$what: all $num_workers worker(s) succeeded"
}

cmd_create() {
  require --accelerator-type "$accelerator"
  [[ -n $runtime ]] || runtime=$(runtime_for_type "$accelerator")
  local extra=()
  [[ -n $capacity ]] && extra=("$capacity")
  run gcloud compute tpus queued-resources create "$name" --node-id="$name" "${where[@]}" \
    --accelerator-type="$accelerator" --runtime-version="$runtime" ${extra[@]+"${extra[@]}"}
  ((wait_active)) || return 0
  local state describe=(gcloud compute tpus queued-resources describe "$name" "${where[@]}"
    '--format=value(state.state)')
  if [[ $DRY_RUN == 1 ]]; then
    run "${describe[@]}"
    return
  fi
  while :; do
    state=$("${describe[@]}")
    info "queued resource $name: $state"
    case $state in
      ACTIVE) return 0 ;;
      FAILED | SUSPENDED) die "queued resource $name is $state (gcloud compute tpus queued-resources describe $name)" 1 ;;
    esac
    sleep 30
  done
}

cmd_setup() {
  resolve_num_workers
  local jax_version steps=() src quoted_dir quoted_venv
  jax_version=$(sed -n 's/^jax==\([^ #]*\).*/\1/p' "$REPO_ROOT/requirements.txt")
  [[ $jax_version =~ ^[0-9][0-9a-z.]*$ ]] ||
    die "no 'jax==VERSION' pin in $REPO_ROOT/requirements.txt" 1
  quoted_dir=$(quote "$remote_dir")
  quoted_venv=$(quote "$venv")
  if [[ -n $git_ref ]]; then
    if [[ -z $repo_url ]]; then
      repo_url=$(git -C "$REPO_ROOT" remote get-url origin 2>/dev/null) ||
        die "--git-ref needs --repo-url (this checkout has no origin remote)"
    fi
    src="rm -rf $quoted_dir && git clone -q $(quote "$repo_url") $quoted_dir && git -C $quoted_dir checkout -q $(quote "$git_ref")"
  else
    local tarball remote_tarball=coatnet_jax.tar.gz
    tarball="${TMPDIR:-/tmp}/coatnet_jax-$name.tar.gz"
    run tar -czf "$tarball" -C "$REPO_ROOT" --exclude=./.git --exclude=./.venv --exclude=./logs \
      --exclude=./workdirs --exclude=__pycache__ --exclude=.pytest_cache --exclude='*.egg-info' .
    run gcloud compute tpus tpu-vm scp "$tarball" "$name:$remote_tarball" --worker=all "${where[@]}"
    src="rm -rf $quoted_dir && mkdir -p $quoted_dir && tar -xzf $remote_tarball -C $quoted_dir"
  fi
  local py
  py=$(quote "$python")
  steps=(
    "set -e"
    "command -v $py >/dev/null || { sudo apt-get -qq update && sudo DEBIAN_FRONTEND=noninteractive apt-get -qq install -y $py $py-venv; }"
    "$src"
    "{ test -x $quoted_venv/bin/python || $py -m venv $quoted_venv; }"
    ". $quoted_venv/bin/activate"
    "cd $quoted_dir"
    "pip install -q --upgrade pip"
    "pip install -q -r requirements.txt \"jax[tpu]==$jax_version\""
    "python -c \"import jax; print(jax.__version__)\""
  )
  local joined='' step
  for step in "${steps[@]}"; do joined+="${joined:+; }$step"; done
  on_all_workers setup bash -c "$joined" || die "setup failed on the worker(s) named above" 1
}

cmd_run() {
  require --config "$config"
  require --workdir "$workdir"
  resolve_num_workers
  if [[ $num_workers -gt 1 && $workdir != gs://* ]]; then
    warn "--workdir '$workdir' is not a gs:// path: each of the $num_workers workers sees its own disk"
  fi
  remote_exec all "bash -c $(quote "$CLEAR_STALE")" ||
    die "could not clear stale TPU users on every worker" 1
  on_all_workers run bash -c "$ENTER_AND_RUN" _ "$venv" "$remote_dir" \
    python -m coatnet_jax.main --config="$config" --workdir="$workdir" \
    ${train_extra[@]+"${train_extra[@]}"} || die "training failed on the worker(s) named above" 1
}

cmd_logs() {
  local dir="$log_root/latest"
  if [[ $log_worker == all ]]; then
    # The glob is expanded at run time; under --dry-run it is printed as is.
    if [[ $DRY_RUN == 1 ]]; then
      run tail -n 50 -F "$dir/worker-*.log"
    else
      [[ -d $dir ]] || die "no logs at $dir: run 'launch/tpu_vm.sh run' from this directory first" 1
      run tail -n 50 -F "$dir"/worker-*.log
    fi
  else
    [[ $log_worker =~ ^[0-9]+$ ]] || die "--worker must be an index or 'all', got '$log_worker'"
    [[ $DRY_RUN == 1 || -d $dir ]] ||
      die "no logs at $dir: run 'launch/tpu_vm.sh run' from this directory first" 1
    run tail -n 50 -F "$dir/worker-$log_worker.log"
  fi
}

cmd_delete() {
  run gcloud compute tpus queued-resources delete "$name" "${where[@]}" --force --quiet
}

"cmd_$subcommand"
