#!/usr/bin/env bash
# Benchmark of the copy mode (not a test): times asd sync / resync / unsync on a generated tree
# and, in the same run on the same tree, the parallel-read floor (every file read once with
# READERS readers in flight, and with one), `cp -a` into tmpfs, `rsync -aX --delete` of the
# changed copy back to disk, and the write-back of anything-sync-daemon 6.0's unsync; then the
# daemon's journaled resync and its stop (the unsync at logout and shutdown); prints the
# ratios. Timed steps start with a cold page cache unless marked warm. Private mount namespace,
# as root.
#   bench/copy-mode.sh [FILES] [TOTAL_MB]        (default 20000 files, ~300 MB; env READERS=16)
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/daemon-log.sh
export PATH="$HOME/.cargo/bin:/root/.cargo/bin:$PATH"
FILES=${1:-20000}
TOTAL_MB=${2:-300}
READERS=${READERS:-16}
[ "$(id -u)" -eq 0 ] || { echo "run as root (it mounts tmpfs in a private namespace)" >&2; exit 1; }
command -v rsync >/dev/null || { echo "needs rsync (apt-get install rsync) for the comparison" >&2; exit 1; }
if [ -z "${ASD_BENCH_INSIDE:-}" ]; then
  cargo build --quiet --release -p asd-user
  exec unshare -m --propagation private env ASD_BENCH_INSIDE=1 "$0" "$@"
fi
ASD=$PWD/target/release/asd
W=$(mktemp -d /var/tmp/asd-bench-XXXXXX)
trap 'cd /; umount -R "$W/vol" 2>/dev/null || true; rm -rf "$W"' EXIT
mkdir -p "$W/vol" "$W/t" "$W/rsync-disk" "$W/rsync5-disk"
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

# the parallel-read floor: every file of the tree read once, READERS readers in flight, then one
read_all() { (cd "$W" && find t -type f -print0 | xargs -0 -P "$1" -n 64 cat > /dev/null); }
cold; t0=$(now); read_all "$READERS"; t1=$(now); READ_N=$(secs "$t0" "$t1")
cold; t0=$(now); read_all 1; t1=$(now); READ_1=$(secs "$t0" "$t1")
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
# asd unsync with real work: another 1% change through the target after the last resync
change_one_percent "$W/t"; cold
t0=$(now); ASD_LOG=info "$ASD" unsync >/dev/null 2>"$W/unsync.log"; t1=$(now); UNSYNC=$(secs "$t0" "$t1")
# asd logs its two parts apart: the write-back (what changed) and the deletions (the tree's size).
UNSYNC_WB=$(sed -n 's/.*written back and unmounted in \([0-9.]*\) s.*/\1/p' "$W/unsync.log" | head -1)
UNSYNC_DEL=$(sed -n 's/.*start clone deleted in \([0-9.]*\) s.*/\1/p' "$W/unsync.log" | head -1)
# The reference for unsync: anything-sync-daemon v6.0.0 (github.com/graysky2/anything-sync-daemon,
# tag v6.0.0, common/anything-sync-daemon.in): `unsync)` runs do_sync then do_unsync; do_sync
# writes the tmpfs copy back with
#   rsync -aX --delete-after --exclude .flagged "$TMP/" "$BACKUP/" --info=progress2
# and do_unsync only unmounts (umount -R -f -l) and rm -rf's the tmpfs copy (not timed here, so
# the reference is if anything a little fast). Releases up to v5.86 used instead
#   rsync -aogX --delete-after --inplace --no-whole-file --exclude .flagged "$DIR/" "$BACKUP/"
# which is timed too, on its own disk copy. Both from the changed tmpfs copy to a disk copy that
# holds the same state as the target before the change, with a cold cache, followed by `sync`.
# With USE_BACKUPS=yes (its default, and asd's) 6.0's do_unsync also runs rm -rf "$BACK_OLD" (the
# hard-linked start clone) and rm -rf "$TMP": timed apart (on a `cp -al` clone of the disk copy)
# and added for the "whole 6.0 unsync" ratio, the goal's reference. (The v6.0.0 script itself,
# run by hand on this tree here: `asd unsync` took 1.11 s without a final `sync`; this
# reconstruction, with one, 1.10-1.15 s.)
cp -a "$W/rsync-disk/." "$W/rsync5-disk/"; cp -al "$W/rsync-disk" "$W/rsync-old"
change_one_percent "$W/vol/cp-copy"; cold
t0=$(now); rsync -aX --delete-after --exclude .flagged "$W/vol/cp-copy/" "$W/rsync-disk/"; sync; t1=$(now)
ASD6_UNSYNC=$(secs "$t0" "$t1")
cold
t0=$(now); rsync -aogX --delete-after --inplace --no-whole-file --exclude .flagged "$W/vol/cp-copy/" "$W/rsync5-disk/"; sync; t1=$(now)
ASD5_UNSYNC=$(secs "$t0" "$t1")
cold; t0=$(now); rm -rf "$W/rsync-old" "$W/vol/cp-copy"; sync; t1=$(now); ASD6_CLEANUP=$(secs "$t0" "$t1")
ASD6_WHOLE=$(python3 -c "print(f'{$ASD6_UNSYNC + $ASD6_CLEANUP:.3f}')")

# The daemon (`asd daemon`, what the systemd units run): its unsync is what runs at logout and
# shutdown (SIGTERM). Its resyncs and that last write-back follow its change journal (see
# asd-user/src/journals.rs) instead of comparing the whole tree by ctime. On the same tree, now
# on disk again: start, a first resync (it readies the journal), a 1% change and a resync (as
# logged), another 1% change, then SIGTERM, timed to the exit, with a cold cache.
DLOG="$W/daemon.log"
cold; ASD_LOG=info "$ASD" daemon 2>"$DLOG" & DPID=$!
wait_log "$DLOG" "$DPID" "target(s) in RAM" 1
kill -USR1 "$DPID"; wait_log "$DLOG" "$DPID" "resync done in" 1
change_one_percent "$W/t"; cold; kill -USR1 "$DPID"; wait_log "$DLOG" "$DPID" "resync done in" 2
D_RESYNC=$(grep "resync done in" "$DLOG" | sed -n 2p | sed 's/.*done in \([0-9.]*\) s.*/\1/')
change_one_percent "$W/t"; echo "written at the end" > "$W/t/last-change"; cold
t0=$(now); kill -TERM "$DPID"; wait "$DPID"; t1=$(now); D_STOP=$(secs "$t0" "$t1")
D_WB=$(sed -n 's/.*written back and unmounted in \([0-9.]*\) s.*/\1/p' "$DLOG" | head -1)
D_DEL=$(sed -n 's/.*start clone deleted in \([0-9.]*\) s.*/\1/p' "$DLOG" | head -1)
if mountpoint -q "$W/t" || [ "$(cat "$W/t/last-change")" != "written at the end" ]; then
  echo "the daemon's stop did not leave the last change on disk" >&2; exit 1
fi

ratio() { python3 -c "print(f'{$1 / $2:.2f}x')"; }
row() { printf '%-44s %9s   %s\n' "$@"; }
echo
row "operation ($FILES files, ${TOTAL_MB} MB)" "seconds" "ratio"
row "read every file, $READERS readers (floor)" "$READ_N"
row "read every file, 1 reader" "$READ_1" "$(ratio "$READ_1" "$READ_N") of the floor"
row "cp -a into tmpfs" "$CP" "$(ratio "$CP" "$READ_N") of the floor"
row "asd sync" "$SYNC" "$(ratio "$SYNC" "$CP") of cp -a (goal <= 0.50x)"
row "" "" "$(ratio "$SYNC" "$READ_N") of the parallel-read floor"
row "rsync -aX --delete, 1% changed (+ sync)" "$RSYNC"
row "asd resync, 1% changed" "$RESYNC" "$(ratio "$RESYNC" "$RSYNC") of rsync (goal <= 0.50x; asd includes syncfs)"
row "rsync, nothing changed (warm)" "$RSYNC_NOCHANGE"
row "asd resync, nothing changed (warm)" "$RESYNC_NOCHANGE" "$(ratio "$RESYNC_NOCHANGE" "$RSYNC_NOCHANGE") of rsync"
row "asd 6.0 unsync write-back, 1% (+ sync)" "$ASD6_UNSYNC" "rsync -aX --delete-after"
row "asd 6.0 rm -rf start clone + RAM copy" "$ASD6_CLEANUP" "(+ sync)"
row "asd 6.0 unsync, whole" "$ASD6_WHOLE" "write-back + rm -rf's"
row "asd 5.x unsync write-back, 1% (+ sync)" "$ASD5_UNSYNC" "rsync -aogX --delete-after --inplace --no-whole-file"
row "asd unsync, 1% changed since resync" "$UNSYNC" "$(ratio "$UNSYNC" "$RESYNC") of asd resync (goal <= 2x)"
row "  (one-off command: no daemon, no journal)" "" "$(ratio "$UNSYNC" "$ASD6_WHOLE") of the whole asd 6.0 unsync (goal <= 0.30x)"
row "" "" "$(ratio "$UNSYNC" "$ASD6_UNSYNC") of asd 6.0's write-back alone"
row "" "" "$(ratio "$UNSYNC" "$ASD5_UNSYNC") of asd 5.x unsync write-back"
row "  of which: written back, unmounted" "$UNSYNC_WB" "$(ratio "$UNSYNC_WB" "$RESYNC") of asd resync, $(ratio "$UNSYNC_WB" "$ASD6_UNSYNC") of asd 6.0 unsync write-back"
row "  of which: RAM copy, start clone deleted" "$UNSYNC_DEL" "(asd 6.0: $ASD6_CLEANUP)"
row "asd daemon: resync, 1% changed (logged)" "$D_RESYNC" "by its change journal"
row "asd daemon: stop (unsync), 1% changed" "$D_STOP" "$(ratio "$D_STOP" "$D_RESYNC") of its resync (goal <= 2x)"
row "  (logout, shutdown: SIGTERM to exit)" "" "$(ratio "$D_STOP" "$ASD6_WHOLE") of the whole asd 6.0 unsync (goal <= 0.30x)"
row "  of which: written back, unmounted" "$D_WB"
row "  of which: RAM copy, start clone deleted" "$D_DEL"
