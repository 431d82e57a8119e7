#!/usr/bin/env bash
# Benchmark of the overlay mode (not a test): on one generated tree (default 100,000 files),
# resync time with 10 and with 10,000 changed files in overlay mode, the copy mode's resync on the
# same tree with the same changes, and the tmpfs usage after sync in both modes. Private mount
# namespace, as root.   bench/overlay-mode.sh [FILES]
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:/root/.cargo/bin:$PATH"
FILES=${1:-100000}
[ "$(id -u)" -eq 0 ] || { echo "run as root" >&2; exit 1; }
if [ -z "${ASD_BENCH_INSIDE:-}" ]; then
  cargo build --quiet --release -p asd-user
  exec unshare -m --propagation private env ASD_BENCH_INSIDE=1 "$0" "$@"
fi
ASD=$PWD/target/release/asd
W=$(mktemp -d /var/tmp/asd-obench-XXXXXX)
trap 'cd /; "$ASD" unsync >/dev/null 2>&1 || true; umount -R "$W/vol" 2>/dev/null || true; rm -rf "$W"' EXIT
mkdir -p "$W/vol" "$W/t"; mount -t tmpfs -o mode=1777 obench "$W/vol"
echo "building $FILES files in $W/t ..."
python3 - "$W/t" "$FILES" <<'PY'
import os, sys
root, n = sys.argv[1], int(sys.argv[2])
blob = os.urandom(1 << 16)
for i in range(n):
    d = os.path.join(root, f"d{i % 300}", f"e{i % 17}")
    os.makedirs(d, exist_ok=True)
    size = 512 + (i * 7919) % 6000
    with open(os.path.join(d, f"f{i}"), "wb") as f:
        f.write(blob[(i * 31) % 4096:][:size])
PY
sync
export ASDCONF="$W/asd.conf" ASD_RUNTIME_DIR="$W/run" ASD_LOG=warn
conf() { printf "WHATTOSYNC=('$W/t')\nVOLATILE='$W/vol'\nUSE_OVERLAYFS=$1\n" > "$ASDCONF"; }
change() {  # $1 files, $2 tag: rewrites files spread over the tree, through the target
  python3 - "$W/t" "$1" "$2" "$FILES" <<'PY'
import os, sys
root, k, tag, n = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
step = max(1, n // k)
for j in range(k):
    i = (j * step) % n
    p = os.path.join(root, f"d{i % 300}", f"e{i % 17}", f"f{i}")
    with open(p, "ab") as f: f.write(tag.encode())
PY
}
t() { local a b; a=$(date +%s%N); "$@" >/dev/null; b=$(date +%s%N); python3 -c "print(f'{($b-$a)/1e9:.4f}')"; }
used() { df -B1 --output=used "$W/vol" | tail -1; }
mb() { python3 -c "print(f'{$1/1048576:.1f} MB')"; }

conf yes; "$ASD" sync >/dev/null; OV_USED=$(used)
change 10 a; O10=$(t "$ASD" resync)
change 10000 b; O10K=$(t "$ASD" resync)
change 10 c; O10B=$(t "$ASD" resync)
"$ASD" unsync >/dev/null
conf no; "$ASD" sync >/dev/null; CP_USED=$(used)
change 10 d; C10=$(t "$ASD" resync)
change 10000 e; C10K=$(t "$ASD" resync)
"$ASD" unsync >/dev/null

r() { python3 -c "print(f'{$1/$2:.0f}x')"; }
echo
echo "tree: $FILES files; tmpfs used after sync: overlay $(mb "$OV_USED"), copy $(mb "$CP_USED")"
printf '%-34s %9s %9s  %s\n' "resync" "overlay" "copy" "copy/overlay"
printf '%-34s %9s %9s  %s (goal: overlay < 0.05 s, >= 50x)\n' "10 files changed" "$O10" "$C10" "$(r "$C10" "$O10")"
printf '%-34s %9s %9s  %s\n' "10,000 files changed" "$O10K" "$C10K" "$(r "$C10K" "$O10K")"
printf '%-34s %9s\n' "10 more after 10,000 (overlay)" "$O10B"
