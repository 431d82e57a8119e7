# asd — build and install.
#
#   make                       build the binaries (cargo, release), man pages and completions
#   sudo make install          install under PREFIX (default /usr/local); DESTDIR is respected
#   sudo make uninstall        remove what install put there (an edited /etc/asd.conf is kept)
#   make verify-units          systemd-analyze verify on the units (needs the package systemd)
#   make deb                   the Debian package, $(TARGET_DIR)/deb/asd_<version>_<arch>.deb
#                              (dpkg-buildpackage -us -uc -b; needs debhelper)
#
# Everything generated goes under $(TARGET_DIR)/dist, never into the source tree.

PREFIX      ?= /usr/local
BINDIR      ?= $(PREFIX)/bin
LIBEXECDIR  ?= $(PREFIX)/libexec
DATADIR     ?= $(PREFIX)/share
MANDIR      ?= $(DATADIR)/man
DOCDIR      ?= $(DATADIR)/doc/asd
# asd reads /etc/asd.conf whatever the prefix.
SYSCONFDIR  ?= /etc
# systemd looks for units, user units and tmpfiles in $(PREFIX)/lib/... for /usr and /usr/local.
SYSTEMDSYSTEMUNITDIR ?= $(PREFIX)/lib/systemd/system
SYSTEMDUSERUNITDIR   ?= $(PREFIX)/lib/systemd/user
TMPFILESDIR          ?= $(PREFIX)/lib/tmpfiles.d
# polkitd reads actions from /usr/share/polkit-1/actions only, whatever the prefix.
POLKITACTIONDIR      ?= /usr/share/polkit-1/actions
BASHCOMPDIR ?= $(DATADIR)/bash-completion/completions
ZSHCOMPDIR  ?= $(DATADIR)/zsh/site-functions
FISHCOMPDIR ?= $(DATADIR)/fish/vendor_completions.d

CARGO       ?= cargo
CARGOFLAGS  ?=
TARGET_DIR  ?= $(or $(CARGO_TARGET_DIR),target)
RELEASE     := $(TARGET_DIR)/release
DIST        := $(TARGET_DIR)/dist

INSTALL      ?= install
INSTALL_PROG := $(INSTALL) -m 0755
INSTALL_DATA := $(INSTALL) -m 0644
INSTALL_DIR  := $(INSTALL) -d -m 0755

UNITS_SYSTEM := asd.service asd-helper.service asd-helper.socket
UNITS_USER   := asd.service
COMPLETIONS  := bash/asd bash/anything-sync-daemon zsh/_asd zsh/_anything-sync-daemon \
                fish/asd.fish fish/anything-sync-daemon.fish

.PHONY: all build gen install uninstall verify-units deb clean-dist

all: build gen

# `make` as yourself, then `sudo make install`: root's PATH often has no cargo, and then the
# binaries built before are used.
build:
	@if command -v $(CARGO) >/dev/null 2>&1; then \
	  echo "$(CARGO) build --release --workspace $(CARGOFLAGS)"; \
	  $(CARGO) build --release --workspace $(CARGOFLAGS); \
	elif [ -x $(RELEASE)/asd ] && [ -x $(RELEASE)/asd-helper ] && [ -x $(RELEASE)/asd-gen ]; then \
	  echo "$(CARGO) not found; installing the binaries already built in $(RELEASE)"; \
	else \
	  echo "$(CARGO) not found: run make as the user who has the Rust toolchain, then sudo make install" >&2; \
	  exit 1; \
	fi

# Man page asd(1) and completions come from the clap definition (asd-gen); regenerated only when
# asd-gen or the hand-written pages changed, so that `sudo make install` after `make` writes
# nothing into the build tree.
gen: build
	@if [ -f $(DIST)/.stamp ] && \
	   [ -z "$$(find $(RELEASE)/asd-gen man Makefile -newer $(DIST)/.stamp 2>/dev/null | head -n1)" ]; then \
	  :; \
	else \
	  set -e; rm -rf $(DIST)/man $(DIST)/completions; \
	  mkdir -p $(DIST)/man/man5 $(DIST)/man/man8 $(DIST)/completions; \
	  echo "$(RELEASE)/asd-gen man $(DIST)/man/man1"; \
	  $(RELEASE)/asd-gen man $(DIST)/man/man1 >/dev/null; \
	  echo "$(RELEASE)/asd-gen completions $(DIST)/completions"; \
	  $(RELEASE)/asd-gen completions $(DIST)/completions >/dev/null; \
	  cp man/asd.conf.5 $(DIST)/man/man5/; \
	  cp man/asd-helper.8 $(DIST)/man/man8/; \
	  touch $(DIST)/.stamp; \
	fi

# Units get their paths filled in as they are installed.
subst_paths = sed -e 's|@PREFIX@|$(PREFIX)|g' -e 's|@BINDIR@|$(BINDIR)|g' \
                  -e 's|@LIBEXECDIR@|$(LIBEXECDIR)|g' $(1) > $(2) && chmod 0644 $(2)

install: all
	@# Binaries built with the test-hooks feature (cargo test --release --features ...) abort on an
	@# ASD_TEST_* variable: never install those (with no cargo in root's PATH, build runs no cargo).
	@for b in asd asd-helper asd-helper-call; do \
	  if grep -qa ASD_TEST_ $(RELEASE)/$$b; then \
	    echo "$(RELEASE)/$$b was built with test hooks; run make again to rebuild it" >&2; exit 1; \
	  fi; \
	done
	$(INSTALL_DIR) $(DESTDIR)$(BINDIR) $(DESTDIR)$(LIBEXECDIR)
	$(INSTALL_PROG) $(RELEASE)/asd $(DESTDIR)$(BINDIR)/asd
	ln -sfn asd $(DESTDIR)$(BINDIR)/anything-sync-daemon
	$(INSTALL_PROG) $(RELEASE)/asd-helper $(DESTDIR)$(LIBEXECDIR)/asd-helper
	$(INSTALL_PROG) $(RELEASE)/asd-helper-call $(DESTDIR)$(LIBEXECDIR)/asd-helper-call
	$(INSTALL_DIR) $(DESTDIR)$(SYSTEMDSYSTEMUNITDIR) $(DESTDIR)$(SYSTEMDUSERUNITDIR) $(DESTDIR)$(TMPFILESDIR)
	for u in $(UNITS_SYSTEM); do $(call subst_paths,systemd/system/$$u,$(DESTDIR)$(SYSTEMDSYSTEMUNITDIR)/$$u) || exit 1; done
	for u in $(UNITS_USER); do $(call subst_paths,systemd/user/$$u,$(DESTDIR)$(SYSTEMDUSERUNITDIR)/$$u) || exit 1; done
	$(INSTALL_DATA) systemd/asd.tmpfiles $(DESTDIR)$(TMPFILESDIR)/asd.conf
	$(INSTALL_DIR) $(DESTDIR)$(POLKITACTIONDIR) $(DESTDIR)$(DOCDIR)
	$(INSTALL_DATA) polkit/io.asd.helper.policy $(DESTDIR)$(POLKITACTIONDIR)/io.asd.helper.policy
	$(INSTALL_DATA) polkit/50-asd-helper.rules.example $(DESTDIR)$(DOCDIR)/50-asd-helper.rules.example
	$(INSTALL_DATA) systemd/asd.conf $(DESTDIR)$(DOCDIR)/asd.conf.example
	$(INSTALL_DIR) $(DESTDIR)$(SYSCONFDIR)
	@if [ -e $(DESTDIR)$(SYSCONFDIR)/asd.conf ]; then \
	  echo "keeping the existing $(DESTDIR)$(SYSCONFDIR)/asd.conf (the default is in $(DOCDIR)/asd.conf.example)"; \
	else \
	  echo "$(INSTALL_DATA) systemd/asd.conf $(DESTDIR)$(SYSCONFDIR)/asd.conf"; \
	  $(INSTALL_DATA) systemd/asd.conf $(DESTDIR)$(SYSCONFDIR)/asd.conf; \
	fi
	$(INSTALL_DIR) $(DESTDIR)$(MANDIR)/man1 $(DESTDIR)$(MANDIR)/man5 $(DESTDIR)$(MANDIR)/man8
	$(INSTALL_DATA) $(DIST)/man/man1/asd.1 $(DIST)/man/man1/anything-sync-daemon.1 $(DESTDIR)$(MANDIR)/man1/
	$(INSTALL_DATA) $(DIST)/man/man5/asd.conf.5 $(DESTDIR)$(MANDIR)/man5/
	$(INSTALL_DATA) $(DIST)/man/man8/asd-helper.8 $(DESTDIR)$(MANDIR)/man8/
	$(INSTALL_DIR) $(DESTDIR)$(BASHCOMPDIR) $(DESTDIR)$(ZSHCOMPDIR) $(DESTDIR)$(FISHCOMPDIR)
	$(INSTALL_DATA) $(DIST)/completions/bash/asd $(DIST)/completions/bash/anything-sync-daemon $(DESTDIR)$(BASHCOMPDIR)/
	$(INSTALL_DATA) $(DIST)/completions/zsh/_asd $(DIST)/completions/zsh/_anything-sync-daemon $(DESTDIR)$(ZSHCOMPDIR)/
	$(INSTALL_DATA) $(DIST)/completions/fish/asd.fish $(DIST)/completions/fish/anything-sync-daemon.fish $(DESTDIR)$(FISHCOMPDIR)/
	@if [ -z "$(DESTDIR)" ]; then \
	  echo; \
	  echo "Installed. Admin: systemctl daemon-reload && systemctl enable --now asd-helper.socket"; \
	  echo "           (system-wide mode instead: edit /etc/asd.conf, systemctl enable --now asd)"; \
	  echo "Each user: systemctl --user enable --now asd, edit ~/.config/asd/asd.conf, asd p"; \
	fi

uninstall:
	rm -f $(DESTDIR)$(BINDIR)/asd $(DESTDIR)$(BINDIR)/anything-sync-daemon
	rm -f $(DESTDIR)$(LIBEXECDIR)/asd-helper $(DESTDIR)$(LIBEXECDIR)/asd-helper-call
	for u in $(UNITS_SYSTEM); do rm -f $(DESTDIR)$(SYSTEMDSYSTEMUNITDIR)/$$u; done
	for u in $(UNITS_USER); do rm -f $(DESTDIR)$(SYSTEMDUSERUNITDIR)/$$u; done
	rm -f $(DESTDIR)$(TMPFILESDIR)/asd.conf
	rm -f $(DESTDIR)$(POLKITACTIONDIR)/io.asd.helper.policy
	@if [ -e $(DESTDIR)$(SYSCONFDIR)/asd.conf ] && ! cmp -s systemd/asd.conf $(DESTDIR)$(SYSCONFDIR)/asd.conf; then \
	  echo "keeping $(DESTDIR)$(SYSCONFDIR)/asd.conf: it was edited"; \
	else \
	  echo "rm -f $(DESTDIR)$(SYSCONFDIR)/asd.conf"; rm -f $(DESTDIR)$(SYSCONFDIR)/asd.conf; \
	fi
	rm -f $(DESTDIR)$(DOCDIR)/50-asd-helper.rules.example $(DESTDIR)$(DOCDIR)/asd.conf.example
	-rmdir $(DESTDIR)$(DOCDIR) 2>/dev/null
	rm -f $(DESTDIR)$(MANDIR)/man1/asd.1 $(DESTDIR)$(MANDIR)/man1/anything-sync-daemon.1
	rm -f $(DESTDIR)$(MANDIR)/man5/asd.conf.5 $(DESTDIR)$(MANDIR)/man8/asd-helper.8
	rm -f $(DESTDIR)$(BASHCOMPDIR)/asd $(DESTDIR)$(BASHCOMPDIR)/anything-sync-daemon
	rm -f $(DESTDIR)$(ZSHCOMPDIR)/_asd $(DESTDIR)$(ZSHCOMPDIR)/_anything-sync-daemon
	rm -f $(DESTDIR)$(FISHCOMPDIR)/asd.fish $(DESTDIR)$(FISHCOMPDIR)/anything-sync-daemon.fish

# systemd-analyze verify (package systemd) on the units as built, with ExecStart= pointing at
# the built binaries (verify checks that they exist) and MANPATH at the built man pages (verify
# checks Documentation=man: links).
VERIFY := $(DIST)/verify
verify-units: gen
	@rm -rf $(VERIFY) && mkdir -p $(VERIFY)/system $(VERIFY)/user
	@for u in $(UNITS_SYSTEM); do \
	  $(call subst_verify,systemd/system/$$u,$(VERIFY)/system/$$u); done
	@for u in $(UNITS_USER); do $(call subst_verify,systemd/user/$$u,$(VERIFY)/user/$$u); done
	@man=$$(command -v man >/dev/null && echo yes || echo no); \
	export MANPATH=$(abspath $(DIST)/man) SYSTEMD_LOG_LEVEL=notice; \
	systemd-analyze verify --man=$$man $(addprefix $(VERIFY)/system/,$(UNITS_SYSTEM)) && \
	XDG_RUNTIME_DIR=$(abspath $(VERIFY)) systemd-analyze verify --man=$$man --user $(VERIFY)/user/asd.service && \
	echo "systemd-analyze verify: $(UNITS_SYSTEM) and user asd.service OK"

subst_verify = sed -e 's|@PREFIX@|$(PREFIX)|g' -e 's|@BINDIR@|$(abspath $(RELEASE))|g' \
                   -e 's|@LIBEXECDIR@|$(abspath $(RELEASE))|g' $(1) > $(2)

# The Debian package (debian/): dpkg-buildpackage in this tree, with everything it writes next
# to the tree (.deb, .buildinfo, .changes) put in $(DEBDIR) instead. It builds in the same cargo
# target dir as `make`, so a release build already made is reused. Its leftovers in debian/
# (ignored by git) go at the next `debian/rules clean`.
DEBDIR ?= $(TARGET_DIR)/deb
deb:
	@command -v dpkg-buildpackage >/dev/null && command -v dh >/dev/null || { \
	  echo "make deb needs debhelper (and build-essential): apt-get install debhelper build-essential" >&2; exit 1; }
	rm -rf $(DEBDIR) && mkdir -p $(DEBDIR)
	@set -e; d=$(abspath $(DEBDIR)); \
	base=asd_$$(dpkg-parsechangelog -SVersion)_$$(dpkg-architecture -qDEB_HOST_ARCH); \
	set -x; \
	CARGO_TARGET_DIR=$(abspath $(TARGET_DIR)) ASD_DEB_DESTDIR=$$d dpkg-buildpackage -us -uc -b \
	  --buildinfo-option=-u$$d --buildinfo-file=$$d/$$base.buildinfo \
	  --changes-option=-u$$d --changes-file=$$d/$$base.changes
	@echo; ls -1 $(abspath $(DEBDIR))/*.deb

clean-dist:
	rm -rf $(DIST)
