# Fluxbase: `make run` serves (embedded PostgreSQL under .fluxbase/ unless FLUXBASE_DATABASE_URL
# is set); `make test` runs every check CI runs.
CARGO ?= cargo
TEST_THREADS ?= 6

.PHONY: run build test lint unit integration bench bench-sql bench-cdc bench-webhooks bench-fanout bench-rls bench-storage bench-cluster bench-mysql-reset bench-binlog bench-host clean deps fuzz

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
	@./scripts/disk.sh before
	ulimit -n 65536 2>/dev/null || ulimit -n $$(ulimit -Hn) 2>/dev/null; \
	$(CARGO) test --test it -- --test-threads=$(TEST_THREADS) || { ./scripts/disk.sh after; exit 1; }
	$(MAKE) fuzz

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

# The benchmarks; each prints its reference run beside Fluxbase's (and its targets).
bench: bench-host bench-sql bench-cdc bench-webhooks bench-fanout bench-rls bench-storage bench-cluster bench-mysql-reset bench-binlog

# What this machine charges for wake-ups and small socket messages (read the other ratios by it).
bench-host:
	$(CARGO) run --release -p fluxbase-bench --bin host_bench

bench-sql: deps build
	$(CARGO) run --release -p fluxbase-bench --bin sql_bench

bench-cdc: deps
	$(CARGO) run --release -p fluxbase-bench --bin cdc_bench

bench-binlog: deps
	$(CARGO) run --release -p fluxbase-bench --bin binlog_bench

bench-webhooks: deps
	$(CARGO) run --release -p fluxbase-bench --bin webhook_bench

bench-rls: deps
	$(CARGO) run --release -p fluxbase-bench --bin rls_bench

bench-mysql-reset: deps
	$(CARGO) run --release -p fluxbase-bench --bin mysql_reset_bench

# The server runs as a child process (its own RSS) with a socket per subscriber, the clients
# here: both need more than the usual 1,024 open files.
bench-fanout: deps build
	ulimit -n 65536 2>/dev/null || ulimit -n $$(ulimit -Hn) 2>/dev/null; \
	$(CARGO) run --release -p fluxbase-bench --bin fanout_bench

# Uploads and signed downloads of 1 MiB and 100 MiB files beside a plain file copy.
bench-storage: deps build
	$(CARGO) run --release -p fluxbase-bench --bin storage_bench

# One node against three in cluster mode (its own nats-server -js, from Debian's nats-server),
# then kill -9 failovers of the leading node; a socket per subscriber on each side.
bench-cluster: deps build
	ulimit -n 65536 2>/dev/null || ulimit -n $$(ulimit -Hn) 2>/dev/null; \
	$(CARGO) run --release -p fluxbase-bench --bin cluster_bench

clean:
	$(CARGO) clean
	rm -rf .fluxbase

# The fuzz targets of replication/fuzz (cargo-fuzz): `pgoutput` (the pgoutput decoder) and
# `values` (the value codec, seeded with PostgreSQL's own output from replication/fuzz/seeds).
# Always, on stable: this checks their formatting, clippy-checks and builds them (they are
# plain bins on libfuzzer-sys, whose build script needs a C++ compiler: `make test` runs this
# after `scripts/deps.sh test`; the crate is outside the workspace, so `lint` does not reach
# it) and replays the values seed corpus through the built target. With a nightly toolchain it
# then fuzzes each target under cargo-fuzz for FUZZ_SECONDS; without one nothing is fuzzed (the
# stable randomized tests in the unit tests stand in), and it says so.
FUZZ_SECONDS ?= 30
FUZZ_MANIFEST = replication/fuzz/Cargo.toml
FUZZ_STABLE_DIR = target/fuzz-stable
fuzz:
	@mkdir -p $(FUZZ_STABLE_DIR)
	$(CARGO) fmt --manifest-path $(FUZZ_MANIFEST) -- --check
	$(CARGO) clippy --manifest-path $(FUZZ_MANIFEST) --bins --target-dir $(FUZZ_STABLE_DIR) -- -D warnings
	$(CARGO) build --manifest-path $(FUZZ_MANIFEST) --bins --target-dir $(FUZZ_STABLE_DIR)
	@if $(FUZZ_STABLE_DIR)/debug/values replication/fuzz/seeds/values/* > $(FUZZ_STABLE_DIR)/replay.log 2>&1; then \
	  echo "fuzz: stable: linted and built pgoutput and values, and replayed the $$(ls replication/fuzz/seeds/values | wc -l) values seeds without a crash (not fuzzing)"; \
	else tail -40 $(FUZZ_STABLE_DIR)/replay.log; echo "fuzz: stable: the values target failed on a seed"; exit 1; fi
	@if cargo +nightly --version >/dev/null 2>&1; then \
	  command -v cargo-fuzz >/dev/null 2>&1 || cargo install cargo-fuzz --locked; \
	  mkdir -p replication/fuzz/corpus/pgoutput replication/fuzz/corpus/values; \
	  for t in pgoutput values; do \
	    seeds=; [ -d replication/fuzz/seeds/$$t ] && seeds=fuzz/seeds/$$t; \
	    if (cd replication && cargo +nightly fuzz run $$t fuzz/corpus/$$t $$seeds -- -max_total_time=$(FUZZ_SECONDS) -max_len=4096) > target/fuzz-$$t.log 2>&1; then \
	      echo "fuzz: nightly: $$t fuzzed under cargo-fuzz for $(FUZZ_SECONDS) s without a crash (log: target/fuzz-$$t.log)"; \
	    else tail -40 target/fuzz-$$t.log; echo "fuzz: nightly: the $$t fuzz target failed under cargo-fuzz"; exit 1; fi; \
	  done; \
	else \
	  echo "fuzz: no nightly toolchain here, so nothing was fuzzed; the stable randomized tests (pgoutput::tests::random_and_mutated_inputs_never_panic, values::tests::random_and_mutated_values_never_panic_and_render_json) ran in the unit tests instead"; \
	fi
