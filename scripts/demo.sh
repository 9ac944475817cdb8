#!/usr/bin/env bash
# Brings up a local mesh on loopback: one gateway and two providers running the default model,
# discovering each other through an explicit bootstrap address on 127.0.0.1 (no mDNS), then
# prints a curl line. Ctrl-C stops everything.
#
#   PROOFMESH_HTTP_PORT (default 8080)   the OpenAI API port
#   PROOFMESH_P2P_PORT  (default 4001)   the gateway's mesh port
set -euo pipefail
cd "$(dirname "$0")/.."

http_port="${PROOFMESH_HTTP_PORT:-8080}"
p2p_port="${PROOFMESH_P2P_PORT:-4001}"
state="${XDG_STATE_HOME:-$HOME/.local/state}/proofmesh/demo"
mkdir -p "$state"

scripts/install-deps.sh
echo "building (release) ..." >&2
# The gateway is built with its own referee: it re-executes answers itself, the one referee a
# fresh mesh has that it can trust.
cargo build --release --locked -p proofmesh-gateway -p proofmesh-provider \
  --features proofmesh-gateway/local-referee
bin=target/release
model="$("$bin/proofmesh-provider" fetch-model)"

pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap cleanup EXIT INT TERM

"$bin/proofmesh-gateway" --http-listen "127.0.0.1:$http_port" \
  --p2p-listen "/ip4/127.0.0.1/tcp/$p2p_port" --key "$state/gateway.key" \
  --state-dir "$state/gateway-state" --referee-model "$model" --referee-threads 1 \
  >"$state/gateway.log" 2>&1 &
pids+=($!)
for i in 1 2; do
  "$bin/proofmesh-provider" --model "$model" --key "$state/provider$i.key" \
    --p2p-listen "/ip4/127.0.0.1/tcp/0" --bootstrap "/ip4/127.0.0.1/tcp/$p2p_port" >"$state/provider$i.log" 2>&1 &
  pids+=($!)
done

echo "waiting for both providers to join (logs in $state) ..." >&2
for _ in $(seq 1 120); do
  n=$(curl -sf "http://127.0.0.1:$http_port/healthz" | python3 -c 'import json,sys; print(json.load(sys.stdin)["providers"])' 2>/dev/null || echo 0)
  [ "$n" = "2" ] && break
  for pid in "${pids[@]}"; do
    kill -0 "$pid" 2>/dev/null || { echo "a node exited; see $state/*.log" >&2; exit 1; }
  done
  sleep 0.5
done
[ "$n" = "2" ] || { echo "providers did not join within 60 s; see $state/*.log" >&2; exit 1; }

cat <<TXT

proofmesh is up: gateway http://127.0.0.1:$http_port/v1, two providers, model SmolLM2-135M-Instruct.Q4_1.
Try:

curl -s http://127.0.0.1:$http_port/v1/chat/completions -H 'content-type: application/json' -d '{"model": "SmolLM2-135M-Instruct.Q4_1", "messages": [{"role": "user", "content": "What is the capital of France?"}], "verification_mode": "merkle"}'

(add -i to see the x-proofmesh-* headers). Ctrl-C stops the mesh.
TXT
wait
