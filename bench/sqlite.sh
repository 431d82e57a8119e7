#!/usr/bin/env bash
# Benchmark of issue 12 (not a test): two SQLite databases of MB megabytes each (default 100), one
# in WAL mode and one with a rollback journal, in a copy-mode target while two programs commit to
# them without pause (python3's sqlite3: a row in, a row out, synchronous=NORMAL). Prints, from
# one run:
#   - `asd resync` time with the database treatment and without it (a file-by-file copy, as
#     before issue 12: ASD_TEST_PLAIN_DATABASES=1), median of RUNS (default 7) each, and the ratio;
#   - the longest time asd held a lock on each database (asd -v logs it per database), and for
#     comparison how long SQLite's online backup API (sqlite3_backup_step(-1)) holds its read
#     lock to copy the same database, measured here under the same writers;
#   - how many commits the writers made and whether either saw an error (it must not).
# The build has the test-hooks feature (for the plain run) and goes to its own target directory,
# never to the release binaries. Private mount namespace, as root.   bench/sqlite.sh [MB]
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:/root/.cargo/bin:$PATH"
MB=${1:-100}
RUNS=${RUNS:-7}
[ "$(id -u)" -eq 0 ] || { echo "run as root" >&2; exit 1; }
TGT=${ASD_BENCH_TARGET:-/var/tmp/asd-bench-target}
if [ -z "${ASD_BENCH_INSIDE:-}" ]; then
  CARGO_TARGET_DIR=$TGT cargo build --quiet --release -p asd-user --features asd-user/test-hooks
  exec unshare -m --propagation private env ASD_BENCH_INSIDE=1 "$0" "$@"
fi
ASD=$TGT/release/asd
W=$(mktemp -d /var/tmp/asd-sqlbench-XXXXXX)
cleanup() {
  touch "$W/stop" 2>/dev/null || true
  wait 2>/dev/null || true
  cd /; "$ASD" unsync >/dev/null 2>&1 || true
  umount -R "$W/vol" 2>/dev/null || true
  rm -rf "$W"
}
trap cleanup EXIT
mkdir -p "$W/vol" "$W/t"; mount -t tmpfs -o mode=1777 sqlbench "$W/vol"
export ASDCONF="$W/asd.conf" ASD_RUNTIME_DIR="$W/run" ASD_LOG=warn NO_COLOR=1
printf "WHATTOSYNC=('%s')\nVOLATILE='%s'\n" "$W/t" "$W/vol" > "$ASDCONF"

echo "making two databases of $MB MB in $W/t ..."
python3 - "$W/t" "$MB" <<'PY'
import os, sqlite3, sys
root, mb = sys.argv[1], int(sys.argv[2])
for name, mode in (("wal.sqlite", "WAL"), ("rollback.sqlite", "DELETE")):
    c = sqlite3.connect(os.path.join(root, name), isolation_level=None)
    c.execute(f"PRAGMA journal_mode={mode}")
    c.execute("PRAGMA synchronous=OFF")
    c.execute("CREATE TABLE items(id INTEGER PRIMARY KEY, tag INTEGER, payload BLOB)")
    c.execute("CREATE INDEX items_tag ON items(tag)")
    c.execute("BEGIN")
    rows = mb * 1024 // 2
    for i in range(rows):
        c.execute("INSERT INTO items VALUES (?, ?, randomblob(2000))", (i, i % 997))
    c.execute("COMMIT")
    c.close()
PY
sync
"$ASD" sync >/dev/null

# The writers: commit without pause until $W/stop exists; count in $W/NAME.n, errors in $W/NAME.err.
writer() {  # $1 file, $2 busy timeout (s)
  python3 - "$W/t/$1" "$2" "$W/stop" "$W/$1.n" "$W/$1.err" <<'PY' &
import os, random, sqlite3, sys
path, busy, stop, count, err = sys.argv[1], float(sys.argv[2]), *sys.argv[3:]
try:
    c = sqlite3.connect(path, timeout=busy, isolation_level=None)
    c.execute("PRAGMA synchronous=NORMAL")
    n = c.execute("SELECT max(id) FROM items").fetchone()[0] + 1
    k = 0
    while not (k % 32 == 0 and os.path.exists(stop)):
        c.execute("BEGIN")
        c.execute("INSERT INTO items VALUES (?, ?, randomblob(?))", (n, n % 997, random.randint(500, 3000)))
        c.execute("DELETE FROM items WHERE id = (SELECT min(id) FROM items)")
        c.execute("COMMIT")
        n += 1; k += 1
    open(count, "w").write(str(k))
except Exception as e:
    open(err, "w").write(repr(e))
PY
}
writer wal.sqlite 0
writer rollback.sqlite 5
sleep 1

LOG=$W/resync.log
: > "$LOG"
median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
resyncs() {  # $1 label, env...: prints the median seconds
  shift; local i a b
  for i in $(seq "$RUNS"); do
    a=$(date +%s%N)
    env ASD_LOG=debug "$@" "$ASD" resync >>"$LOG" 2>&1
    b=$(date +%s%N)
    python3 -c "print(f'{($b-$a)/1e9:.4f}')"
  done | median
}
TREATED=$(resyncs treated ASD_TEST_PLAIN_DATABASES=)
PLAIN=$(resyncs plain ASD_TEST_PLAIN_DATABASES=1)
hold() {  # longest lock_held_us logged for database $1
  { grep "consistent state" "$LOG" | grep -F "$1" | sed -n 's/.*lock_held_us=\([0-9]*\).*/\1/p' | sort -n | tail -1; } || true
}
HOLD_WAL=$(hold wal.sqlite); HOLD_RB=$(hold rollback.sqlite)

# SQLite's online backup API on the same databases, under the same writers, for comparison.
BACKUP=$(python3 - "$W/t" "$W" <<'PY'
import os, sqlite3, sys, time
src_dir, out = sys.argv[1], sys.argv[2]
res = []
for name in ("wal.sqlite", "rollback.sqlite"):
    src = sqlite3.connect(os.path.join(src_dir, name), timeout=5)
    dst = sqlite3.connect(os.path.join(out, "backup-" + name))
    t = time.monotonic()
    src.backup(dst, pages=-1)
    res.append(f"{(time.monotonic() - t) * 1e6:.0f}")
    dst.close(); src.close()
print(" ".join(res))
PY
)
touch "$W/stop"; wait
ERR=$(cat "$W"/*.err 2>/dev/null || true)
N_WAL=$(cat "$W/wal.sqlite.n" 2>/dev/null || echo "?"); N_RB=$(cat "$W/rollback.sqlite.n" 2>/dev/null || echo "?")
"$ASD" unsync >/dev/null

ms() { python3 -c "print(f'{int(\"${1:-0}\")/1000:.1f} ms')"; }
echo
echo "two databases of $MB MB (WAL, rollback journal), each written without pause; median of $RUNS resyncs"
printf '%-46s %10s\n' "resync with the database treatment" "$TREATED s"
printf '%-46s %10s\n' "resync copying file by file (before issue 12)" "$PLAIN s"
python3 -c "print(f'{\"treated / plain\":<46} {$TREATED/$PLAIN:9.2f}x')"
printf '%-46s %10s  (backup API: %s)\n' "longest lock held, WAL database" "$(ms "$HOLD_WAL")" "$(ms "${BACKUP% *}")"
printf '%-46s %10s  (backup API: %s)\n' "longest lock held, rollback-journal database" "$(ms "$HOLD_RB")" "$(ms "${BACKUP#* }")"
echo "commits during the run: WAL $N_WAL, rollback journal $N_RB; writer errors: ${ERR:-none}"
