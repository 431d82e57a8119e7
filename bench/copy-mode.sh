#!/usr/bin/env bash
# Benchmark of the copy mode (not a test): times asd sync / resync / unsync on a generated tree
# and, in the same run on the same tree, the parallel-read floor (every file read once with
# READERS readers in flight, and with one), `cp -a` into tmpfs, `rsync -aX --delete` of the
# changed copy back to disk, and the write-back of anything-sync-daemon 6.0's unsync; then the
# daemon's journaled resync and its stop (the unsync at logout and shutdown); prints the
# ratios. Timed steps start with a cold page cache unless marked warm. Private mount namespace,
# as root.
# The sync, resync and unsync steps, asd 6.0's included, run ROUNDS times (a round: asd sync, a
# 1% change, resync, another, unsync; the same for 6.0; the daemon from start to stop): each
# row shows the median and every round's figure, since one run on a shared VM varies by 15%.
#   bench/copy-mode.sh [FILES] [TOTAL_MB]   (default 20000 files, ~300 MB; env READERS=16,
#                                           ROUNDS=3, BENCH_DISK=loop: the trees on a new ext4
#                                           image with a journal, as mkfs.ext4 makes it)
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/daemon-log.sh
export PATH="$HOME/.cargo/bin:/root/.cargo/bin:$PATH"
FILES=${1:-20000}
TOTAL_MB=${2:-300}
READERS=${READERS:-16}
ROUNDS=${ROUNDS:-3}
[ "$(id -u)" -eq 0 ] || { echo "run as root (it mounts tmpfs in a private namespace)" >&2; exit 1; }
command -v rsync >/dev/null || { echo "needs rsync (apt-get install rsync) for the comparison" >&2; exit 1; }
if [ -z "${ASD_BENCH_INSIDE:-}" ]; then
  cargo build --quiet --release -p asd-user
  exec unshare -m --propagation private env ASD_BENCH_INSIDE=1 "$0" "$@"
fi
ASD=$PWD/target/release/asd
TOP=$(mktemp -d /var/tmp/asd-bench-XXXXXX)
trap 'cd /; umount "$TOP/vol" "$TOP/disk" 2>/dev/null || true; [ -z "${LOOPDEV:-}" ] || losetup -d "$LOOPDEV"; rm -rf "$TOP"' EXIT
mkdir -p "$TOP/vol" "$TOP/disk"
mount -t tmpfs -o mode=1777 bench "$TOP/vol"
if [ "${BENCH_DISK:-}" = loop ]; then
  # This VM's root filesystem is an ext4 without a journal, which no installer makes.
  truncate -s 4G "$TOP/disk.img"; mkfs.ext4 -q "$TOP/disk.img"
  LOOPDEV=$(losetup --direct-io=on -f --show "$TOP/disk.img"); mount "$LOOPDEV" "$TOP/disk"
fi
W=$TOP/disk VOL=$TOP/vol
mkdir -p "$W/t"

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
VOLATILE="$VOL"
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
cold; t0=$(now); cp -a "$W/t" "$VOL/cp-copy"; t1=$(now); CP=$(secs "$t0" "$t1")
rm -rf "$VOL/cp-copy"

# Figures of every round, by name: add NAME VALUE; median NAME; all NAME.
declare -A FIG
add() { FIG[$1]="${FIG[$1]:-} $2"; }
median() { python3 -c "import statistics, sys; print(f'{statistics.median(map(float, sys.argv[2:])):.{sys.argv[1]}f}')" "${2:-3}" ${FIG[$1]}; }
all() { echo "${FIG[$1]# }"; }
# ratio per round of two figures: add_ratio NAME A B
add_ratio() {
  local a=(${FIG[$2]}) b=(${FIG[$3]}) i
  for i in "${!a[@]}"; do add "$1" "$(python3 -c "print(f'{${a[$i]} / ${b[$i]}:.2f}')")"; done
}
log_secs() { sed -n "s/.*$2 \([0-9.]*\) s.*/\1/p" "$1" | head -1; }

DLOG="$W/daemon.log"
for round in $(seq 1 "$ROUNDS"); do
  echo "round $round of $ROUNDS ..."
  # asd sync, then a resync after a 1% change through the target (the ctime walk of a one-off
  # command, no daemon), then an unsync after another 1% change.
  cold; t0=$(now); "$ASD" sync >/dev/null; t1=$(now); add SYNC "$(secs "$t0" "$t1")"
  change_one_percent "$W/t"; cold
  t0=$(now); "$ASD" resync >/dev/null; t1=$(now); add RESYNC "$(secs "$t0" "$t1")"
  t0=$(now); "$ASD" resync >/dev/null; t1=$(now); add RESYNC_NOCHANGE "$(secs "$t0" "$t1")"
  change_one_percent "$W/t"; cold
  t0=$(now); ASD_LOG=info "$ASD" unsync >/dev/null 2>"$W/unsync.log"; t1=$(now)
  add UNSYNC "$(secs "$t0" "$t1")"
  # asd logs its two parts apart: the write-back (what changed) and the deletions (the tree's size).
  add UNSYNC_WB "$(log_secs "$W/unsync.log" "written back and unmounted in")"
  add UNSYNC_DEL "$(log_secs "$W/unsync.log" "start clone deleted in")"

  # The references, on a pair of copies of the same tree: a disk copy and a tmpfs copy.
  #  - for resync: rsync -aX --delete of a 1% change back to disk;
  #  - for unsync: anything-sync-daemon v6.0.0 (github.com/graysky2/anything-sync-daemon, tag
  #    v6.0.0, common/anything-sync-daemon.in). Its `unsync)` runs do_sync, which writes the
  #    tmpfs copy back with
  #      rsync -aX --delete-after --exclude .flagged "$TMP/" "$BACKUP/" --info=progress2
  #    then do_unsync, which unmounts (umount -R -f -l) and, with USE_BACKUPS=yes (its default,
  #    and asd's), runs rm -rf "$BACK_OLD" (the hard-linked start clone, here a `cp -al` of the
  #    disk copy) and rm -rf "$TMP": both timed, and added for the "whole 6.0 unsync", the
  #    goal's reference. Releases up to v5.86 wrote back with
  #      rsync -aogX --delete-after --inplace --no-whole-file --exclude .flagged "$DIR/" "$BACKUP/"
  #    timed too, on a disk copy of its own. Each from a cold cache, followed by `sync`.
  #  (The v6.0.0 script itself, run by hand on this tree here: `asd unsync` took 1.11 s without
  #  a final `sync`; this reconstruction, with one, 1.10-1.15 s.)
  rm -rf "$W/ref-disk" "$W/ref5-disk" "$W/ref-old" "$VOL/ref-ram"
  cp -a "$W/t" "$W/ref-disk"; cp -a "$W/t" "$VOL/ref-ram"
  change_one_percent "$VOL/ref-ram"; cold
  t0=$(now); rsync -aX --delete "$VOL/ref-ram/" "$W/ref-disk/"; sync; t1=$(now); add RSYNC "$(secs "$t0" "$t1")"
  t0=$(now); rsync -aX --delete "$VOL/ref-ram/" "$W/ref-disk/"; t1=$(now); add RSYNC_NOCHANGE "$(secs "$t0" "$t1")"
  cp -a "$W/ref-disk/." "$W/ref5-disk/"; cp -al "$W/ref-disk" "$W/ref-old"
  change_one_percent "$VOL/ref-ram"; cold
  t0=$(now); rsync -aX --delete-after --exclude .flagged "$VOL/ref-ram/" "$W/ref-disk/"; sync; t1=$(now)
  add ASD6_UNSYNC "$(secs "$t0" "$t1")"
  cold
  t0=$(now); rsync -aogX --delete-after --inplace --no-whole-file --exclude .flagged "$VOL/ref-ram/" "$W/ref5-disk/"; sync; t1=$(now)
  add ASD5_UNSYNC "$(secs "$t0" "$t1")"
  cold; t0=$(now); rm -rf "$W/ref-old" "$VOL/ref-ram"; sync; t1=$(now); add ASD6_CLEANUP "$(secs "$t0" "$t1")"
  rm -rf "$W/ref-disk" "$W/ref5-disk"

  # The daemon (`asd daemon`, what the systemd units run): its unsync is what runs at logout
  # and shutdown (SIGTERM). Its resyncs and that last write-back follow its change journal (see
  # asd-user/src/journals.rs) instead of comparing the whole tree by ctime. On the same tree:
  # start, a first resync (it readies the journal), a 1% change and a resync (as logged),
  # another 1% change, then SIGTERM, timed to the exit, with a cold cache.
  cold; ASD_LOG=info "$ASD" daemon 2>"$DLOG" & DPID=$!
  wait_log "$DLOG" "$DPID" "target(s) in RAM" 1
  kill -USR1 "$DPID"; wait_log "$DLOG" "$DPID" "resync done in" 1
  change_one_percent "$W/t"; cold; kill -USR1 "$DPID"; wait_log "$DLOG" "$DPID" "resync done in" 2
  add D_RESYNC "$(grep "resync done in" "$DLOG" | sed -n 2p | sed 's/.*done in \([0-9.]*\) s.*/\1/')"
  change_one_percent "$W/t"; echo "written at the end, round $round" > "$W/t/last-change"; cold
  t0=$(now); kill -TERM "$DPID"; wait "$DPID"; t1=$(now); add D_STOP "$(secs "$t0" "$t1")"
  add D_WB "$(log_secs "$DLOG" "written back and unmounted in")"
  add D_DEL "$(log_secs "$DLOG" "start clone deleted in")"
  if mountpoint -q "$W/t" || [ "$(cat "$W/t/last-change")" != "written at the end, round $round" ]; then
    echo "the daemon's stop did not leave the last change on disk" >&2; exit 1
  fi
done
a6=(${FIG[ASD6_UNSYNC]}) c6=(${FIG[ASD6_CLEANUP]})
for i in "${!a6[@]}"; do add ASD6_WHOLE "$(python3 -c "print(f'{${a6[$i]} + ${c6[$i]}:.3f}')")"; done
add_ratio R_RESYNC RESYNC RSYNC
add_ratio R_NOCHANGE RESYNC_NOCHANGE RSYNC_NOCHANGE
add_ratio R_UNSYNC UNSYNC RESYNC
add_ratio R_UNSYNC6 UNSYNC ASD6_WHOLE
add_ratio R_UNSYNC6WB UNSYNC ASD6_UNSYNC
add_ratio R_UNSYNC5 UNSYNC ASD5_UNSYNC
add_ratio R_WB UNSYNC_WB RESYNC
add_ratio R_DSTOP D_STOP D_RESYNC
add_ratio R_DSTOP6 D_STOP ASD6_WHOLE

ratio() { python3 -c "print(f'{$1 / $2:.2f}x')"; }
row() { printf '%-44s %9s   %s\n' "$@"; }
# A figure of the rounds: its median, then every round's.
fig() { row "$1" "$(median "$2")" "${3:-}(rounds: $(all "$2"))"; }
# A ratio per round: its median, then every round's.
rat() { row "" "" "$(median "$1" 2)x $2 (rounds: $(all "$1"))"; }
SYNC=$(median SYNC)
echo
row "operation ($FILES files, ${TOTAL_MB} MB)" "seconds" "ratio; median of $ROUNDS rounds"
row "read every file, $READERS readers (floor)" "$READ_N"
row "read every file, 1 reader" "$READ_1" "$(ratio "$READ_1" "$READ_N") of the floor"
row "cp -a into tmpfs" "$CP" "$(ratio "$CP" "$READ_N") of the floor"
fig "asd sync" SYNC
row "" "" "$(ratio "$SYNC" "$CP") of cp -a (goal <= 0.50x), $(ratio "$SYNC" "$READ_N") of the parallel-read floor"
fig "rsync -aX --delete, 1% changed (+ sync)" RSYNC
fig "asd resync, 1% changed" RESYNC
rat R_RESYNC "of rsync (goal <= 0.50x; asd includes syncfs)"
fig "rsync, nothing changed (warm)" RSYNC_NOCHANGE
fig "asd resync, nothing changed (warm)" RESYNC_NOCHANGE
rat R_NOCHANGE "of rsync"
fig "asd 6.0 unsync write-back, 1% (+ sync)" ASD6_UNSYNC "rsync -aX --delete-after "
fig "asd 6.0 rm -rf start clone + RAM copy" ASD6_CLEANUP "(+ sync) "
fig "asd 6.0 unsync, whole" ASD6_WHOLE "write-back + rm -rf's "
fig "asd 5.x unsync write-back, 1% (+ sync)" ASD5_UNSYNC "rsync -aogX --delete-after --inplace --no-whole-file "
fig "asd unsync, 1% changed since resync" UNSYNC "one-off command: no daemon, no journal "
rat R_UNSYNC "of asd resync (goal <= 2x)"
rat R_UNSYNC6 "of the whole asd 6.0 unsync (goal <= 0.30x)"
rat R_UNSYNC6WB "of asd 6.0's write-back alone"
rat R_UNSYNC5 "of asd 5.x unsync write-back"
fig "  of which: written back, unmounted" UNSYNC_WB
rat R_WB "of asd resync"
fig "  of which: RAM copy, start clone deleted" UNSYNC_DEL
fig "asd daemon: resync, 1% changed (logged)" D_RESYNC "by its change journal "
fig "asd daemon: stop (unsync), 1% changed" D_STOP "logout, shutdown: SIGTERM to exit "
rat R_DSTOP "of its resync (goal <= 2x)"
rat R_DSTOP6 "of the whole asd 6.0 unsync (goal <= 0.30x)"
fig "  of which: written back, unmounted" D_WB
fig "  of which: RAM copy, start clone deleted" D_DEL
