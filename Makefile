# kasou's build, test and benchmark entry points. `make demo` and `make test` do all the
# setup themselves on a fresh Debian 12 machine (as root: Debian packages are installed with
# apt-get when missing).

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# The web console's front-end packages (xterm.js), pinned by web/package-lock.json.
WEB_MODULES := web/node_modules/.package-lock.json
WEB_VENDOR := src/kasou/api/web/vendor
DEBS := gcc make binutils qemu-system-x86 qemu-utils busybox-static cpio e2fsprogs flex bison bc \
	libelf-dev libssl-dev linux-libc-dev linux-source-6.1 util-linux xz-utils iproute2 \
	genisoimage cloud-image-utils acpica-tools fdisk dosfstools mmdebstrap chromium

.PHONY: all setup deps test lint typecheck layers unit kvm e2e bench demo clean

all: test

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)

# Byte-compile explicitly: with PYTHONDONTWRITEBYTECODE set (as on CI machines), every kasou
# start would otherwise compile its sources again (~100 ms).
setup: deps $(STAMP) $(WEB_VENDOR)/.installed
	@$(PY) -m compileall -q src bench >/dev/null

# npm ci runs only when the lock file changed since the last install, so setup needs no
# network once the packages are there. Only the dist files the page loads are copied; kasoud
# serves them from vendor/ (git-ignored), never from a CDN.
$(WEB_MODULES): web/package.json web/package-lock.json
	@command -v npm >/dev/null || { echo "installing Debian packages: nodejs npm"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nodejs npm >/dev/null; }
	cd web && npm ci --no-audit --no-fund --prefer-offline
	touch $@

$(WEB_VENDOR)/.installed: $(WEB_MODULES)
	mkdir -p $(WEB_VENDOR)
	cp web/node_modules/@xterm/xterm/lib/xterm.mjs web/node_modules/@xterm/xterm/css/xterm.css \
		web/node_modules/@xterm/addon-fit/lib/addon-fit.mjs $(WEB_VENDOR)/
	cp web/node_modules/@xterm/xterm/LICENSE $(WEB_VENDOR)/LICENSE.xterm
	cp web/node_modules/@xterm/addon-fit/LICENSE $(WEB_VENDOR)/LICENSE.addon-fit
	touch $@

deps:
	@missing=$$(for p in $(DEBS); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages: $$missing"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/ruff format --check src tests bench

typecheck: $(STAMP)
	$(VENV)/bin/mypy

layers: $(STAMP)
	$(VENV)/bin/lint-imports

test: setup
	$(PY) tests/run_tiers.py

bench: setup
	$(PY) bench/run.py

demo: setup
	$(VENV)/bin/kasou demo

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache build web/node_modules $(WEB_VENDOR)
