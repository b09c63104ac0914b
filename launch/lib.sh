# shellcheck shell=bash
# Shared helpers for the launch scripts; sourced, never run. Bash 3.2+ (macOS) compatible.
#
# Conventions every script follows:
#   * --dry-run prints each command it would run, one per line, quoted so that `sh` (or Python's
#     shlex.split) reads back the exact argv, and runs nothing.
#   * A usage error is one line on stderr, "SCRIPT: error: ...", and exit status 2.
#   * Every training process ends its log with "coatnet_jax launch: exit status N" (see
#     STATUS_MARKER), so the launcher can name the worker / task that failed from its log alone.

LAUNCH_PROG=${LAUNCH_PROG:-$(basename "$0")}
DRY_RUN=${DRY_RUN:-0}
STATUS_MARKER='coatnet_jax launch: exit status'

die() {  # One-line error, exit 2 (usage) or the given status.
  echo "${LAUNCH_PROG}: error: $1" >&2
  exit "${2:-2}"
}

warn() { echo "${LAUNCH_PROG}: warning: $*" >&2; }
info() { echo "${LAUNCH_PROG}: $*" >&2; }

# Prints its arguments as one shell-quoted line (the same quoting as Python's shlex.quote).
quote() {
  local out='' arg safe='^[A-Za-z0-9_@%+=:,./-]+$' q="'\\''"
  for arg in "$@"; do
    if [[ ! $arg =~ $safe ]]; then
      arg="'${arg//\'/$q}'"
    fi
    out+="${out:+ }${arg}"
  done
  printf '%s\n' "$out"
}

# Runs a command, or only prints it under --dry-run.
run() {
  if [[ $DRY_RUN == 1 ]]; then
    quote "$@"
  else
    "$@"
  fi
}

# Reads the value of flag $1 from "$2" (the next argument); fails if it is missing.
need_value() {
  [[ $# -ge 2 && -n $2 && $2 != --* ]] || die "$1 needs a value"
}

require() {  # require FLAG VALUE: fail with one line if a required flag was not given.
  [[ -n $2 ]] || die "missing required flag $1 (see --help)"
}

# Wraps "$@" so its output (stdout and stderr) ends with the status marker line.
# Used as: bash -c "$STATUS_WRAPPER" _ CMD ARGS...
# shellcheck disable=SC2016,SC2034  # Expanded by the inner bash; used by slurm_gpu.sbatch.
STATUS_WRAPPER='"$@" 2>&1; rc=$?; echo "coatnet_jax launch: exit status $rc"; exit "$rc"'

# check_status_logs NOUN N LOG_PATTERN: reads the status marker from each of N logs (LOG_PATTERN
# has %d for the index). Prints one line per failed NOUN naming its log, then the tail of that log,
# and returns 1 if any NOUN failed or never reported a status.
check_status_logs() {
  local noun=$1 n=$2 pattern=$3 i log status failed='' silent=''
  for ((i = 0; i < n; i++)); do
    # shellcheck disable=SC2059  # The pattern is ours and holds exactly one %d.
    log=$(printf "$pattern" "$i")
    status=''
    if [[ -f $log ]]; then
      status=$(sed -n "s/^${STATUS_MARKER} \([0-9][0-9]*\)\$/\1/p" "$log" | tail -n 1)
    fi
    if [[ -z $status ]]; then
      echo "${LAUNCH_PROG}: error: ${noun} ${i} reported no exit status (killed, lost connection or" \
        "never started); log: ${log}" >&2
      silent+="${silent:+ }${i}"
    elif [[ $status != 0 ]]; then
      echo "${LAUNCH_PROG}: error: ${noun} ${i} failed with exit status ${status}; log: ${log}" >&2
      failed+="${failed:+ }${i}"
    else
      continue
    fi
    if [[ -f $log ]]; then
      tail -n 15 "$log" | sed "s/^/  [${noun} ${i}] /" >&2
    fi
  done
  if [[ -n $failed$silent ]]; then
    echo "${LAUNCH_PROG}: error: failed ${noun}(s): ${failed:-none}; without an exit status:" \
      "${silent:-none}" >&2
    return 1
  fi
}
