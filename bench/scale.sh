#!/usr/bin/env bash
# Benchmark at scale (not a test): on one generated tree of many small files (default 200,000
# files of mixed sizes, ~1 GB, in a 3-level fan-out so that no directory holds more than a few
# hundred entries), for the copy mode (the config of copy-mode.sh) and the overlay mode
# (USE_OVERLAYFS=yes, as overlay-mode.sh): seconds and peak RSS of `asd` for sync, resync after
# appending to 10 files spread over the tree, resync with nothing changed, and unsync (after 10
# more changes). Cold page cache before each step unless the row says warm. Peak RSS is
# getrusage(RUSAGE_CHILDREN).ru_maxrss of a Python parent around the one asd command, so it
# covers any child asd waits for. Private mount namespace, as root.
#   bench/scale.sh [FILES] [TOTAL_MB]        (default 200000 files, ~1024 MB)
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/daemon-log.sh
export PATH="$HOME/.cargo/bin:/root/.cargo/bin:$PATH"
FILES=${1:-200000}
TOTAL_MB=${2:-1024}
[ "$(id -u)" -eq 0 ] || { echo "run as root (it mounts tmpfs in a private namespace)" >&2; exit 1; }
if [ -z "${ASD_BENCH_INSIDE:-}" ]; then
  cargo build --quiet --release -p asd-user
  exec unshare -m --propagation private env ASD_BENCH_INSIDE=1 "$0" "$@"
fi
ASD=$PWD/target/release/asd
W=$(mktemp -d /var/tmp/asd-sbench-XXXXXX)
export ASDCONF="$W/asd.conf" ASD_RUNTIME_DIR="$W/run" NO_COLOR=1 ASD_LOG=warn
trap 'cd /; "$ASD" unsync >/dev/null 2>&1 || true; umount -R "$W/t" 2>/dev/null || true
      umount -R "$W/vol" 2>/dev/null || true; rm -rf "$W"' EXIT
mkdir -p "$W/vol" "$W/t"
mount -t tmpfs -o mode=1777 sbench "$W/vol"

echo "building $FILES files, ~$TOTAL_MB MB (mixed sizes) in $W/t ..."
python3 - "$W/t" "$FILES" "$TOTAL_MB" "$W/changes" <<'PY'
import math, os, random, sys, time
root, n, total, changes = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]) << 20, sys.argv[4]
random.seed(42)
# Mixed small sizes: most around 1 KB, a quarter around 8 KB, a few around 60 KB, scaled to total.
weights = [random.choice([1] * 70 + [8] * 25 + [60] * 5) for _ in range(n)]
scale = total / sum(weights)
# 3-level fan-out, ~100 files per leaf directory.
fan = max(2, math.ceil((n / 100) ** (1 / 3)))
def path(i):
    leaf = i % (fan ** 3)
    return os.path.join(root, f"a{leaf // fan // fan}", f"b{leaf // fan % fan}", f"c{leaf % fan}", f"f{i}")
blob = os.urandom(1 << 20)
start, made = time.time(), set()
for i, w in enumerate(weights):
    p = path(i)
    d = os.path.dirname(p)
    if d not in made:
        os.makedirs(d, exist_ok=True); made.add(d)
    size = min(len(blob) // 2, max(1, int(w * scale)))
    off = (i * 7919) % (len(blob) // 2)
    fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.write(fd, blob[off:off + size]); os.close(fd)
    if (i + 1) % 20000 == 0 or i + 1 == n:
        print(f"  {i + 1} files, {time.time() - start:.0f} s", flush=True)
print(f"  {len(made)} leaf directories of ~{n // len(made)} files ({fan}x{fan}x{fan} fan-out)")
# Files to change: round r picks 10 files spread over the whole tree, different in each round.
with open(changes, "w") as f:
    for r in range(10):
        for j in range(10):
            f.write(f"{r} {path((j * n // 10 + r * 7 + 1) % n)}\n")
PY
sync

conf() { printf "WHATTOSYNC=('%s')\nVOLATILE='%s'\nUSE_OVERLAYFS=%s\n" "$W/t" "$W/vol" "$1" > "$ASDCONF"; }
cold() { sync; echo 3 > /proc/sys/vm/drop_caches; }
change10() {  # $1: round; appends to 10 files spread over the tree, through the target
  awk -v r="$1" '$1 == r { print $2 }' "$W/changes" | while read -r p; do printf 'changed %s\n' "$1" >> "$p"; done
}
# run one asd command; prints "seconds peak_rss_MB"; fails if asd fails
measure() {
  python3 - "$ASD" "$@" <<'PY'
import resource, subprocess, sys, time
t = time.perf_counter()
r = subprocess.run(sys.argv[1:], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
e = time.perf_counter() - t
rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
if r.returncode:
    sys.exit(f"asd {' '.join(sys.argv[2:])} failed with {r.returncode}")
print(f"{e:.4f} {rss:.1f}")
PY
}
declare -A S R
run_mode() {  # $1: copy|overlay, $2 $3 $4: rounds of changes
  local m=$1 v
  [ "$m" = overlay ] && conf yes || conf no
  echo "$m mode: sync ..."
  cold; v=$(measure sync); S[$m,sync]=${v% *}; R[$m,sync]=${v#* }
  echo "$m mode: resyncs, unsync ..."
  change10 "$2"
  cold; v=$(measure resync); S[$m,r10]=${v% *}; R[$m,r10]=${v#* }
  cold; v=$(measure resync); S[$m,r0]=${v% *}; R[$m,r0]=${v#* }
  change10 "$3"; v=$(measure resync); S[$m,r10w]=${v% *}; R[$m,r10w]=${v#* }
  change10 "$4"; cold; v=$(measure unsync); S[$m,unsync]=${v% *}; R[$m,unsync]=${v#* }
  mountpoint -q "$W/t" && { echo "asd unsync left $W/t mounted" >&2; exit 1; }
  local r; for r in "$2" "$3" "$4"; do  # every change is on disk after unsync
    awk -v r="$r" '$1 == r { print $2 }' "$W/changes" | while read -r p; do
      [ "$(tail -c 10 "$p")" = "changed $r" ] || { echo "$m mode: change $r of $p lost" >&2; exit 1; }
    done
  done
  return 0
}
# The daemon (copy mode): its resyncs use a change journal once the first one readied it
# (asd-user/src/journals.rs); one-off `asd resync` commands above compare by ctime. The daemon
# logs how long each resync took; its stop is timed from SIGTERM to exit; peak RSS is its VmHWM.
run_daemon() {  # $1: copy|overlay, $2 $3: rounds of changes
  local m=$1; shift
  [ "$m" = overlay ] && conf yes || conf no
  local log="$W/daemon.log" pid n
  cold
  ASD_LOG=info "$ASD" daemon 2>"$log" & pid=$!
  wait_log "$log" "$pid" "target(s) in RAM" 1
  kill -USR1 "$pid"; wait_log "$log" "$pid" "resync done in" 1
  change10 "$1"; kill -USR1 "$pid"; wait_log "$log" "$pid" "resync done in" 2
  D[$m,r10]=$(grep "resync done in" "$log" | sed -n 2p | sed 's/.*done in \([0-9.]*\) s.*/\1/')
  change10 "$2"; kill -USR1 "$pid"; wait_log "$log" "$pid" "resync done in" 3
  D[$m,r10b]=$(grep "resync done in" "$log" | sed -n 3p | sed 's/.*done in \([0-9.]*\) s.*/\1/')
  D[$m,rss]=$(awk '/VmHWM/ { printf "%.1f", $2 / 1024 }' "/proc/$pid/status")
  local t0 t1; t0=$(date +%s.%N); kill -TERM "$pid"; wait "$pid"; t1=$(date +%s.%N)
  D[$m,stop]=$(python3 -c "print(f'{$t1 - $t0:.3f}')")
  mountpoint -q "$W/t" && { echo "$m mode: the daemon's stop left $W/t mounted" >&2; exit 1; }
  local r; for r in "$1" "$2"; do
    awk -v r="$r" '$1 == r { print $2 }' "$W/changes" | while read -r p; do
      [ "$(tail -c 10 "$p")" = "changed $r" ] || { echo "$m mode, daemon: change $r of $p lost" >&2; exit 1; }
    done
  done
}
declare -A D
echo "tree on disk: $(du -sh "$W/t" | cut -f1)"
run_mode copy 0 1 2
run_mode overlay 4 5 6
echo "the daemon, both modes: sync, resyncs, stop ..."
run_daemon copy 3 7
run_daemon overlay 8 9

echo
printf '%-40s %9s %9s %10s %10s   %s\n' "operation ($FILES files, ${TOTAL_MB} MB)" "copy s" "copy MB" "overlay s" "overlay MB" "goal"
row() {  # label key goal
  printf '%-40s %9s %9s %10s %10s   %s\n' "$1" "${S[copy,$2]}" "${R[copy,$2]}" "${S[overlay,$2]}" "${R[overlay,$2]}" "$3"
}
row "sync (cold)" sync "peak RSS < 64 MB (both modes)"
row "resync, 10 files changed (cold)" r10 "copy < 0.100 s, overlay < 0.020 s"
row "resync, nothing changed (cold)" r0 ""
row "resync, 10 files changed (warm)" r10w ""
row "unsync, 10 files changed since (cold)" unsync ""
echo
echo "the daemon (copy mode: change journal; overlay mode: deltas)    copy     overlay"
drow() { printf '  %-52s %9s %9s   %s\n' "$1" "${D[copy,$2]}" "${D[overlay,$2]}" "$3"; }
drow "resync, 10 files changed (as logged by the daemon)" r10 "copy < 0.100 s, overlay < 0.020 s"
drow "resync, 10 more files changed" r10b ""
drow "stop (SIGTERM to exit: write-back, unmount, delete)" stop ""
drow "peak RSS of the daemon (VmHWM, MB)" rss "< 64 MB"
