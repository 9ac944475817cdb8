#!/usr/bin/env bash
# The project's test command (README, CI): system packages, formatting, lints, then every test.
# The real-path tests run the real default model; it is fetched into the model cache
# (outside the repo) on first use with the project's own `fetch-model` code.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/install-deps.sh
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo run --quiet --locked -p proofmesh-provider -- fetch-model >/dev/null
cargo test --workspace --locked
