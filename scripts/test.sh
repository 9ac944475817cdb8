#!/usr/bin/env bash
# The project's test command (README, CI): system packages, formatting, lints, then every test.
# The real-path tests run the real default model; it is fetched into the model cache
# (outside the repo) on first use with the project's own `fetch-model` code.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/install-deps.sh
# The official OpenAI client, for the test that drives the gateway as an SDK user would.
python3 -c 'import openai' 2>/dev/null || python3 -m pip install --quiet 'openai>=1.50'
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo run --quiet --locked -p proofmesh-provider -- fetch-model >/dev/null
# One test at a time: each real-path test runs llama.cpp providers whose worker threads spin;
# two meshes at once on 2 cores oversubscribe them and run ~10x slower.
cargo test --workspace --locked -- --test-threads=1
