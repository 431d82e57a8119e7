#!/usr/bin/env bash
# Benchmark of the copy mode (not a test): times asd sync / resync / unsync on a generated tree
# and, in the same run on the same tree, `cp -a` into tmpfs and `rsync -aX --delete` of the
# changed copy back to disk; prints the ratios. Runs in a private mount namespace, as root.
#   bench/copy-mode.sh [FILES] [TOTAL_MB]        (default 20000 files, ~300 MB)
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:/root/.cargo/bin:$PATH"
FILES=${1:-20000}
TOTAL_MB=${2:-300}
[ "$(id -u)" -eq 0 ] || { echo "run as root (it mounts tmpfs in a private namespace)" >&2; exit 1; }
command -v rsync >/dev/null || { echo "needs rsync (apt-get install rsync) for the comparison" >&2; exit 1; }
if [ -z "${ASD_BENCH_INSIDE:-}" ]; then
  cargo build --quiet --release -p asd-user
  exec unshare -m --propagation private env ASD_BENCH_INSIDE=1 "$0" "$@"
fi
ASD=$PWD/target/release/asd
W=$(mktemp -d /var/tmp/asd-bench-XXXXXX)
trap 'cd /; umount -R "$W/vol" 2>/dev/null || true; rm -rf "$W"' EXIT
mkdir -p "$W/vol" "$W/t" "$W/rsync-disk"
mount -t tmpfs -o mode=1777 bench "$W/vol"

echo "building $FILES files, ~$TOTAL_MB MB (mixed sizes) in $W/t ..."
python3 - "$W/t" "$FILES" "$TOTAL_MB" <<'PY'
import os, random, sys
root, n, total = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]) * 1024 * 1024
random.seed(42)
# Mixed sizes: many small files, some medium, a few large, scaled to the total.
weights = [random.choice([1] * 70 + [20] * 25 + [400] * 5) for _ in range(n)]
scale = total / sum(weights)
blob = os.urandom(4 * 1024 * 1024)
for i, w in enumerate(weights):
    d = os.path.join(root, f"d{i % 97}", f"e{i % 13}")
    os.makedirs(d, exist_ok=True)
    size = max(1, int(w * scale))
    off = (i * 7919) % (len(blob) - 1)
    data = (blob[off:] + blob)[:size] if size < len(blob) else (blob * (size // len(blob) + 1))[:size]
    with open(os.path.join(d, f"f{i}"), "wb") as f:
        f.write(data)
PY
sync
cat > "$W/asd.conf" <<CONF
WHATTOSYNC=('$W/t')
VOLATILE="$W/vol"
CONF
export ASDCONF="$W/asd.conf" ASD_RUNTIME_DIR="$W/run" NO_COLOR=1 ASD_LOG=warn

now() { date +%s.%N; }
cold() { sync; echo 3 > /proc/sys/vm/drop_caches; }
secs() { python3 -c "print(f'{$2 - $1:.3f}')"; }
change_one_percent() {  # $1: a tree; rewrites every 100th file and adds/deletes a few
  python3 - "$1" <<'PY'
import os, sys
root = sys.argv[1]
files = sorted(os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs)
for i, p in enumerate(files):
    if i % 100 == 0:
        with open(p, "ab") as f: f.write(b"changed")
for i, p in enumerate(files[1::500]):
    os.unlink(p)
for i in range(len(files) // 1000):
    with open(os.path.join(root, f"new{i}"), "wb") as f: f.write(os.urandom(4096))
PY
}

# cp -a into tmpfs (the reference for sync)
cold; t0=$(now); cp -a "$W/t" "$W/vol/cp-copy"; t1=$(now); CP=$(secs "$t0" "$t1")
# asd sync
cold; t0=$(now); "$ASD" sync >/dev/null; t1=$(now); SYNC=$(secs "$t0" "$t1")
# the rsync reference for resync: a disk copy and a changed tmpfs copy
cp -a "$W/t/." "$W/rsync-disk/"; change_one_percent "$W/vol/cp-copy"; cold
t0=$(now); rsync -aX --delete "$W/vol/cp-copy/" "$W/rsync-disk/"; sync; t1=$(now); RSYNC=$(secs "$t0" "$t1")
t0=$(now); rsync -aX --delete "$W/vol/cp-copy/" "$W/rsync-disk/"; t1=$(now); RSYNC_NOCHANGE=$(secs "$t0" "$t1")
# asd resync after the same kind of change, through the target
change_one_percent "$W/t"; cold
t0=$(now); "$ASD" resync >/dev/null; t1=$(now); RESYNC=$(secs "$t0" "$t1")
t0=$(now); "$ASD" resync >/dev/null; t1=$(now); RESYNC_NOCHANGE=$(secs "$t0" "$t1")
t0=$(now); "$ASD" unsync >/dev/null; t1=$(now); UNSYNC=$(secs "$t0" "$t1")

ratio() { python3 -c "print(f'{$1 / $2:.2f}x')"; }
printf '\n%-38s %9s   %s\n' "operation ($FILES files, ${TOTAL_MB} MB)" "seconds" "ratio"
printf '%-38s %9s\n' "cp -a into tmpfs" "$CP"
printf '%-38s %9s   %s of cp -a (goal <= 1.30x)\n' "asd sync" "$SYNC" "$(ratio "$SYNC" "$CP")"
printf '%-38s %9s   (+ sync)\n' "rsync -aX --delete, 1% changed" "$RSYNC"
printf '%-38s %9s   %s of rsync (goal <= 0.50x; asd includes syncfs)\n' "asd resync, 1% changed" "$RESYNC" "$(ratio "$RESYNC" "$RSYNC")"
printf '%-38s %9s\n' "rsync, nothing changed" "$RSYNC_NOCHANGE"
printf '%-38s %9s   %s of rsync\n' "asd resync, nothing changed" "$RESYNC_NOCHANGE" "$(ratio "$RESYNC_NOCHANGE" "$RSYNC_NOCHANGE")"
printf '%-38s %9s\n' "asd unsync" "$UNSYNC"
