#!/usr/bin/env python3
"""What a refereed audit costs: end-to-end latency of `verification_mode: merkle` against `none`
for the same requests, in one run, and the evidence a long answer's audit moves.

    bench/audit_cost.py [--tokens 128] [--requests 12] [--long-tokens 512]

Two setups, one after the other:

- disjoint cores: the provider pinned to core 0 (1 thread), the gateway with its own referee
  pinned to core 1 (1 thread): provider and referee stand for separate machines.
- shared cores: provider and gateway-referee unpinned, 2 threads each, on the same 2 cores.

In each, after warm-up (which also ends the provider's probation, so audits challenge the default
16 steps), `--requests` plain (non-streaming) greedy requests of `--tokens` tokens alternate
between `none` and `merkle` on the same prompts; the table shows latency p50 and mean per mode and
the merkle/none ratio. The referee follows each answer as it streams, so most of its work is done
when the last token arrives. Then, on the disjoint setup, `--long-tokens` requests report the
evidence bytes of their audit (the provider's openings plus the referee's evidence, CBOR), for a
provider on probation (32 steps challenged) and after it (16). Everything listens on 127.0.0.1.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

from common import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = "SmolLM2-135M-Instruct.Q4_1"
PROMPTS = [
    "Write a long story about a dragon who learns to fly. Describe every step in detail.",
    "Write a long story about a lighthouse keeper who finds a map.",
    "Describe a day in the life of a baker in a small town, hour by hour.",
    "Write a letter to a friend about your holiday by the sea, with many details.",
    "Explain how a bicycle works, part by part, for a curious child.",
    "Write a science fiction story about the first city on Mars.",
]


def chat(url, prompt, tokens, mode):
    body = {"model": MODEL, "messages": [{"role": "user", "content": prompt}], "max_tokens": tokens,
            "temperature": 0, "verification_mode": mode}
    req = urllib.request.Request(url + "/v1/chat/completions", data=json.dumps(body).encode(),
                                 headers={"content-type": "application/json"})
    start = time.perf_counter()
    with urllib.request.urlopen(req, timeout=600) as resp:
        answer = json.load(resp)
    latency = time.perf_counter() - start
    info = answer["proofmesh"]
    if mode == "merkle" and info["verdict"] != "passed":
        raise RuntimeError(f"audit verdict {info['verdict']}")
    return latency, answer["usage"]["completion_tokens"], info


def wait_ready(url, procs, logs):
    for _ in range(480):
        try:
            if json.load(urllib.request.urlopen(url + "/healthz"))["providers"] == 1:
                return
        except OSError:
            pass
        for p in procs:
            if p.poll() is not None:
                sys.exit(f"a process exited; logs in {logs}")
        time.sleep(0.25)
    sys.exit(f"mesh not ready in 120 s; logs in {logs}")


def start(bins, model, logs, name, pinned):
    http, p2p = free_port(), free_port()
    threads = "1" if pinned else "2"
    pin = lambda core: ["taskset", "-c", core] if pinned else []  # noqa: E731
    log = lambda who: open(os.path.join(logs, f"{name}-{who}.log"), "w")  # noqa: E731
    procs = [
        subprocess.Popen(pin("1") + [os.path.join(bins, "proofmesh-gateway"), "--http-listen", f"127.0.0.1:{http}",
                                     "--p2p-listen", f"/ip4/127.0.0.1/tcp/{p2p}", "--ephemeral-key",
                                     "--referee-model", model, "--referee-threads", threads], stderr=log("gateway")),
        subprocess.Popen(pin("0") + [os.path.join(bins, "proofmesh-provider"), "--model", model, "--ephemeral-key",
                                     "--threads", threads, "--parallel", "1", "--ctx-size", "1024",
                                     "--referee-slots", "0", "--p2p-listen", "/ip4/127.0.0.1/tcp/0",
                                     "--bootstrap", f"/ip4/127.0.0.1/tcp/{p2p}"], stderr=log("provider")),
    ]
    url = f"http://127.0.0.1:{http}"
    wait_ready(url, procs, logs)
    return url, procs


def stop(procs):
    for p in procs:
        p.terminate()
    for p in procs:
        try:
            p.wait(timeout=15)
        except subprocess.TimeoutExpired:
            p.kill()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--requests", type=int, default=12, help="per mode and setup")
    ap.add_argument("--long-tokens", type=int, default=512)
    ap.add_argument("--setups", default="disjoint,shared", help="which setups to run, comma-separated")
    args = ap.parse_args()
    if (os.cpu_count() or 1) < 2:
        sys.exit("needs two cores to pin provider and referee apart")
    # The gateway referees with its own engine: built with the `local-referee` feature.
    subprocess.run(["cargo", "build", "--release", "--locked", "-p", "proofmesh-gateway", "-p", "proofmesh-provider",
                    "--features", "proofmesh-gateway/local-referee", "--bins"], cwd=ROOT, check=True)
    bins = os.path.join(ROOT, os.environ.get("CARGO_TARGET_DIR", "target"), "release")
    model = subprocess.run([os.path.join(bins, "proofmesh-provider"), "fetch-model"], check=True,
                           capture_output=True, text=True).stdout.strip()
    logs = tempfile.mkdtemp(prefix="proofmesh-audit-cost-")
    rows, evidence = [], []
    setups = [(n, p) for n, p in [("disjoint cores", True), ("shared cores", False)]
              if n.split()[0] in args.setups.split(",")]
    for name, pinned in setups:
        url, procs = start(bins, model, logs, name.split()[0], pinned)
        try:
            if pinned:
                # A new provider is on probation: its first audits challenge 32 steps.
                for i in range(2):
                    _, steps, info = chat(url, PROMPTS[i], args.long_tokens, "merkle")
                    evidence.append(("on probation", steps, len(info["challenged"]),
                                     info["audit"]["evidence_bytes"], info["audit"]["tier"]))
            for i in range(12):  # warm-up; ends the probation (10 passed audits)
                chat(url, PROMPTS[i % len(PROMPTS)], 16, "merkle")
                chat(url, PROMPTS[i % len(PROMPTS)], 16, "none")
            if pinned:
                for i in range(2):
                    _, steps, info = chat(url, PROMPTS[i + 2], args.long_tokens, "merkle")
                    evidence.append(("after probation", steps, len(info["challenged"]),
                                     info["audit"]["evidence_bytes"], info["audit"]["tier"]))
            lat = {"none": [], "merkle": []}
            audit_ms, tokens = [], []
            for i in range(args.requests):
                prompt = PROMPTS[i % len(PROMPTS)]
                for mode in (["none", "merkle"] if i % 2 == 0 else ["merkle", "none"]):
                    latency, steps, info = chat(url, prompt, args.tokens, mode)
                    lat[mode].append(latency * 1000)
                    tokens.append(steps)
                    if mode == "merkle":
                        audit_ms.append(info["audit_ms"])
            none50, merkle50 = statistics.median(lat["none"]), statistics.median(lat["merkle"])
            rows.append((name, min(tokens), none50, statistics.mean(lat["none"]), merkle50,
                         statistics.mean(lat["merkle"]), statistics.median(audit_ms),
                         statistics.mean(lat["merkle"]) / statistics.mean(lat["none"])))
        finally:
            stop(procs)

    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
    print(f"\nmachine: {cpu}, {os.cpu_count()} cores; model {os.path.basename(model)}; greedy, plain requests of "
          f"{args.tokens} tokens, {args.requests} per mode, alternating; referee = the gateway's own engine\n")
    print("| setup | tokens (min) | none p50 | none mean | merkle p50 | merkle mean | audit after last token p50 | "
          "merkle / none (mean) |")
    print("|---|---|---|---|---|---|---|---|")
    for name, steps, n50, nmean, m50, mmean, a50, ratio in rows:
        print(f"| {name} | {steps} | {n50:.0f} ms | {nmean:.0f} ms | {m50:.0f} ms | {mmean:.0f} ms | {a50:.0f} ms | "
              f"{ratio:.3f} |")
    print("\n| long answer | tokens | steps challenged | evidence on the wire | tier |")
    print("|---|---|---|---|---|")
    for when, steps, k, size, tier in evidence:
        print(f"| {when} | {steps} | {k} | {size} bytes ({size / 1024:.1f} KiB) | {tier} |")
    print(f"\n(logs in {logs})")


if __name__ == "__main__":
    main()
