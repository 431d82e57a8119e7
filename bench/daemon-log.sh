# Sourced by the benchmarks that run `asd daemon` in the background.
# wait_log LOG PID PATTERN COUNT: waits (up to 60 s) until LOG has COUNT lines matching PATTERN;
# fails, showing the log, if the daemon PID ended or the wait timed out.
wait_log() {
  local log=$1 pid=$2 pattern=$3 count=$4
  for _ in $(seq 1 1200); do
    [ "$(grep -c "$pattern" "$log" || true)" -ge "$count" ] && return 0
    kill -0 "$pid" 2>/dev/null || { cat "$log" >&2; exit 1; }
    sleep 0.05
  done
  echo "daemon: timed out waiting for '$pattern'" >&2; cat "$log" >&2; exit 1
}
