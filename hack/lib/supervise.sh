# shellcheck shell=bash
# Sourced by hack/dev-cluster and hack/e2e-cluster: one server process of the test kit
# (`python -P -m kubetune_testkit.… serve`), started in the background, waited for and stopped
# the same way by both.
#
# The caller sets NAME (for messages), ROOT (the checkout), DIR (the state folder) and PYTHON
# before sourcing this. State: $DIR/serve.pid, $DIR/serve.log, and $DIR/ready, which the
# server writes once it is up. Python always runs with -P from the checkout's root: its
# operator/ folder would otherwise shadow the standard library's operator module.

: "${NAME:?}" "${ROOT:?}" "${DIR:?}" "${PYTHON:?}"

PID_FILE=$DIR/serve.pid
LOG_FILE=$DIR/serve.log
READY_FILE=$DIR/ready
# Seconds between SIGTERM and SIGKILL on a stop: the e2e node stops its pods, kubelet,
# containerd and control plane in that time.
STOP_TIMEOUT=60

# The comment block at the top of the calling script, without its first line.
usage() {
  awk 'NR == 1 { next } /^#/ { sub(/^# ?/, ""); print; next } { exit }' "$0" >&2
}

# The server's pid, when one runs.
running_pid() {
  local pid
  [[ -f "$PID_FILE" ]] || return 1
  pid=$(<"$PID_FILE")
  [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null || return 1
  echo "$pid"
}

# Fails, saying what to do, unless $PYTHON exists and has the test kit (the dev extra).
require_testkit() {
  if [[ ! -x "$PYTHON" ]]; then
    echo "$NAME: $PYTHON not found; run hack/setup --test-tools or set PYTHON" >&2
    exit 1
  fi
  if ! "$PYTHON" -P -c 'import kubetune_testkit' 2>/dev/null; then
    echo "$NAME: $PYTHON has no kubetune_testkit (the dev extra); run hack/setup --test-tools" >&2
    exit 1
  fi
}

# Returns 0, having printed KUBECONFIG, when the server is already up; 1 when none runs; exits
# when one is still starting or stuck.
already_up() {
  local kubeconfig=$1 pid
  pid=$(running_pid) || return 1
  if [[ -f "$READY_FILE" ]]; then
    echo "$NAME: already running (pid $pid)" >&2
    echo "$kubeconfig"
    return 0
  fi
  echo "$NAME: a previous start (pid $pid) is still starting or stuck; run \`$0 down\` first" >&2
  exit 1
}

# python -P -m MODULE ARGS... in the foreground, from the checkout's root.
run_testkit() {
  (cd "$ROOT" && "$PYTHON" -P -m "$@")
}

# python -P -m MODULE ARGS... in the background, detached from this shell, into $LOG_FILE.
start_server() {
  rm -f "$READY_FILE"
  (cd "$ROOT" && exec nohup "$PYTHON" -P -m "$@" >"$LOG_FILE" 2>&1 </dev/null) &
  echo $! >"$PID_FILE"
}

# Waits up to TIMEOUT seconds for the ready file. Returns 1, having said why, when the server
# (WHAT, for the message) exits first or the time runs out.
wait_ready() {
  local timeout=$1 what=$2 deadline=$((SECONDS + $1))
  until [[ -f "$READY_FILE" ]]; do
    if ! running_pid >/dev/null; then
      echo "$NAME: $what failed to start; $LOG_FILE says:" >&2
      tail -n 60 "$LOG_FILE" >&2 || true
      return 1
    fi
    if ((SECONDS > deadline)); then
      echo "$NAME: not ready after ${timeout}s; see $LOG_FILE and $DIR/*.log" >&2
      return 1
    fi
    sleep 0.5
  done
}

# SIGTERM, then SIGKILL after $STOP_TIMEOUT seconds; forgets the pid and ready files.
# Returns 1 when no server ran.
stop_server() {
  local pid deadline
  if ! pid=$(running_pid); then
    rm -f "$PID_FILE" "$READY_FILE"
    return 1
  fi
  kill -TERM "$pid" 2>/dev/null || true
  deadline=$((SECONDS + STOP_TIMEOUT))
  while kill -0 "$pid" 2>/dev/null && ((SECONDS < deadline)); do
    sleep 0.5
  done
  if kill -0 "$pid" 2>/dev/null; then
    echo "$NAME: pid $pid did not stop in ${STOP_TIMEOUT}s; killing it" >&2
    kill -KILL "$pid" 2>/dev/null || true
  fi
  rm -f "$PID_FILE" "$READY_FILE"
}

# Says whether the server runs; returns 1 when it does not.
print_status() {
  local kubeconfig=$1 pid
  if pid=$(running_pid) && [[ -f "$READY_FILE" ]]; then
    echo "$NAME: running (pid $pid), kubeconfig $kubeconfig"
  else
    echo "$NAME: not running"
    return 1
  fi
}
