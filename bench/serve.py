#!/usr/bin/env python3
"""Serving under load: proofmesh (gateway + provider over loopback libp2p) against llama.cpp's own
OpenAI-compatible server, same model, threads and parallel slots, same prompts, one run.

    bench/serve.py [--concurrency 1,4,16] [--tokens 128] [--threads 2] [--rounds 2]
                   [--structured-concurrency 1,4]

Rows for proofmesh in `none`, `merkle` and `fraud` mode (fraud: released at once, a drawn share
audited afterwards; a table pairs it with `none` round by round, and another reports the audit work
each plain fraud answer deferred, read back from `GET /v1/audits/{id}`). A row "engine in-process" runs the provider's engine with no mesh and no HTTP
(provider/examples/engine_load.rs) under the same load, so the cost of the gateway and the libp2p
hop is shown on its own. At `--stall-concurrency` a ~2,000-token prompt then arrives while streams
run, and a second table shows the running streams' longest gap between tokens during its prefill.

For each concurrency level both servers are (re)started with `parallel = max(4, concurrency)`
slots (llama-server's default is 4) and a context of 2,560 tokens per slot (room for the long
prompt); then, in interleaved rounds (each round starting with the next target, so that the
machine's drift does not always land on the same one), each target gets the same fixed prompt set
from `concurrency` client threads, streaming and not; every cell is the median over rounds. Prints one table: aggregate generated tokens/s, TTFT and latency p50/p99, failures, and
the proofmesh/llama-server ratio, paired round by round. At `--structured-concurrency` levels a
further table does the same with every request carrying one json_schema `response_format`
(llama-server and proofmesh `none` and `merkle`), failing any answer that does not parse into the
schema's keys. Everything listens on 127.0.0.1; every loop is bounded.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

from common import free_port, stream_chat

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = "SmolLM2-135M-Instruct.Q4_1"
PROMPTS = [
    "Write a long story about a dragon who learns to fly.",
    "Explain how a bicycle works, step by step.",
    "List twenty fruits and say one thing about each.",
    "Write a Python function that sorts a list, and explain it.",
    "Describe a day in the life of a lighthouse keeper.",
    "What are the planets of the solar system? Describe each one.",
    "Write a letter to a friend about your holiday by the sea.",
    "Explain what a computer network is to a child.",
]
# Room for the long prompt of the stall check (about 2,000 tokens) in one slot.
CTX_PER_SLOT = 2560
# The stall check's long prompt: a repeated sentence, about 2,050 tokens after SmolLM2's chat template.
LONG_PROMPT = "The quick brown fox jumps over the lazy dog near the river bank. " * 145
# proofmesh's prefill chunk (the provider's default `batch_size`).
PREFILL_CHUNK = 512


# Audit ids of the plain `fraud` answers of the current level (the header `x-proofmesh-audit-id`).
FRAUD_IDS = []
FRAUD_IDS_LOCK = threading.Lock()


def percentile(xs, p):
    xs = sorted(xs)
    if not xs:
        return float("nan")
    k = min(len(xs) - 1, max(0, round(p / 100 * (len(xs) - 1))))
    return xs[k]


# The structured-output rows' schema: room for about `--tokens` tokens of JSON, bounded so that a
# small model finishes it.
SCHEMA = {"type": "object", "properties": {
    "title": {"type": "string", "maxLength": 60},
    "points": {"type": "array", "minItems": 1, "maxItems": 4, "items": {"type": "string", "maxLength": 120}}},
    "required": ["title", "points"], "additionalProperties": False}
RESPONSE_FORMAT = {"type": "json_schema", "json_schema": {"name": "answer", "schema": SCHEMA, "strict": True}}


def one_request(url, prompt, tokens, stream, mode, constrained=False):
    body = {"model": MODEL, "messages": [{"role": "user", "content": prompt}], "max_tokens": tokens,
            "temperature": 0, "stream": stream}
    if constrained:
        body["response_format"] = RESPONSE_FORMAT
    if stream:
        body["stream_options"] = {"include_usage": True}
    if mode:
        body["verification_mode"] = mode
    if stream:
        t = stream_chat(url, body, timeout=600)
        return t.first - t.start, t.end - t.start, t.tokens if t.tokens is not None else t.chunks
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"content-type": "application/json"})
    start = time.perf_counter()
    with urllib.request.urlopen(req, timeout=600) as resp:
        audit_id = resp.headers.get("x-proofmesh-audit-id")
        answer = json.load(resp)
        generated = answer["usage"]["completion_tokens"]
    if constrained and answer["choices"][0]["finish_reason"] == "stop":
        value = json.loads(answer["choices"][0]["message"]["content"])  # a failure if not JSON
        if not (isinstance(value, dict) and set(value) == {"title", "points"}):
            raise ValueError(f"answer outside the schema: {value!r}")
    if audit_id:
        with FRAUD_IDS_LOCK:
            FRAUD_IDS.append(audit_id)
    latency = time.perf_counter() - start
    return latency, latency, generated


def load(url, concurrency, tokens, stream, mode, requests, constrained=False):
    """Runs `requests` requests from `concurrency` threads; returns metrics."""
    jobs = list(range(requests))
    lock = threading.Lock()
    results, failures = [], []

    def worker():
        while True:
            with lock:
                if not jobs:
                    return
                i = jobs.pop()
            try:
                r = one_request(url, PROMPTS[i % len(PROMPTS)], tokens, stream, mode, constrained)
                with lock:
                    results.append(r)
            except Exception as e:  # noqa: BLE001 - every failure is counted and shown
                with lock:
                    failures.append(repr(e))

    start = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=900)
    wall = time.perf_counter() - start
    generated = sum(r[2] for r in results)
    return {
        "tps": generated / wall,
        "ttft": [r[0] * 1000 for r in results],
        "lat": [r[1] * 1000 for r in results],
        "failures": failures,
    }


def deferred_work(base, ids, within=120):
    """Reads back the audit records of `ids` (waiting up to `within` s in all for pending ones) and
    summarizes the work they deferred: how many were drawn, how they ended, and per audited answer its
    audit time and evidence bytes."""
    deadline = time.monotonic() + within
    records = []
    for audit_id in ids:
        while True:
            with urllib.request.urlopen(f"{base}/v1/audits/{audit_id}", timeout=30) as resp:
                record = json.load(resp)
            if record.get("status") != "pending" or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        records.append(record)
    statuses = {}
    for r in records:
        statuses[r.get("status")] = statuses.get(r.get("status"), 0) + 1
    audited = [r for r in records if r.get("audit_ms") is not None]
    return {
        "answers": len(records),
        "drawn": sum(1 for r in records if r.get("status") != "not_sampled"),
        "statuses": statuses,
        "audit_ms": [r["audit_ms"] for r in audited],
        "evidence_bytes": [r.get("evidence_bytes") or 0 for r in audited],
    }


def stall(url, mode, streams, tokens):
    """`streams` greedy streams run; 1.5 s in, a ~2,000-token prompt arrives (one token of answer) for
    the one free slot.

    Returns the long request's time to answer and prompt length, and the running streams'
    longest gap between two tokens while it was being prefilled, next to their median gap before.
    """
    timings, failures = [None] * streams, []

    def run(i):
        body = {"model": MODEL, "messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
                "max_tokens": tokens, "temperature": 0, "stream": True}
        if mode:
            body["verification_mode"] = mode
        try:
            timings[i] = stream_chat(url, body, timeout=600)
        except Exception as e:  # noqa: BLE001 - counted and shown
            failures.append(repr(e))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(streams)]
    for t in threads:
        t.start()
    time.sleep(1.5)
    # A beginning of its own, so no server finds it in its prompt cache from an earlier target.
    content = f"Request {time.time_ns()}. {LONG_PROMPT}"
    body = {"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": 1,
            "temperature": 0}
    if mode:
        body["verification_mode"] = mode
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"content-type": "application/json"})
    t0 = time.perf_counter()
    try:
        with urllib.request.urlopen(req, timeout=600) as resp:
            prompt_tokens = json.load(resp)["usage"]["prompt_tokens"]
    except Exception as e:  # noqa: BLE001
        failures.append(repr(e))
        prompt_tokens = 0
    t1 = time.perf_counter()
    for t in threads:
        t.join(timeout=900)
    during, before, got = [], [], []
    for timing in timings:
        if timing is None:
            continue
        got.append(sum(1 for a in timing.arrivals if t0 < a < t1))
        for a, b in zip(timing.arrivals, timing.arrivals[1:]):
            if b < t0:
                before.append(b - a)
            elif a < t1:
                during.append(b - a)
    return {"long_ms": (t1 - t0) * 1000, "prompt_tokens": prompt_tokens,
            "longest_gap_ms": max(during, default=float("nan")) * 1000,
            "median_gap_ms": statistics.median(before) * 1000 if before else float("nan"),
            "tokens_during": min(got, default=0), "failures": failures}


def structured_rows(targets, c, parallel, args, requests):
    """Interleaved rounds of json_schema requests on llama-server and proofmesh (none, merkle)."""
    wanted = [t for t in targets if t[1] and t[0] in ("llama-server", "proofmesh none", "proofmesh merkle")]
    agg = {name: {"tps": [], "lat": [], "failures": []} for name, _, _ in wanted}
    for r in range(args.rounds):
        for name, url, mode in wanted[r % len(wanted):] + wanted[:r % len(wanted)]:
            m = load(url + "/v1/chat/completions", c, args.tokens, False, mode, requests, constrained=True)
            agg[name]["tps"].append(m["tps"])
            agg[name]["lat"] += m["lat"]
            agg[name]["failures"] += m["failures"]
    rows = []
    for name, _, _ in wanted:
        a = agg[name]
        ratios = [t / b for t, b in zip(a["tps"], agg["llama-server"]["tps"])]
        rows.append((c, parallel, name, statistics.median(a["tps"]), percentile(a["lat"], 50),
                     percentile(a["lat"], 99), len(a["failures"]), statistics.median(ratios), min(ratios),
                     max(ratios)))
        for f in a["failures"][:3]:
            print(f"  structured {name} c={c}: {f}", file=sys.stderr)
    return rows


def engine_load(bins, model, threads, concurrency, tokens, requests):
    """The provider's engine in-process (provider/examples/engine_load.rs): no mesh, no HTTP."""
    out = subprocess.run([os.path.join(bins, "examples", "engine_load"), model, str(threads), str(concurrency),
                          str(tokens), str(requests)], check=True, capture_output=True, text=True, timeout=900)
    m = json.loads(out.stdout.strip().splitlines()[-1])
    return {"tps": m["tok_s"], "ttft": m["ttft_ms"], "lat": m["latency_ms"], "failures": []}


def wait_ready(check, procs, logs, what):
    for _ in range(480):
        try:
            if check():
                return
        except OSError:
            pass
        for p in procs:
            if p.poll() is not None:
                sys.exit(f"{what} exited; logs in {logs}")
        time.sleep(0.25)
    sys.exit(f"{what} not ready in 120 s; logs in {logs}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--concurrency", default="1,4,16")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2, help="interleaved rounds per level")
    ap.add_argument("--stall-concurrency", type=int, default=4,
                    help="level at which a ~2,000-token prompt arrives mid-run (0: skip)")
    ap.add_argument("--structured-concurrency", default="1,4",
                    help="levels that also get structured-output rows: every request with the same "
                         "json_schema response_format, on llama-server and proofmesh (empty: skip)")
    args = ap.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    structured_levels = {int(c) for c in args.structured_concurrency.split(",") if c}

    subprocess.run(["cargo", "build", "--release", "--locked", "-p", "proofmesh-gateway", "-p", "proofmesh-provider",
                    "--bins", "--example", "engine_load"], cwd=ROOT, check=True)
    bins = os.path.join(ROOT, os.environ.get("CARGO_TARGET_DIR", "target"), "release")
    model = subprocess.run([os.path.join(bins, "proofmesh-provider"), "fetch-model"], check=True,
                           capture_output=True, text=True).stdout.strip()
    llama_bin = subprocess.run([os.path.join(ROOT, "bench", "llama_cpp.sh"), "llama-server"], check=True,
                               capture_output=True, text=True).stdout.strip()
    logs = tempfile.mkdtemp(prefix="proofmesh-serve-")
    rows, stalls, pairs, deferred, structured = [], [], [], [], []
    for c in levels:
        parallel = max(4, c)
        procs = []
        try:
            ls_port, http, p2p = free_port(), free_port(), free_port()
            log = lambda name: open(os.path.join(logs, f"{name}-c{c}.log"), "w")  # noqa: E731
            procs.append(subprocess.Popen([os.path.join(llama_bin, "llama-server"), "-m", model, "-t", str(args.threads),
                                           "-np", str(parallel), "-c", str(CTX_PER_SLOT * parallel),
                                           "--host", "127.0.0.1", "--port", str(ls_port)], stderr=log("llama-server"),
                                          stdout=subprocess.DEVNULL))
            # No referee here (one provider on 2 cores): merkle answers get every exact check and
            # the gateway's own text check, and are delivered labelled `unrefereed` by opt-in.
            procs.append(subprocess.Popen([os.path.join(bins, "proofmesh-gateway"), "--http-listen", f"127.0.0.1:{http}",
                                           "--p2p-listen", f"/ip4/127.0.0.1/tcp/{p2p}", "--ephemeral-key",
                                           "--allow-unrefereed", "--vocabularies", model,
                                           "--state-dir", os.path.join(logs, f"state-c{c}")],
                                          stderr=log("gateway")))
            procs.append(subprocess.Popen([os.path.join(bins, "proofmesh-provider"), "--model", model, "--ephemeral-key",
                                           "--threads", str(args.threads), "--parallel", str(parallel),
                                           "--ctx-size", str(CTX_PER_SLOT), "--p2p-listen", "/ip4/127.0.0.1/tcp/0",
                                           "--bootstrap", f"/ip4/127.0.0.1/tcp/{p2p}"], stderr=log("provider")))
            ls = f"http://127.0.0.1:{ls_port}"
            pm = f"http://127.0.0.1:{http}"
            wait_ready(lambda: urllib.request.urlopen(ls + "/health").status == 200, procs, logs, "llama-server")
            wait_ready(lambda: json.load(urllib.request.urlopen(pm + "/healthz"))["providers"] == 1, procs, logs,
                       "proofmesh")
            targets = [("llama-server", ls, None), ("engine in-process", None, None), ("proofmesh none", pm, "none"),
                       ("proofmesh merkle", pm, "merkle"), ("proofmesh fraud", pm, "fraud")]
            for _, url, mode in targets:  # warm-up
                if url:
                    one_request(url + "/v1/chat/completions", PROMPTS[0], 16, True, mode)
            requests = max(8, 2 * c)
            for stream in [True, False]:
                agg = {name: {"tps": [], "ttft": [], "lat": [], "failures": []} for name, _, _ in targets}
                for r in range(args.rounds):
                    # Each round starts with another target, so slow drift of the machine does not
                    # always land on the same one.
                    for name, url, mode in targets[r % len(targets):] + targets[:r % len(targets)]:
                        if url is None:
                            m = engine_load(bins, model, args.threads, c, args.tokens, requests)
                        else:
                            m = load(url + "/v1/chat/completions", c, args.tokens, stream, mode, requests)
                        agg[name]["tps"].append(m["tps"])
                        for k in ["ttft", "lat", "failures"]:
                            agg[name][k] += m[k]
                # The ratio pairs each round's figure with llama-server's in the same round (minutes
                # apart at most): this machine drifts by 10-20 % within a run, which medians of the
                # raw figures taken at different times would fold into the comparison.
                # fraud against none, paired the same way: what releasing first and auditing a
                # drawn share afterwards costs the answers themselves.
                fraud_vs_none = [f / n for f, n in zip(agg["proofmesh fraud"]["tps"], agg["proofmesh none"]["tps"])]
                lat = lambda name: percentile(agg[name]["lat"], 50)  # noqa: E731
                pairs.append((c, "stream" if stream else "plain", statistics.median(fraud_vs_none), min(fraud_vs_none),
                              max(fraud_vs_none), lat("proofmesh fraud") / lat("proofmesh none")))
                base = agg["llama-server"]["tps"]
                for name, _, _ in targets:
                    a = agg[name]
                    ratios = [t / b for t, b in zip(a["tps"], base)]
                    rows.append((c, parallel, "stream" if stream else "plain", name, statistics.median(a["tps"]),
                                 percentile(a["ttft"], 50), percentile(a["ttft"], 99), percentile(a["lat"], 50),
                                 percentile(a["lat"], 99), len(a["failures"]), statistics.median(ratios),
                                 min(ratios), max(ratios)))
                    for f in a["failures"][:3]:
                        print(f"  {name} c={c}: {f}", file=sys.stderr)
            if c in structured_levels:
                structured += structured_rows(targets, c, parallel, args, requests)
            with FRAUD_IDS_LOCK:
                ids = FRAUD_IDS[:]
                FRAUD_IDS.clear()
            deferred.append((c, deferred_work(pm, ids)))
            if c == args.stall_concurrency:
                for name, url, mode in targets:
                    if url:
                        # One slot stays free, so the long prompt is prefilled at once, not queued.
                        stalls.append((c, name, stall(url + "/v1/chat/completions", mode, parallel - 1, 384)))
        finally:
            for p in procs:
                p.terminate()
            for p in procs:
                try:
                    p.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    p.kill()

    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
    print(f"\nmachine: {cpu}, {os.cpu_count()} cores; threads {args.threads}; model {os.path.basename(model)}; "
          f"greedy, max_tokens {args.tokens}; {args.rounds} interleaved rounds; context {CTX_PER_SLOT}/slot\n")
    print("ratio: median over rounds of the target's tokens/s over llama-server's in the same round "
          "(range: lowest and highest round)\n")
    print("| conc | slots | mode | server | gen tok/s | TTFT p50 | TTFT p99 | latency p50 | latency p99 | failed | ratio "
          "| range |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for c, par, kind, name, tps, t50, t99, l50, l99, failed, ratio, low, high in rows:
        ttft = f"{t50:.0f} ms | {t99:.0f} ms" if kind == "stream" or name.startswith("engine") else "- | -"
        print(f"| {c} | {par} | {kind} | {name} | {tps:.1f} | {ttft} | {l50:.0f} ms | {l99:.0f} ms | {failed} "
              f"| {ratio:.2f} | {low:.2f}-{high:.2f} |")
    by = {(c, kind, name): (t50, tps) for c, _, kind, name, tps, t50, *_ in rows}
    for c in levels:
        engine, mesh = by.get((c, "stream", "engine in-process")), by.get((c, "stream", "proofmesh none"))
        if engine and mesh:
            print(f"c={c}: gateway + libp2p hop + HTTP add {mesh[0] - engine[0]:+.1f} ms to TTFT p50 and keep "
                  f"{mesh[1] / engine[1]:.2f} of the in-process engine's tokens/s (streaming, none)")
    if pairs:
        print("\nfraud against none, same gateway and provider, paired round by round (tokens/s ratio: median, range; "
              "latency p50 ratio):\n")
        print("| conc | mode | tok/s fraud / none | range | latency p50 fraud / none |")
        print("|---|---|---|---|---|")
        for c, kind, ratio, low, high, lat in pairs:
            print(f"| {c} | {kind} | {ratio:.2f} | {low:.2f}-{high:.2f} | {lat:.2f} |")
    if deferred:
        print("\nThe audit work each plain fraud answer deferred (its record at GET /v1/audits/{id}; this gateway has no "
              "referee, so a drawn audit opens the provider's leaves, checks them exactly and ends `unrefereed`):\n")
        print("| conc | answers | drawn | how they ended | audit time p50 | audit time p99 | evidence p50 |")
        print("|---|---|---|---|---|---|---|")
        for c, d in deferred:
            ended = ", ".join(f"{k} {v}" for k, v in sorted(d["statuses"].items()))
            print(f"| {c} | {d['answers']} | {d['drawn']} | {ended} | {percentile(d['audit_ms'], 50):.0f} ms | "
                  f"{percentile(d['audit_ms'], 99):.0f} ms | {percentile(d['evidence_bytes'], 50):.0f} B |")
    if structured:
        print("\nStructured output: every request with the same json_schema response_format (plain requests; "
              "llama-server compiles the schema to its own grammar, proofmesh constrains with llguidance and "
              "the gateway walks every token through the schema); ratio paired round by round with "
              "llama-server's constrained figure:\n")
        print("| conc | slots | server | gen tok/s | latency p50 | latency p99 | failed | ratio | range |")
        print("|---|---|---|---|---|---|---|---|---|")
        for c, par, name, tps, l50, l99, failed, ratio, low, high in structured:
            print(f"| {c} | {par} | {name} | {tps:.1f} | {l50:.0f} ms | {l99:.0f} ms | {failed} | {ratio:.2f} "
                  f"| {low:.2f}-{high:.2f} |")
    if stalls:
        print("\nA ~2,000-token prompt arriving while streams run (llama-server prefills with its default "
              "batch of 2048, proofmesh in batches of 512 shared with the running streams' tokens, so "
              f"{PREFILL_CHUNK} - streams prompt tokens a step; conc - 1 streams run, so a slot is free). A stream stalled for no more than one chunk gets "
              "a token after every chunk:\n")
        print("| conc | server | long prompt tokens | prefill chunks | its time to answer | mean per chunk | "
              "tokens each running stream got meanwhile (least) | longest gap of a running stream | "
              "median gap before | failed |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for c, name, m in stalls:
            chunk = 2048 if name == "llama-server" else PREFILL_CHUNK - (c - 1)
            chunks = max(1, -(-m["prompt_tokens"] // chunk))
            print(f"| {c} | {name} | {m['prompt_tokens']} | {chunks} | {m['long_ms']:.0f} ms | "
                  f"{m['long_ms'] / chunks:.0f} ms | {m['tokens_during']} | {m['longest_gap_ms']:.0f} ms | "
                  f"{m['median_gap_ms']:.0f} ms | {len(m['failures'])} |")
            for f in m["failures"][:3]:
                print(f"  {name}: {f}", file=sys.stderr)
    print(f"\n(logs in {logs})")


if __name__ == "__main__":
    main()
