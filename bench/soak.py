#!/usr/bin/env python3
"""Soak: mixed traffic against a loopback mesh while providers are killed and restarted and one
peer floods, then an account of every request: nothing may be lost, hang or come back corrupted.

    bench/soak.py [--minutes 10] [--concurrency 8] [--providers 3]

A gateway and `--providers` providers (release builds, the default model) run on 127.0.0.1.
`--concurrency` client threads send chat completions for `--minutes`: streamed and not, in every
verification mode the gateway serves (`none`, `merkle`, `fraud`; merkle answers are exact-checked
and, with no trusted referee on this small mesh, delivered as `unrefereed` by opt-in; fraud
answers are released and the sampled ones later recorded `unrefereed`). Meanwhile a
chaos thread `kill -9`s a random provider every 20-40 s and restarts it (same key) 3-6 s later,
and `shared/examples/flood.rs` floods the first provider with silent generate streams from one
fresh identity after another. Every request ends in exactly one bucket:

- succeeded: 200 with text (a stream: content, a finish reason and `[DONE]`);
- failed clearly: an HTTP error with OpenAI's error object, or a stream's error event;
- lost: the connection closed with neither (a stream without `[DONE]` nor an error event);
- hung: no answer within the client's 360 s (the gateway's deadline is 300 s);
- corrupted: a 200 that is not a well-formed completion.

Prints the counts, the error codes seen, and gateway and provider RSS at start and end; exits 1
when anything was lost, hung or corrupted. Every loop is bounded by the run's time.
"""
import argparse
import collections
import http.client
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request

from common import free_port, peer_id_from_log, wait_for_providers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = [
    "Say hi.",
    "Write a haiku about the sea.",
    "List three fruits.",
    "Explain what a compiler does in two sentences.",
    "Count from 1 to 20.",
]
CLIENT_TIMEOUT = 360


def rss_mb(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def classify_plain(resp_body):
    try:
        body = json.loads(resp_body)
        text = body["choices"][0]["message"]["content"]
        if not isinstance(text, str) or body["choices"][0].get("finish_reason") not in ("stop", "length"):
            return "corrupted", "bad completion"
        return "succeeded", None
    except (ValueError, KeyError, IndexError, TypeError):
        return "corrupted", "unparseable 200"


def classify_stream(resp, started):
    saw_done = finish = False
    for raw in resp:
        # Keep-alive comments reset the socket timeout: the whole stream gets CLIENT_TIMEOUT.
        if time.time() - started > CLIENT_TIMEOUT:
            return "hung", "stream still open after the client's timeout"
        line = raw.decode("utf-8", "replace").strip()
        if not line.startswith("data: "):
            continue
        if line == "data: [DONE]":
            saw_done = True
            break
        try:
            chunk = json.loads(line[6:])
        except ValueError:
            return "corrupted", "unparseable event"
        if "error" in chunk:
            return "failed", (chunk["error"] or {}).get("code") or "stream_error"
        for choice in chunk.get("choices") or []:
            finish = finish or bool(choice.get("finish_reason"))
    if saw_done and finish:
        return "succeeded", None
    if saw_done:
        return "corrupted", "[DONE] without a finish reason"
    return "lost", "stream ended without [DONE] or an error event"


def one_request(url, rng):
    stream = rng.random() < 0.5
    body = {
        "model": "SmolLM2-135M-Instruct.Q4_1",
        "messages": [{"role": "user", "content": rng.choice(PROMPTS)}],
        "max_tokens": rng.randint(8, 64),
        "temperature": rng.choice([0.0, 0.7]),
        "seed": rng.randint(0, 1 << 30),
        "stream": stream,
        "verification_mode": rng.choice(["none", "merkle", "fraud"]),
    }
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"content-type": "application/json"})
    started = time.time()
    try:
        with urllib.request.urlopen(req, timeout=CLIENT_TIMEOUT) as resp:
            if stream:
                return classify_stream(resp, started)
            return classify_plain(resp.read())
    except urllib.error.HTTPError as e:
        try:
            err = json.loads(e.read())["error"]
            return "failed", f"{e.code} {err.get('code') or err.get('type')}"
        except (ValueError, KeyError, TypeError, OSError, http.client.HTTPException):
            return "corrupted", f"{e.code} without an error object"
    except TimeoutError:
        return "hung", "no answer in time"
    except http.client.HTTPException as e:
        return "lost", f"cut off: {e!r}"
    except OSError as e:
        if "timed out" in str(e):
            return "hung", "no answer in time"
        return "lost", f"connection: {e}"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--minutes", type=float, default=10)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--providers", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="llama.cpp threads per provider")
    args = ap.parse_args()

    subprocess.run(["cargo", "build", "--release", "--locked", "-p", "proofmesh-gateway", "-p", "proofmesh-provider",
                    "--bins"], cwd=ROOT, check=True)
    subprocess.run(["cargo", "build", "--release", "--locked", "-p", "proofmesh-shared", "--example", "flood"],
                   cwd=ROOT, check=True)
    bins = os.path.join(ROOT, os.environ.get("CARGO_TARGET_DIR", "target"), "release")
    model = subprocess.run([os.path.join(bins, "proofmesh-provider"), "fetch-model"], check=True,
                           capture_output=True, text=True).stdout.strip()
    work = tempfile.mkdtemp(prefix="proofmesh-soak-")
    http, p2p = free_port(), free_port()
    url = f"http://127.0.0.1:{http}"
    gateway = subprocess.Popen([os.path.join(bins, "proofmesh-gateway"), "--http-listen", f"127.0.0.1:{http}",
                                "--p2p-listen", f"/ip4/127.0.0.1/tcp/{p2p}", "--ephemeral-key",
                                "--allow-unrefereed", "--vocabularies", model, "--state-dir",
                                os.path.join(work, "gateway-state")],
                               stderr=open(os.path.join(work, "gateway.log"), "w"))
    providers = {}
    provider_ports = [free_port() for _ in range(args.providers)]

    def start_provider(i):
        log = open(os.path.join(work, f"provider{i}.log"), "a")
        providers[i] = subprocess.Popen([os.path.join(bins, "proofmesh-provider"), "--model", model,
                                         "--key", os.path.join(work, f"provider{i}.key"),
                                         "--threads", str(args.threads), "--parallel", "4", "--ctx-size", "1024",
                                         "--referee-slots", "0",
                                         "--p2p-listen", f"/ip4/127.0.0.1/tcp/{provider_ports[i]}",
                                         "--bootstrap", f"/ip4/127.0.0.1/tcp/{p2p}"], stderr=log)

    for i in range(args.providers):
        start_provider(i)
    flood = None
    stop = threading.Event()
    try:
        wait_for_providers(url, args.providers, work)
        peer0 = peer_id_from_log(os.path.join(work, "provider0.log"))
        rss_start = {"gateway": rss_mb(gateway.pid), **{f"provider{i}": rss_mb(p.pid) for i, p in providers.items()}}
        end = time.time() + args.minutes * 60
        if not peer0:
            sys.exit(f"no peer id in provider0's log, so no flood; logs in {work}")
        if peer0:
            flood = subprocess.Popen([os.path.join(bins, "examples", "flood"),
                                      f"/ip4/127.0.0.1/tcp/{provider_ports[0]}/p2p/{peer0}",
                                      "--seconds", str(int(args.minutes * 60))],
                                     stdout=subprocess.PIPE, stderr=open(os.path.join(work, "flood.log"), "w"),
                                     text=True)
        counts = collections.Counter()
        reasons = collections.Counter()
        lock = threading.Lock()
        kills = []

        def client(seed):
            rng = random.Random(seed)
            while time.time() < end and not stop.is_set():
                try:
                    bucket, why = one_request(url + "/v1/chat/completions", rng)
                except Exception as e:  # noqa: BLE001 - anything unexpected is a bad answer
                    bucket, why = "corrupted", f"client raised {e!r}"
                with lock:
                    counts[bucket] += 1
                    if why:
                        reasons[f"{bucket}: {why}"] += 1

        def chaos():
            rng = random.Random(7)
            while time.time() < end - 10:
                if stop.wait(rng.uniform(20, 40)) or time.time() >= end - 10:
                    break
                i = rng.randrange(args.providers)
                providers[i].send_signal(signal.SIGKILL)
                providers[i].wait()
                kills.append(i)
                time.sleep(rng.uniform(3, 6))
                start_provider(i)

        threads = [threading.Thread(target=client, args=(s,), daemon=True) for s in range(args.concurrency)]
        threads.append(threading.Thread(target=chaos, daemon=True))
        for t in threads:
            t.start()
        give_up = end + CLIENT_TIMEOUT + 60
        for t in threads:
            t.join(timeout=max(0, give_up - time.time()))
        stop.set()
        # A client still inside a request now is a request that never ended.
        counts["hung"] += sum(1 for t in threads[:-1] if t.is_alive())
        rss_end = {"gateway": rss_mb(gateway.pid), **{f"provider{i}": rss_mb(p.pid) for i, p in providers.items()}}
        try:
            flood_report = flood.communicate(timeout=60)[0].strip()
        except subprocess.TimeoutExpired:
            flood.kill()
            flood_report = "flood: did not end in time (killed)"
    finally:
        stop.set()
        for p in [gateway, *providers.values()] + ([flood] if flood else []):
            if p.poll() is None:
                p.terminate()
        for p in [gateway, *providers.values()]:
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()

    sent = sum(counts.values())
    print(f"\nsoak: {args.minutes:g} min, concurrency {args.concurrency}, {args.providers} providers, "
          f"{len(kills)} kill -9 + restart, one flooding peer; logs in {work}")
    print(f"sent {sent}: succeeded {counts['succeeded']}, failed with a clear error {counts['failed']}, "
          f"lost {counts['lost']}, hung {counts['hung']}, corrupted {counts['corrupted']}")
    for why, n in reasons.most_common(12):
        print(f"  {n:6d}  {why}")
    print(flood_report)
    print("RSS MiB (start -> end; a restarted provider's end is its new process): " + ", ".join(
        f"{k} {rss_start[k]:.0f} -> {rss_end.get(k, float('nan')):.0f}" for k in rss_start))
    bad = counts["lost"] + counts["hung"] + counts["corrupted"]
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
