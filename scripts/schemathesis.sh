#!/usr/bin/env bash
# Fuzzes the gateway's HTTP API from its own OpenAPI document with schemathesis (PyPI, 4.x):
# a gateway and one provider on loopback (mDNS off), then every documented operation with
# generated valid and invalid inputs. Fails on any server error (5xx) or response that violates
# the document. Bounded: --max-examples per operation, and generation capped by max_tokens in the
# schema's own limits. Usage: scripts/schemathesis.sh [MAX_EXAMPLES]   (default 60)
set -euo pipefail
cd "$(dirname "$0")/.."
examples="${1:-60}"
python3 -c 'import schemathesis' 2>/dev/null || python3 -m pip install --quiet 'schemathesis>=4,<5'
target="${CARGO_TARGET_DIR:-target}/debug"
cargo build --quiet --locked -p proofmesh-gateway -p proofmesh-provider
model="$(cargo run --quiet --locked -p proofmesh-provider -- fetch-model)"
work="$(mktemp -d)"
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
http_port="$(free_port)"; p2p_port="$(free_port)"
"$target/proofmesh-gateway" --ephemeral-key --http-listen "127.0.0.1:$http_port" \
  --p2p-listen "/ip4/127.0.0.1/tcp/$p2p_port" 2>"$work/gateway.log" &
pids+=($!)
"$target/proofmesh-provider" --ephemeral-key --model "$model" --threads 2 --parallel 4 \
  --p2p-listen /ip4/127.0.0.1/tcp/0 --bootstrap "/ip4/127.0.0.1/tcp/$p2p_port" 2>"$work/provider.log" &
pids+=($!)
base="http://127.0.0.1:$http_port"
for _ in $(seq 1 240); do
  curl -sf "$base/readyz" >/dev/null 2>&1 && break
  sleep 0.5
done
curl -sf "$base/readyz" >/dev/null || { echo "mesh never became ready" >&2; tail -20 "$work"/*.log >&2; exit 1; }
# The checks: no 5xx, status codes, content types, headers and bodies as documented.
schemathesis run "$base/openapi.json" \
  --checks not_a_server_error,status_code_conformance,content_type_conformance,response_headers_conformance,response_schema_conformance \
  --max-examples "$examples" \
  --request-timeout 120 \
  --seed 1 \
  --no-color
