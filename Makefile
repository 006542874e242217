# amiforge: `make build` builds the default recipe, `make test` runs every test tier.
# Both install what they need first (Debian 12, as root): apt packages and a virtualenv.

SHELL := /bin/bash
VENV := .venv
RECIPE ?= recipes/debian-13-minimal.yaml
PYTEST_ARGS ?=

# Debian packages amiforge and its tests use. The venv is made from Debian's python3 with
# system site-packages, so python3-guestfs (`build audit`) is importable in it; libguestfs
# boots its appliance with the host's kernel (linux-image-amd64).
# arm64 (Graviton) images: qemu-user through binfmt_misc runs the image's programs during
# the build (patchelf readies the host's dpkg-deb and dash to stand in for the slowest);
# qemu-system-arm and AAVMF (qemu-efi-aarch64) boot them.
APT_PACKAGES := mmdebstrap qemu-utils qemu-system-x86 ovmf grub-common grub-pc-bin \
	grub-efi-amd64-bin mtools dosfstools fdisk e2fsprogs xfsprogs util-linux \
	python3 python3-venv python3-pip openssh-client openssl ca-certificates gpgv \
	python3-guestfs linux-image-amd64 \
	qemu-user-static binfmt-support arch-test qemu-system-arm qemu-efi-aarch64 patchelf

.PHONY: build test check unit lint deps venv bench clean

build: deps venv
	$(VENV)/bin/build $(RECIPE)

# Every tier. The builds and boots share session fixtures, so they run in one session,
# except the Graviton (arm64) ones: their emulated builds keep one core busy for minutes
# and share nothing with the rest, so they run alongside (their output follows the
# rest's). Then the unit tier, on both cores.
ARM64_LOG := $(or $(TMPDIR),/tmp)/amiforge-arm64-tests.log
test: deps venv lint
	@$(VENV)/bin/pytest -m "arm64" -p no:cacheprovider $(PYTEST_ARGS) > $(ARM64_LOG) 2>&1 & \
	arm64=$$!; trap 'kill $$arm64 2>/dev/null' EXIT; \
	$(VENV)/bin/pytest -m "not unit and not arm64" $(PYTEST_ARGS); rest=$$?; \
	wait $$arm64; arm64_status=$$?; trap - EXIT; \
	echo "==> the arm64 tests (run alongside):"; cat $(ARM64_LOG); \
	for status in $$rest $$arm64_status; do \
		case $$status in 0|5) ;; *) exit $$status ;; esac; done  # 5: none selected
	$(VENV)/bin/pytest -m unit -n 2 $(PYTEST_ARGS)

# The fast tier: every test not marked integration or boot (seconds, no build).
check: venv lint
	$(VENV)/bin/pytest -m unit -q -n 2 $(PYTEST_ARGS)

unit: check

lint: venv
	$(VENV)/bin/ruff check builder tests bench

deps:
	@mountpoint -q /proc/sys/fs/binfmt_misc || mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
	@missing=$$(for p in $(APT_PACKAGES); do \
		dpkg-query -W -f='$${db:Status-Abbrev}' $$p 2>/dev/null | grep -q '^ii' || echo $$p; \
	done); \
	if [ -n "$$missing" ]; then \
		echo "==> installing Debian packages:" $$missing; \
		apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
			--no-install-recommends $$missing; \
	fi
	@test -e /proc/sys/fs/binfmt_misc/qemu-aarch64 || update-binfmts --enable qemu-aarch64

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	@test -x $(VENV)/bin/python || /usr/bin/python3 -m venv --system-site-packages $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[test]'
	@touch $@

bench: deps venv
	$(VENV)/bin/python bench/run.py

clean:
	rm -rf out .pytest_cache
