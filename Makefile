# Fluxbase: `make run` serves (embedded PostgreSQL under .fluxbase/ unless FLUXBASE_DATABASE_URL
# is set); `make test` runs every check CI runs.
CARGO ?= cargo
TEST_THREADS ?= 6

.PHONY: run build test lint unit integration bench clean deps

run: deps
	$(CARGO) build --release --bin fluxbase
	./target/release/fluxbase serve

build:
	$(CARGO) build --release --bin fluxbase

deps:
	@./scripts/deps.sh

test: lint
	@./scripts/deps.sh test
	$(CARGO) test --workspace --lib --bins
	$(CARGO) test --test it -- --test-threads=$(TEST_THREADS)

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

bench: deps build
	$(CARGO) run --release -p fluxbase-bench --bin sql_bench

clean:
	$(CARGO) clean
	rm -rf .fluxbase
