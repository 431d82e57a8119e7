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

# ---- end-to-end on real systemd (tests/e2e/run.sh) -------------------------------------------
# Boots a Debian 12 container with systemd-nspawn (root file system built once with debootstrap
# and cached in /var/cache/asd-e2e), installs asd into it with `make install DESTDIR=...`, and
# runs root's asd.service, asd-helper.socket and two users' asd.service there.
# ASD_SKIP_E2E=1 skips it (loudly); ASD_E2E_PARTS=system runs only install + system mode.
if [ "${ASD_SKIP_E2E:-0}" = 1 ]; then
  echo
  echo "####################################################################################"
  echo "##  END-TO-END TESTS SKIPPED (ASD_SKIP_E2E=1): the units, make install            ##"
  echo "##  and the daemons under real systemd were NOT tested.                           ##"
  echo "##  Unset ASD_SKIP_E2E to run them.                                               ##"
  echo "####################################################################################"
  echo
else
  echo "== end-to-end (real systemd in a container: tests/e2e/run.sh)"
  ./tests/e2e/run.sh
fi
# ---- end of end-to-end block -----------------------------------------------------------------
