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
               dbus-daemon:dbus-daemon polkitd:pkcheck python3:python3 \
               btrfs-progs:mkfs.btrfs xfsprogs:mkfs.xfs; do
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
# Created up front (idempotently) so parallel tests never race on useradd, the way Fedora, Arch
# and Debian 12's adduser make them: private homes (0700), and Ubuntu's 0750 for the users named
# *ubu. A home left 0755 by an older run of these tests is made private again.
# alicedeb has the 0755 home of Debian's plain useradd.
# asdfs700/asdfs750/asdfs755 are the home file system matrix's users, one per home mode.
# asdstorm0001.. and asdstormhog are the login storm's (asd-user/tests/storm.rs): ASD_STORM_USERS
# users at once (default 400; 1000 for the whole goal), all 0700 whatever their number ends in,
# made once per machine (useradd takes about 0.1 s each here), so the loop asks getent and stat
# once for all.
declare -A home=() want=()
while IFS=: read -r name _ _ _ _ dir _; do home[$name]=$dir; done < <(getent passwd)
for u in asdtest1 asdalice asdbob alice bob asdubu aliceubu alicedeb asdfs700 asdfs750 asdfs755 \
         asdstormhog $(seq -f 'asdstorm%04g' 1 "${ASD_STORM_USERS:-400}"); do
  case $u in asdstorm*) mode=0700 ;; *ubu|*750) mode=0750 ;; *deb|*755) mode=0755 ;; *) mode=0700 ;; esac
  if [ -z "${home[$u]:-}" ]; then
    useradd -m -s /bin/sh -K HOME_MODE=$mode "$u"
    home[$u]=$(getent passwd "$u" | cut -d: -f6)
  fi
  want[${home[$u]}]=${mode#0}
done
while read -r have dir; do
  [ "$have" = "${want[$dir]}" ] || chmod "${want[$dir]}" "$dir"
done < <(stat -c '%a %n' "${!want[@]}")

# The tests run asd, the helper's client and test binaries as those users: the build must be
# reachable by them. A checkout under a private home (/root is 0700) builds elsewhere.
if ! setpriv --reuid nobody --regid nogroup --clear-groups test -x "$PWD" 2>/dev/null; then
  export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-/var/cache/asd-test-target}
  mkdir -p "$CARGO_TARGET_DIR" && chmod 0755 "$CARGO_TARGET_DIR"
  echo "== $PWD is private to root: building in $CARGO_TARGET_DIR"
fi

# The independent varlink client (PyPI `varlink`) for the protocol test, in a venv of its own
# when the system Python lacks it (pip may not install into a distribution's Python).
if ! python3 -c 'import varlink' 2>/dev/null; then
  venv=/var/cache/asd-test-venv
  if ! "$venv/bin/python3" -c 'import varlink' 2>/dev/null; then
    echo "== installing the PyPI varlink client into $venv"
    python3 -m venv "$venv" 2>/dev/null || {
      apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
      python3 -m venv "$venv"
    }
    "$venv/bin/python3" -m pip install --quiet varlink
  fi
  export ASD_TEST_PYTHON="$venv/bin/python3"
fi

# The crash tests stop asd at its test hooks (ASD_TEST_* variables), which exist only with the
# test-hooks feature: the tests are built with it, release binaries never.
hooks=(--features asd-user/test-hooks)

echo "== format and lint"
cargo fmt --all -- --check
# Both builds: without the feature (what ships) and with it (what the tests run).
cargo clippy --workspace --all-targets --quiet -- -D warnings
cargo clippy --workspace --all-targets --quiet "${hooks[@]}" -- -D warnings

echo "== release binaries hold no test hooks"
# What make builds and installs: not one ASD_TEST_ string may be in it (grep, not strings: binutils
# may be missing on a fresh machine).
cargo build --release --workspace --quiet
release="${CARGO_TARGET_DIR:-target}/release"
for bin in asd asd-helper asd-helper-call; do
  n=$(grep -ac ASD_TEST_ "$release/$bin" || true)
  if [ "$n" != 0 ]; then
    echo "tests/run.sh: $release/$bin holds $n ASD_TEST_ strings: test hooks in a release build" >&2
    exit 1
  fi
  echo "$release/$bin: no ASD_TEST_"
done

echo "== tests"
# Tests that mount run in their own mount namespaces; several at once are fine.
cargo test --workspace "${hooks[@]}" -- --test-threads="${ASD_TEST_THREADS:-4}" "$@"

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
