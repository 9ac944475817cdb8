#!/usr/bin/env python3
"""Single-stream generation speed: proofmesh (gateway + provider over loopback libp2p) next to
llama.cpp's own llama-bench on the same model, threads and machine, in one run.

    bench/single_stream.py [--rounds 5] [--tokens 128] [--threads 2]

Rounds interleave llama-bench, the in-process engine and requests through the gateway, so that
the machine's drift hits all of them alike; ratios are taken within a round.

Builds what it needs (release binaries; llama-bench via bench/llama_cpp.sh, outside the repo),
starts a gateway and one provider on 127.0.0.1 (no mDNS), and prints a table.
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

from common import free_port, stream_chat

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = "SmolLM2-135M-Instruct.Q4_1"
PROMPT = "Write a long story about a dragon who learns to fly. Describe every step in detail."


def post_stream(url, body):
    """Streams one completion; returns (ttft, decode_window, tokens, total)."""
    t = stream_chat(url, body, timeout=300)
    return t.first - t.start, t.last - t.first, t.tokens, t.end - t.start


def median(xs):
    return statistics.median(xs) if xs else float("nan")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds (the machine is noisy)")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    subprocess.run(["cargo", "build", "--release", "--locked", "-p", "proofmesh-gateway", "-p", "proofmesh-provider",
                    "--example", "engine_decode"], cwd=ROOT, check=True)
    bins = os.path.join(ROOT, os.environ.get("CARGO_TARGET_DIR", "target"), "release")
    model = subprocess.run([os.path.join(bins, "proofmesh-provider"), "fetch-model"], check=True,
                           capture_output=True, text=True).stdout.strip()
    llama_bin = subprocess.run([os.path.join(ROOT, "bench", "llama_cpp.sh"), "llama-bench"], check=True,
                               capture_output=True, text=True).stdout.strip()

    def llama_bench():
        # llama.cpp's own figure: tg (pure decode of N tokens, no sampling, no HTTP).
        out = subprocess.run([os.path.join(llama_bin, "llama-bench"), "-m", model, "-t", str(args.threads),
                              "-p", "0", "-n", str(args.tokens), "-r", "2", "-o", "json"],
                             check=True, capture_output=True, text=True).stdout
        return json.loads(out)[0]["avg_ts"]

    def engine_in_process():
        # Our engine thread alone: sampling, leaves, channels; no mesh, no HTTP.
        out = subprocess.run([os.path.join(bins, "examples", "engine_decode"), model, str(args.threads),
                              str(args.tokens), "2"], check=True, capture_output=True, text=True).stdout
        return median([float(l.split("decode ")[1].split()[0]) for l in out.splitlines() if "decode" in l])

    http, p2p = free_port(), free_port()
    logs = tempfile.mkdtemp(prefix="proofmesh-bench-")
    procs = []
    results = {"llama-bench": [], "engine": [], "none": [], "merkle": []}
    e2e = {"none": [], "merkle": []}
    ttft = {"none": [], "merkle": []}
    ratios = {"engine": [], "none": [], "merkle": []}
    try:
        # No referee here: merkle answers get the exact checks and the gateway's text check,
        # delivered labelled `unrefereed` by opt-in.
        procs.append(subprocess.Popen([os.path.join(bins, "proofmesh-gateway"), "--http-listen", f"127.0.0.1:{http}",
                                       "--p2p-listen", f"/ip4/127.0.0.1/tcp/{p2p}", "--ephemeral-key",
                                       "--allow-unrefereed", "--vocabularies", model,
                                       "--state-dir", os.path.join(logs, "gateway-state")],
                                      stderr=open(os.path.join(logs, "gateway.log"), "w")))
        procs.append(subprocess.Popen([os.path.join(bins, "proofmesh-provider"), "--model", model, "--ephemeral-key",
                                       "--threads", str(args.threads), "--parallel", "1",
                                       "--p2p-listen", "/ip4/127.0.0.1/tcp/0", "--bootstrap", f"/ip4/127.0.0.1/tcp/{p2p}"],
                                      stderr=open(os.path.join(logs, "provider.log"), "w")))
        base = f"http://127.0.0.1:{http}"
        for _ in range(240):
            try:
                if json.load(urllib.request.urlopen(base + "/healthz"))["providers"] == 1:
                    break
            except OSError:
                pass
            time.sleep(0.25)
        else:
            sys.exit(f"provider did not join; logs in {logs}")

        def body(mode):
            return {"model": MODEL, "messages": [{"role": "user", "content": PROMPT}], "max_tokens": args.tokens,
                    "temperature": 0, "stream": True, "stream_options": {"include_usage": True},
                    "verification_mode": mode}

        post_stream(base + "/v1/chat/completions", body("none"))  # warm-up
        for _ in range(args.rounds):
            reference = llama_bench()
            results["llama-bench"].append(reference)
            engine = engine_in_process()
            results["engine"].append(engine)
            ratios["engine"].append(engine / reference)
            for mode in ["none", "merkle"]:
                runs = [post_stream(base + "/v1/chat/completions", body(mode)) for _ in range(2)]
                tps = median([(n - 1) / window for _, window, n, _ in runs])
                results[mode].append(tps)
                ratios[mode].append(tps / reference)
                e2e[mode] += [n / total for _, _, n, total in runs]
                ttft[mode] += [r[0] * 1000 for r in runs]
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(timeout=10)

    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
    print(f"\nmachine: {cpu}, {os.cpu_count()} cores; threads {args.threads}; {args.rounds} interleaved rounds; "
          f"{args.tokens} tokens per request, greedy")
    print(f"model: {os.path.basename(model)}\n")
    print("| engine | decode tok/s (median, min-max) | end-to-end tok/s | TTFT p50 | ratio to llama-bench (median of rounds) |")
    print("|---|---|---|---|---|")
    ref = results["llama-bench"]
    print(f"| llama-bench tg{args.tokens} | {median(ref):.1f} ({min(ref):.1f}-{max(ref):.1f}) | - | - | 1.00 |")
    row = results["engine"]
    print(f"| proofmesh engine in-process | {median(row):.1f} ({min(row):.1f}-{max(row):.1f}) | - | - | "
          f"{median(ratios['engine']):.2f} |")
    for mode in ["none", "merkle"]:
        row = results[mode]
        print(f"| proofmesh gateway+mesh, verification {mode} | {median(row):.1f} ({min(row):.1f}-{max(row):.1f}) | "
              f"{median(e2e[mode]):.1f} | {median(ttft[mode]):.0f} ms | {median(ratios[mode]):.2f} |")
    print(f"\n(logs in {logs})")


if __name__ == "__main__":
    main()
