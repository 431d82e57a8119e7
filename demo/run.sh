#!/usr/bin/env bash
# The demo (README.md): builds asd, then shows its two modes end to end in a private mount
# namespace, so that nothing mounted here is seen outside and nothing outside its scratch
# directory is changed (besides a throwaway user for part 2, removed at the end). Run as root.
#
#   Part 1, root's system-wide mode (as the original asd): sync a sample tree into RAM, write
#   through it, resync, a simulated crash and its recovery, unsync.
#   Part 2, per-user mode: the mount helper on a socket, a user with a private home keeping a
#   directory of theirs in RAM through it with an unprivileged asd, the refusal when that
#   user names a directory that is not theirs, and the clean stop.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:/root/.cargo/bin:$PATH"

if [ "$(id -u)" -ne 0 ]; then
  echo "demo/run.sh: asd mounts filesystems and the demo creates a user; run it as root (sudo $0)" >&2
  exit 1
fi
if [ -z "${ASD_DEMO_INSIDE:-}" ]; then
  cargo build --quiet --release -p asd-user -p asd-helper
  exec unshare -m --propagation private env ASD_DEMO_INSIDE=1 "$0" "$@"
fi

RELEASE=$(cd "${CARGO_TARGET_DIR:-target}/release" && pwd)
DEMO_USER=asd-demo
DEMO_GECOS="asd demo (throwaway user of demo/run.sh)"
work=$(mktemp -d /var/tmp/asd-demo-XXXXXX)
chmod 0755 "$work" # the demo user reaches their copy of asd, the helper's socket and the RAM area
helper_pid=""
user_made=0

cleanup() {
  local rc=$?
  cd /
  if [ -n "$helper_pid" ]; then kill "$helper_pid" 2>/dev/null && wait "$helper_pid" 2>/dev/null; fi
  # Everything mounted here lives in this namespace and goes with it; unmount it first anyway so
  # that removing the scratch dir and the user's home never descends into a mount.
  findmnt -rn -o TARGET | grep -E "^($work|/home/$DEMO_USER)(/|$)" | sort -r |
    while read -r m; do umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || true; done
  if [ "$user_made" = 1 ]; then userdel -r "$DEMO_USER" >/dev/null 2>&1 || true; fi
  rm -rf --one-file-system "$work"
  return $rc
}
trap cleanup EXIT

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
part() { printf '\n\033[1;4m%s\033[0m\n' "$*"; }
# The mounts under the given paths, as findmnt sees them in this namespace (first mount options).
mounts() {
  local m
  m=$(findmnt -rn -o TARGET,FSTYPE,OPTIONS | grep -E "^($(IFS='|'; echo "$*"))(/| )" |
    awk '{ n = split($3, o, ","); opts = o[1]; for (i = 2; i <= n && i <= 4; i++) opts = opts "," o[i]
           printf "  %-52s %-6s %s\n", $1, $2, opts }' || true)
  printf 'mounts now:\n%s\n' "${m:-  (none)}"
}

# ---------------------------------------------------------------------------------------------
part "Part 1: root's system-wide mode (as the original asd)"

ASD=$RELEASE/asd
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
export NO_COLOR=1
root_env=(env ASDCONF="$work/asd.conf" ASD_RUNTIME_DIR="$work/run")

step "asd preview (before)"; "${root_env[@]}" "$ASD" preview
step "asd sync"; "${root_env[@]}" "$ASD" sync
echo "filesystem behind $target: $(stat -f -c %T "$target")"
mounts "$work/site"
step "writing through the target (lands in RAM)"
echo "written in RAM" > "$target/new.txt"; rm "$target/item-1.bin"
echo "on disk yet? $(test -e "$work/site/.cache-backup_asd/new.txt" && echo yes || echo no)"
step "asd resync"; "${root_env[@]}" "$ASD" resync
echo "on disk now? $(test -e "$work/site/.cache-backup_asd/new.txt" && echo yes || echo no)"
step "asd preview (running)"; "${root_env[@]}" "$ASD" preview
step "simulated crash: asd's mounts vanish as in a reboot, RAM is lost"
echo "unsaved" > "$target/lost.txt"
umount "$target" "$work/site/.cache-backup_asd"; umount "$work/vol"; mount -t tmpfs -o mode=1777 asd-demo "$work/vol"
step "asd sync (recovers: snapshot of the start state, then back in RAM)"; "${root_env[@]}" "$ASD" sync
ls -1A "$work/site" | sed 's/^/  /'
echo "lost.txt, written after the last resync, is gone as it must be: $(test -e "$target/lost.txt" && echo present || echo gone)"
step "asd unsync"; "${root_env[@]}" "$ASD" unsync
echo "filesystem behind $target: $(stat -f -c %T "$target")"
echo "new.txt: $(cat "$target/new.txt")"
mounts "$work/site"
step "asd clean"; "${root_env[@]}" "$ASD" clean
echo; echo "part 1 done: everything written before the last resync survived the crash."

# ---------------------------------------------------------------------------------------------
part "Part 2: per-user mode (an unprivileged asd; a small helper makes only the mounts)"

step "a throwaway user, $DEMO_USER, with a private home (useradd -m, 0700)"
if id "$DEMO_USER" >/dev/null 2>&1; then
  # Left by a demo that was killed: reuse it, but never someone else's account of that name.
  if [ "$(getent passwd "$DEMO_USER" | cut -d: -f5)" != "$DEMO_GECOS" ]; then
    echo "demo/run.sh: a user named $DEMO_USER exists and was not made by this demo; not touching it" >&2
    exit 1
  fi
  echo "(reusing the $DEMO_USER left by an earlier run)"
else
  useradd -m -K HOME_MODE=0700 -s /bin/sh -c "$DEMO_GECOS" "$DEMO_USER"
fi
user_made=1
home=$(getent passwd "$DEMO_USER" | cut -d: -f6)
chmod 0700 "$home"
echo "$(id "$DEMO_USER")"
echo "home: $(stat -c '%n %A %U' "$home")"

step "asd-helper, the mount helper, listening on a socket of its own"
# On an installed system it is asd-helper.socket (/run/asd/io.asd.Helper), started by systemd on
# demand as its own system user. Here it runs as root in the demo's namespace, on a socket in the
# scratch dir. No system bus
# is given, so the helper's built-in rule applies instead of polkit's: a user's own directories
# in their home, nothing else.
sock=$work/helper/io.asd.Helper
mkdir -p "$work/helper"
DBUS_SYSTEM_BUS_ADDRESS=unix:path=/nonexistent/asd-demo-no-bus \
  "$RELEASE/asd-helper" --socket "$sock" --state-dir "$work/helper/state" 2>"$work/helper.log" &
helper_pid=$!
for _ in $(seq 1 100); do [ -S "$sock" ] && break; sleep 0.1; done
[ -S "$sock" ] || { echo "the helper did not start:"; cat "$work/helper.log"; exit 1; }
echo "asd-helper (pid $helper_pid, root) listens on $(stat -c '%n, mode %a' "$sock")"

# What the user runs: their own copy of asd and of asd-helper-call (the helper's debugging
# client; the build may sit in root's private home), their runtime dir (a login session
# would give them /run/user/UID), and the helper's socket.
install -m 0755 "$ASD" "$work/asd"
install -m 0755 "$RELEASE/asd-helper-call" "$work/asd-helper-call"
install -d -m 0700 -o "$DEMO_USER" -g "$DEMO_USER" "$work/xdg-$DEMO_USER"
as_user() {
  setpriv --reuid "$DEMO_USER" --regid "$DEMO_USER" --init-groups -- \
    env -i HOME="$home" USER="$DEMO_USER" PATH=/usr/bin:/bin NO_COLOR=1 \
    XDG_RUNTIME_DIR="$work/xdg-$DEMO_USER" ASD_HELPER_SOCKET="$sock" ASD="$work/asd" CALL="$work/asd-helper-call" \
    bash -c "cd && $1"
}
show() { printf '%s$ %s\n' "$DEMO_USER" "$1"; as_user "$1"; }

step "$DEMO_USER's notes and config (~/.config/asd/asd.conf)"
as_user "mkdir -p ~/notes/2026 ~/.config/asd && echo 'first note' > ~/notes/todo.txt &&
         echo 'from january' > ~/notes/2026/jan.txt &&
         printf '%s\n' 'WHATTOSYNC=(~/notes)' 'VOLATILE=$work/vol' > ~/.config/asd/asd.conf"
show "cat ~/.config/asd/asd.conf"

step "$DEMO_USER names a directory that is not theirs: root's $target"
as_user "printf '%s\n' \"WHATTOSYNC=('$target')\" 'VOLATILE=$work/vol' > ~/.config/asd/not-mine.conf"
show "ASDCONF=~/.config/asd/not-mine.conf \$ASD sync" && {
  echo "demo/run.sh: asd synced a directory that is not the user's" >&2
  exit 1
}
echo "(refused by asd; and the helper, asked directly for the same mount with its debugging"
echo " client asd-helper-call, refuses it too: it checks who asks, from the socket, and who owns it)"
as_user "\$CALL PrepareArea '{\"volatile\":\"$work/vol\"}'" >/dev/null
show "\$CALL BindBackup '{\"target\":\"$target\",\"mode\":\"copy\"}'" && {
  echo "demo/run.sh: the helper mounted a directory that is not the user's" >&2
  exit 1
}
echo "$target is untouched: $(stat -f -c %T "$target")"
mounts "$work/site"

step "$DEMO_USER runs asd sync (as $DEMO_USER: asd asks the helper for each mount)"
show '$ASD sync'
echo "filesystem behind $home/notes: $(stat -f -c %T "$home/notes")"
echo "RAM area: $(stat -c '%n %A %U' "$work/vol/asd-$DEMO_USER")"
mounts "$home"

step "writing through ~/notes (lands in RAM), then asd resync (written back, as $DEMO_USER)"
show "echo 'written in RAM' > ~/notes/new.txt && \$ASD resync"
echo "on disk: $(stat -c '%n, owner %U' "$home/.notes-backup_asd/new.txt")"

step "asd preview as $DEMO_USER"
show '$ASD preview'

step "$DEMO_USER runs asd unsync: written back, unmounted, nothing of asd's left"
show '$ASD unsync'
echo "filesystem behind $home/notes: $(stat -f -c %T "$home/notes")"
echo "new.txt on disk: $(cat "$home/notes/new.txt")"
left=$(cd "$home" && ls -d .notes-backup_asd* 2>/dev/null || true)
echo "beside ~/notes: ${left:-nothing (no backup dir, no start clone)}"
mounts "$home" "$work/site"

step "what the helper decided (its log)"
# (The warning about polkit is expected here: the demo gives the helper no system bus.)
sed -e 's/^[0-9T:.-]*Z *//' -e 's/^/  /' "$work/helper.log"

echo
echo "demo finished: root's and $DEMO_USER's data in RAM and back, the crash recovered, the"
echo "directory that was not $DEMO_USER's refused, and nothing left mounted. Removing $DEMO_USER."
