#!/usr/bin/env bash
# The test command (README.md): installs what the tests need, then runs them all.
# Run as root on a Debian/Ubuntu machine: mounts, users and services are real.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:/root/.cargo/bin:$PATH"

if [ "$(id -u)" -ne 0 ]; then
  echo "tests/run.sh: the tests mount filesystems and create users; run it as root (sudo $0)" >&2
  exit 1
fi

need=()
for pkg_cmd in rsync:rsync zstd:zstd attr:setfattr e2fsprogs:mkfs.ext4 util-linux:unshare \
               dbus-daemon:dbus-daemon polkitd:pkcheck python3:python3; do
  pkg=${pkg_cmd%%:*}; cmd=${pkg_cmd#*:}
  command -v "$cmd" >/dev/null 2>&1 || need+=("$pkg")
done
[ -x /usr/lib/polkit-1/polkitd ] || need+=(polkitd)
if [ ${#need[@]} -gt 0 ]; then
  echo "== installing: ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${need[@]}" >/dev/null
fi

echo "== test users"
# Created up front (idempotently) so parallel tests never race on useradd.
for u in asdtest1 asdalice asdbob; do
  id "$u" >/dev/null 2>&1 || useradd -m -s /bin/sh "$u"
  mkdir -p "/home/$u" && chown "$u:" "/home/$u"
done

echo "== format and lint"
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --quiet -- -D warnings

echo "== tests"
# Tests that mount run in their own mount namespaces; several at once are fine.
cargo test --workspace -- --test-threads="${ASD_TEST_THREADS:-4}" "$@"
