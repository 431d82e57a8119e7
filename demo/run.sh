#!/usr/bin/env bash
# The demo (README.md): builds asd, makes a sample tree, and shows the main job end to end in a
# private mount namespace, so nothing on this machine is touched: sync into RAM, write through
# the target, resync, a simulated crash and its recovery, unsync. Run as root.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:/root/.cargo/bin:$PATH"

if [ "$(id -u)" -ne 0 ]; then
  echo "demo/run.sh: asd mounts filesystems; run the demo as root (sudo $0)" >&2
  exit 1
fi
if [ -z "${ASD_DEMO_INSIDE:-}" ]; then
  cargo build --quiet --release -p asd-user
  exec unshare -m --propagation private env ASD_DEMO_INSIDE=1 "$0" "$@"
fi

ASD=$PWD/target/release/asd
work=$(mktemp -d /var/tmp/asd-demo-XXXXXX)
trap 'cd /; umount -R "$work/vol" 2>/dev/null || true; rm -rf "$work"' EXIT
mkdir -p "$work/vol" "$work/site/logs" "$work/site/cache"
mount -t tmpfs -o mode=1777 asd-demo "$work/vol"
target="$work/site/cache"
for i in $(seq 1 200); do head -c $((RANDOM * 4)) /dev/urandom > "$target/item-$i.bin"; done
echo "hello from disk" > "$target/readme.txt"
cat > "$work/asd.conf" <<CONF
# the demo's config: one target, the RAM area on a tmpfs
WHATTOSYNC=('$target')
VOLATILE="$work/vol"
CONF
export ASDCONF="$work/asd.conf" ASD_RUNTIME_DIR="$work/run" NO_COLOR=1

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
step "asd preview (before)"; "$ASD" preview
step "asd sync"; "$ASD" sync
echo "filesystem behind $target: $(stat -f -c %T "$target")"
step "writing through the target (lands in RAM)"
echo "written in RAM" > "$target/new.txt"; rm "$target/item-1.bin"
echo "on disk yet? $(test -e "$work/site/.cache-backup_asd/new.txt" && echo yes || echo no)"
step "asd resync"; "$ASD" resync
echo "on disk now? $(test -e "$work/site/.cache-backup_asd/new.txt" && echo yes || echo no)"
step "asd preview (running)"; "$ASD" preview
step "simulated crash: asd's mounts vanish as in a reboot, RAM is lost"
echo "unsaved" > "$target/lost.txt"
umount "$target" "$work/site/.cache-backup_asd"; umount "$work/vol"; mount -t tmpfs -o mode=1777 asd-demo "$work/vol"
step "asd sync (recovers: snapshot of the start state, then back in RAM)"; "$ASD" sync
ls -1A "$work/site" | sed 's/^/  /'
echo "lost.txt, written after the last resync, is gone as it must be: $(test -e "$target/lost.txt" && echo present || echo gone)"
step "asd unsync"; "$ASD" unsync
echo "filesystem behind $target: $(stat -f -c %T "$target")"
echo "new.txt: $(cat "$target/new.txt")"
step "asd clean"; "$ASD" clean
echo; echo "demo finished: everything written before the last resync survived the crash."
