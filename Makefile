# Fluxbase: `make run` serves (embedded PostgreSQL under .fluxbase/ unless FLUXBASE_DATABASE_URL
# is set); `make test` runs every check CI runs.
CARGO ?= cargo
TEST_THREADS ?= 6

.PHONY: run build test lint unit integration bench bench-sql bench-cdc bench-webhooks bench-fanout bench-rls bench-storage clean deps fuzz

run: deps
	$(CARGO) build --release --bin fluxbase
	./target/release/fluxbase serve

build:
	$(CARGO) build --release --bin fluxbase

deps:
	@./scripts/deps.sh

# The integration suite holds 1,000 WebSockets (both ends in one process): `ulimit -n` is raised.
test: lint
	@./scripts/deps.sh test
	$(CARGO) test --workspace --lib --bins
	ulimit -n 65536 2>/dev/null || ulimit -n $$(ulimit -Hn) 2>/dev/null; \
	$(CARGO) test --test it -- --test-threads=$(TEST_THREADS)
	$(MAKE) fuzz

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

# The benchmarks; each prints its reference run beside Fluxbase's (and its targets).
bench: bench-sql bench-cdc bench-webhooks bench-fanout bench-rls bench-storage

bench-sql: deps build
	$(CARGO) run --release -p fluxbase-bench --bin sql_bench

bench-cdc: deps
	$(CARGO) run --release -p fluxbase-bench --bin cdc_bench

bench-webhooks: deps
	$(CARGO) run --release -p fluxbase-bench --bin webhook_bench

bench-rls: deps
	$(CARGO) run --release -p fluxbase-bench --bin rls_bench

# The server runs as a child process (its own RSS) with a socket per subscriber, the clients
# here: both need more than the usual 1,024 open files.
bench-fanout: deps build
	ulimit -n 65536 2>/dev/null || ulimit -n $$(ulimit -Hn) 2>/dev/null; \
	$(CARGO) run --release -p fluxbase-bench --bin fanout_bench

# Uploads and signed downloads of 1 MiB and 100 MiB files beside a plain file copy.
bench-storage: deps build
	$(CARGO) run --release -p fluxbase-bench --bin storage_bench

clean:
	$(CARGO) clean
	rm -rf .fluxbase

# The pgoutput decoder's fuzz target, for a bounded time (FUZZ_SECONDS). cargo-fuzz needs a
# nightly toolchain; without one the stable randomized decoder test (part of the unit tests)
# is what runs, and this says so.
FUZZ_SECONDS ?= 30
fuzz:
	@if cargo +nightly --version >/dev/null 2>&1; then \
	  command -v cargo-fuzz >/dev/null 2>&1 || cargo install cargo-fuzz --locked; \
	  mkdir -p target; \
	  if (cd replication && cargo +nightly fuzz run pgoutput -- -max_total_time=$(FUZZ_SECONDS) -max_len=4096) > target/fuzz.log 2>&1; then \
	    echo "fuzz: pgoutput decoder fuzzed for $(FUZZ_SECONDS) s without a crash (log: target/fuzz.log)"; \
	  else tail -40 target/fuzz.log; echo "fuzz: the pgoutput decoder fuzz target failed"; exit 1; fi; \
	else \
	  echo "fuzz: no nightly toolchain here; the stable randomized decoder test (pgoutput::tests::random_and_mutated_inputs_never_panic) ran in the unit tests instead"; \
	fi
