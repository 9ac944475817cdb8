#!/usr/bin/env bash
# The project's test command (README, CI): system packages, formatting, lints, then every test.
# The real-path tests run the real default model; it is fetched into the model cache
# (outside the repo) on first use with the project's own `fetch-model` code.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/install-deps.sh
# The official OpenAI clients (Python, Node), for the tests that drive the gateway as SDK users
# would; PyYAML and check-jsonschema for the offline compose check.
python3 -c 'import openai, yaml' 2>/dev/null || python3 -m pip install --quiet 'openai>=1.50' pyyaml
npm ci --prefix scripts/node --no-audit --no-fund --loglevel=error
python3 scripts/check_compose.py
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo run --quiet --locked -p proofmesh-provider -- fetch-model >/dev/null
# The OpenAPI freshness check is gateway/tests/operations.rs (committed_openapi_document_is_fresh).
# One test at a time: each real-path test runs llama.cpp providers whose worker threads spin;
# two meshes at once on 2 cores oversubscribe them and run ~10x slower. (No doc-tests: the
# crates have no examples in docs, and their empty runs would end the log on "0 passed".)
log="$(mktemp)"
trap 'rm -f "$log"' EXIT
cargo test --workspace --locked --lib --bins --tests -- --test-threads=1 2>&1 | tee "$log"
# The API against its own OpenAPI document: no server error, no schema violation.
scripts/schemathesis.sh 50 2>&1 | tail -n 25
awk '/^test result:/ { p += $4; f += $6 } END { printf "tests: %d passed, %d failed\n", p, f }' "$log"
