# Signet — the two entry points are `make demo` and `make test`.
CARGO ?= cargo

.PHONY: all deps build demo test lint bench clean

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

# Everything CI checks: formatting, lints, unit and end-to-end tests.
test: build lint
	$(CARGO) test --workspace

# Time per signature along the job path and memory on a 1 GiB input (docs/BENCHMARKS.md).
bench: deps
	@command -v hyperfine >/dev/null || apt-get install -y -qq --no-install-recommends hyperfine curl time >/dev/null
	$(CARGO) build --release --workspace --bins
	@bash scripts/bench.sh

clean:
	$(CARGO) clean
