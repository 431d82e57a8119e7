#!/usr/bin/env bash
# Benchmark of the per-user path (not a test): round-trip time of a cheap helper call, and a full
# sync + unsync of a small target through the helper (as a user) versus in-process (as root), on
# the same tree in the same run. Runs in a private mount namespace, as root. STORM_USERS=1000
# first runs the login storm test with that many users and prints its figures.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:/root/.cargo/bin:$PATH"
[ "$(id -u)" -eq 0 ] || { echo "run as root" >&2; exit 1; }
if [ -z "${ASD_BENCH_INSIDE:-}" ] && [ -n "${STORM_USERS:-}" ]; then
  # Login storm (several minutes): STORM_USERS users (asdstorm0001..) sync and unsync at once
  # through one helper, with a greedy user alongside; seconds, retries and the helper's peak RSS.
  cargo build --quiet --release --workspace   # the test starts the helper built beside asd
  ASD_STORM_USERS=$STORM_USERS cargo test --quiet --release -p asd-user --test storm \
    login_storm -- --nocapture 2>&1 | grep -E '^storm: .* users:' || { echo "storm failed" >&2; exit 1; }
fi
if [ -z "${ASD_BENCH_INSIDE:-}" ]; then
  cargo build --quiet --release --workspace --examples
  id asdbench >/dev/null 2>&1 || useradd -m -s /bin/sh asdbench
  exec unshare -m --propagation private env ASD_BENCH_INSIDE=1 "$0" "$@"
fi
R=$PWD/target/release
W=$(mktemp -d /var/tmp/asd-hbench-XXXXXX); chmod 755 "$W"
trap 'kill $HPID 2>/dev/null || true; cd /; umount -R "$W/vol" 2>/dev/null || true; rm -rf "$W" /home/asdbench/small /home/asdbench/.small-backup_asd*' EXIT
mkdir -p "$W/vol" "$W/root-small" "$W/xdg"; mount -t tmpfs -o mode=1777 hb "$W/vol"
ASD_HELPER_STATE_DIR="$W/state" "$R/asd-helper" --socket "$W/h.sock" 2>/dev/null & HPID=$!
for _ in $(seq 100); do [ -S "$W/h.sock" ] && break; sleep 0.05; done
rm -rf /home/asdbench/small; mkdir -p /home/asdbench/small
for i in $(seq 1 200); do head -c 8192 /dev/urandom > "$W/root-small/f$i"; done
cp -a "$W/root-small/." /home/asdbench/small/; chown -R asdbench: /home/asdbench/small "$W/xdg"
printf "WHATTOSYNC=('/home/asdbench/small')\nVOLATILE='$W/vol'\nUSE_BACKUPS=no\n" > "$W/user.conf"
printf "WHATTOSYNC=('$W/root-small')\nVOLATILE='$W/vol'\nUSE_BACKUPS=no\n" > "$W/root.conf"
chown asdbench: "$W/user.conf"

as_user() { setpriv --reuid asdbench --regid asdbench --init-groups -- env -i HOME=/home/asdbench \
  XDG_RUNTIME_DIR="$W/xdg" ASD_HELPER_SOCKET="$W/h.sock" ASDCONF="$W/user.conf" ASD_LOG=warn "$@"; }
as_root() { env ASDCONF="$W/root.conf" ASD_RUNTIME_DIR="$W/run" ASD_LOG=warn "$@"; }
median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
cycle() {  # $1: as_user|as_root -> seconds for sync+unsync
  local t0 t1; t0=$(date +%s%N); "$1" "$R/asd" sync >/dev/null; "$1" "$R/asd" unsync >/dev/null; t1=$(date +%s%N)
  echo $(( (t1 - t0) / 1000 ))
}
as_user "$R/examples/rtt" "$W/h.sock" 3000
U=$(for _ in $(seq 9); do cycle as_user; done | median)
S=$(for _ in $(seq 9); do cycle as_root; done | median)
echo "sync+unsync of 200 files / 1.6 MB, median of 9:"
echo "  through the helper (as a user): ${U} µs"
echo "  in-process (as root):           ${S} µs"
python3 -c "print(f'  ratio helper/in-process: {$U/$S:.2f}x')"
