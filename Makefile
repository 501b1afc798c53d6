# Signet — the two entry points are `make demo` and `make test`.
CARGO ?= cargo

.PHONY: all deps build demo test lint bench fuzz clean lab lab-test deb test-packaging

all: build

deps:
	@bash scripts/install-deps.sh

build: deps
	$(CARGO) build --workspace --bins

# Sign a real PE with a SoftHSM token through client -> daemon -> agent, and verify it.
demo: build
	@bash scripts/demo.sh

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings
	$(CARGO) clippy -p signet-tests --test lab -- -D warnings

# Everything CI checks: formatting, lints, unit and end-to-end tests, then the lab's
# scenarios against a real signing VM (about 5 minutes more), then the Debian packages
# installed and checked in a Debian 12 guest under systemd (make test-packaging).
test: build lint
	$(CARGO) test --workspace
	$(MAKE) lab-test
	$(MAKE) test-packaging

# Every way of signing side by side (ratios to direct osslsigncode), throughput with
# 1/4/8 callers, the same on a token as slow as a real one (the PKCS#11 shim
# test-support/pkcs11-delay), memory on a 1 GiB input (docs/BENCHMARKS.md).
bench: deps
	@command -v curl >/dev/null && test -x /usr/bin/time || apt-get install -y -qq --no-install-recommends curl time >/dev/null
	@CARGO=$(CARGO) bash scripts/build-release.sh --bench >/dev/null
	@bash scripts/bench.sh

# Every reader of untrusted bytes under libFuzzer, FUZZ_SECONDS each (docs/FUZZING.md).
FUZZ_SECONDS ?= 600
fuzz: deps
	@bash scripts/fuzz.sh $(FUZZ_SECONDS)

# The full-system lab (docs/LAB.md): a TCG signing VM built from Debian packages with
# signet-agent, an emulated smart card hot-plugged by signetd, guest vsock through
# vhost-device-vsock; signs a PE through it and verifies it.
lab: build
	@bash lab/run.sh

# The lab's scenarios as tests (cold start, token pulled, token lost in the guest, VM
# reset, VM restarted, signetd killed), one guest at a time; the end of `make test`.
lab-test: build
	$(CARGO) test -p signet-tests --test lab -- --test-threads=1 --nocapture

# The Debian packages (packaging/README.md): signet for the Proxmox VE host,
# signet-agent for the signing VM, signet-client for build VMs, in target/debian/,
# checked with lintian. Needs debhelper and lintian (scripts/install-deps.sh).
deb:
	@bash packaging/build-debs.sh

# The packages installed with apt in a Debian 12 guest booted with systemd under QEMU
# (tests/packaging/): files and modes, the units' READY and security scores, a file
# signed through the installed signetd and agent, restart, reinstall, upgrade, remove
# and purge. About 6 minutes (TCG) once the release build and the Debian image (cached
# under target/packaging/, ~5 minutes to make) exist; the end of make test.
test-packaging: deps deb
	@bash tests/packaging/run.sh

clean:
	$(CARGO) clean
