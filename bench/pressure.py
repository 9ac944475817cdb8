#!/usr/bin/env python3
"""Pressure: a loopback mesh under each kind of abuse issue #15 names, one phase at a time, with
an honest request's latency and every process's resident memory measured throughout.

    bench/pressure.py [--seconds 40] [--idle 10000] [--slowloris 1000] [--slowloris-hosts 8]
                      [--clients 64]

A gateway (request deadline 30 s), one honest provider (4 slots, release builds, the default
model) and a hostile provider (`provider/examples/hostile_provider.rs`, which streams tokens
without end under the model name `endless`) run on 127.0.0.1. A prober sends one short honest
request (8 tokens, plain) every second through the whole run; each phase reports the probes'
latency (p50, max, failures), the peak RSS of the gateway and the honest provider, sampled
every 0.2 s, and the lines the gateway logged (a flood must not become a flood of log lines).
Phases, each `--seconds` long:

- baseline: nothing else;
- saturation: `--clients` threads send requests back to back (plain and streamed, 32 tokens):
  how many got 200, how many 429 with `Retry-After`, anything else, and the slowest answer
  against the gateway's 30 s deadline;
- endless: 8 threads ask the endless provider for `max_tokens` 400 (its context is 512; plain and streamed):
  each must end in an error, not in a gateway that buffers without bound;
- slowloris: `--slowloris` connections to the gateway dribble a header byte a second, spread
  over `--slowloris-hosts` source addresses (127.0.1.1, 127.0.1.2, ...): with at most 256 from
  each (the gateway's per-address cap; the defaults give 125), the header deadline is what cuts
  them off; closed ones are reopened (how many the gateway closed is reported);
- idle connections: `--idle` TCP connections opened to the honest provider's libp2p port, and
  held without a byte sent (those the node closes are reopened once a second), then as many to
  the gateway's HTTP port;
- streams from one peer: `shared/examples/flood.rs` opens generate streams to the honest
  provider from one identity, holding up to 1,000 at once, until it is banned, then the next
  identity does the same.

The other abusive TCP connections come from 127.0.0.2, another host as far as the servers can
tell (127.0.0.0/8 is all loopback), the prober's from 127.0.0.1. Every loop is bounded by the
phase's time; exits 1 when a probe failed outside the saturation phase (where 429s are the
point), an answer took past the deadline, a 429 came without `Retry-After`, a client hung, or an
endless answer was delivered as a success. Talks only to loopback.
"""
import argparse
import collections
import json
import os
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request

from common import free_port, peer_id_from_log, wait_for_providers
from soak import classify_plain, classify_stream, rss_mb

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL_NAME = "SmolLM2-135M-Instruct.Q4_1"
# The abusive host's address; the prober and the honest clients use 127.0.0.1.
ABUSER = "127.0.0.2"
DEADLINE = 30
CLIENT_TIMEOUT = 90


def post(url, body, timeout=CLIENT_TIMEOUT):
    """One chat completion; returns (status, Retry-After or None, bucket, seconds)."""
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"content-type": "application/json"})
    started = time.time()
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            if body.get("stream"):
                bucket, why = classify_stream(resp, started)
            else:
                bucket, why = classify_plain(resp.read())
            return 200, None, why or bucket, time.time() - started
    except urllib.error.HTTPError as e:
        retry = e.headers.get("retry-after")
        try:
            code = json.loads(e.read())["error"].get("code")
        except (ValueError, KeyError, TypeError, OSError):
            code = "no error object"
        return e.code, retry, code, time.time() - started
    except OSError as e:
        return 0, None, f"connection: {e}", time.time() - started


def ask(max_tokens, stream=False, model=MODEL_NAME, content="Say hello."):
    return {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens,
            "temperature": 0, "stream": stream, "verification_mode": "none"}


def lines(path):
    with open(path, "rb") as f:
        return sum(1 for _ in f)


class Sampler:
    """Peak RSS of each process, the prober's latencies and the gateway's log lines, per phase."""

    def __init__(self, pids, url, log):
        self.pids, self.url, self.log = pids, url, log
        self.peak = {}
        self.probes = []
        self.logged = 0
        self.lock = threading.Lock()
        self.stop = threading.Event()

    def reset(self):
        with self.lock:
            self.peak = {name: rss_mb(pid) for name, pid in self.pids.items()}
            self.probes = []
            self.logged = lines(self.log)

    def take(self):
        with self.lock:
            return dict(self.peak), list(self.probes), lines(self.log) - self.logged

    def sample_rss(self):
        while not self.stop.wait(0.2):
            with self.lock:
                for name, pid in self.pids.items():
                    self.peak[name] = max(self.peak.get(name, 0), rss_mb(pid))

    def probe(self):
        while not self.stop.wait(1.0):
            status, _, what, took = post(self.url, ask(8), timeout=DEADLINE + 30)
            with self.lock:
                self.probes.append((status == 200 and what == "succeeded", took, f"{status} {what}"))


def hammer(seconds, threads, body_of):
    """`threads` clients send back to back for `seconds`; a Counter of outcomes and the slowest."""
    end = time.time() + seconds
    outcomes = collections.Counter()
    slowest = [0.0]
    lock = threading.Lock()

    def client(i):
        n = 0
        while time.time() < end:
            status, retry, what, took = post(URL, body_of(i, n))
            n += 1
            with lock:
                slowest[0] = max(slowest[0], took)
                if status == 429:
                    outcomes["429 with Retry-After" if retry else "429 WITHOUT Retry-After"] += 1
                else:
                    outcomes[f"{status} {what}"] += 1
            if status == 429:
                time.sleep(0.05)

    workers = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=seconds + CLIENT_TIMEOUT + 10)
    hung = sum(1 for w in workers if w.is_alive())
    if hung:
        outcomes["hung"] += hung
    return outcomes, slowest[0]


def hold_connections(seconds, addr, count, dribble, sources=(ABUSER,)):
    """Keeps `count` TCP connections to `addr` open for `seconds` (reopening closed ones once a
    second), from the `sources` addresses in turn; with `dribble`, each sends a header byte a
    second. Returns (opened, closed by the server, most held at once)."""
    conns, opened, closed, most = [], 0, 0, 0

    def fill():
        nonlocal opened
        while len(conns) < count:
            s = socket.socket()
            s.bind((sources[opened % len(sources)], 0))
            s.setblocking(False)
            try:
                s.connect_ex(addr)
            except OSError:
                s.close()
                break
            if dribble:
                conns.append([s, False])
            else:
                conns.append([s, True])
            opened += 1

    end = time.time() + seconds
    fill()
    while time.time() < end:
        time.sleep(1.0)
        alive = []
        for entry in conns:
            s, started = entry
            try:
                if dribble:
                    if not started:
                        s.send(b"POST /v1/chat/completions HTTP/1.1\r\nHost: g\r\n")
                        entry[1] = True
                    else:
                        s.send(b"X")
                data = s.recv(4096)
                if data == b"":
                    raise ConnectionResetError
            except BlockingIOError:
                alive.append(entry)
                continue
            except OSError:
                pass
            else:
                # It answered (an error status) or will close: count it closed.
                pass
            closed += 1
            s.close()
        conns[:] = alive
        most = max(most, len(conns))
        fill()
    for s, _ in conns:
        s.close()
    return opened, closed, most


def summary(name, sampler, extra):
    peak, probes, logged = sampler.take()
    ok = [took for good, took, _ in probes if good]
    failed = collections.Counter(what for good, _, what in probes if not good)
    if failed:
        extra += "; probe failures: " + ", ".join(f"{n}x {what}" for what, n in failed.most_common(3))
    p50 = f"{statistics.median(ok) * 1000:.0f} ms" if ok else "-"
    worst = f"{max(ok) * 1000:.0f} ms" if ok else "-"
    rss = ", ".join(f"{k} {v:.0f}" for k, v in peak.items())
    print(f"| {name} | {len(probes)} | {p50} | {worst} | {sum(failed.values())} | {rss} | {logged} | {extra} |",
          flush=True)
    return sum(failed.values())


URL = ""


def main():
    global URL
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=40, help="length of each phase")
    ap.add_argument("--idle", type=int, default=10_000, help="idle connections per target")
    ap.add_argument("--slowloris", type=int, default=1_000, help="dribbling HTTP connections")
    ap.add_argument("--slowloris-hosts", type=int, default=8, choices=range(1, 255), metavar="1..254",
                    help="source addresses the slowloris connections come from")
    ap.add_argument("--clients", type=int, default=64, help="saturating clients")
    args = ap.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(hard, args.idle + args.slowloris + 1024)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, want), hard))
    if want < args.idle + 256:
        sys.exit(f"file descriptor limit {hard} is too low for {args.idle} connections; raise ulimit -n")

    subprocess.run(["cargo", "build", "--release", "--locked", "-p", "proofmesh-gateway", "-p", "proofmesh-provider",
                    "--bins"], cwd=ROOT, check=True)
    subprocess.run(["cargo", "build", "--release", "--locked", "-p", "proofmesh-shared", "--example", "flood",
                    "-p", "proofmesh-provider", "--example", "hostile_provider"], cwd=ROOT, check=True)
    bins = os.path.join(ROOT, os.environ.get("CARGO_TARGET_DIR", "target"), "release")
    model = subprocess.run([os.path.join(bins, "proofmesh-provider"), "fetch-model"], check=True,
                           capture_output=True, text=True).stdout.strip()
    work = tempfile.mkdtemp(prefix="proofmesh-pressure-")
    http, p2p, honest_port = free_port(), free_port(), free_port()
    URL = f"http://127.0.0.1:{http}/v1/chat/completions"
    gateway = subprocess.Popen([os.path.join(bins, "proofmesh-gateway"), "--http-listen", f"127.0.0.1:{http}",
                                "--p2p-listen", f"/ip4/127.0.0.1/tcp/{p2p}", "--ephemeral-key",
                                "--allow-unrefereed", "--request-timeout-secs", str(DEADLINE),
                                # Names resolve only through the operator's pins.
                                "--pin", "endless=sha256:" + "ee" * 32,
                                "--state-dir", os.path.join(work, "gateway-state")],
                               stderr=open(os.path.join(work, "gateway.log"), "w"))
    honest = subprocess.Popen([os.path.join(bins, "proofmesh-provider"), "--model", model,
                               "--key", os.path.join(work, "honest.key"), "--threads", "1", "--parallel", "4",
                               "--ctx-size", "1024", "--referee-slots", "0",
                               "--p2p-listen", f"/ip4/127.0.0.1/tcp/{honest_port}",
                               "--bootstrap", f"/ip4/127.0.0.1/tcp/{p2p}"],
                              stderr=open(os.path.join(work, "honest.log"), "w"))
    hostile = subprocess.Popen([os.path.join(bins, "examples", "hostile_provider"), model,
                                f"/ip4/127.0.0.1/tcp/{p2p}", "endless", "endless"],
                               stderr=open(os.path.join(work, "hostile.log"), "w"))
    procs = [gateway, honest, hostile]
    sampler = Sampler({"gateway": gateway.pid, "provider": honest.pid}, URL, os.path.join(work, "gateway.log"))
    bad = 0
    try:
        wait_for_providers(f"http://127.0.0.1:{http}", 2, work)
        peer = peer_id_from_log(os.path.join(work, "honest.log"))
        if not peer:
            sys.exit(f"no peer id in the honest provider's log; logs in {work}")
        post(URL, ask(8))  # warm the prompt cache and the route
        for target in (sampler.sample_rss, sampler.probe):
            threading.Thread(target=target, daemon=True).start()
        print(f"pressure: {args.seconds:g} s a phase; gateway deadline {DEADLINE} s; logs in {work}")
        print("| phase | probes | probe p50 | probe max | probes failed | peak RSS MiB | gateway log lines "
              "| what the phase did |")
        print("|---|---|---|---|---|---|---|---|")

        sampler.reset()
        time.sleep(args.seconds)
        bad += summary("baseline", sampler, "-")

        sampler.reset()
        outcomes, slowest = hammer(args.seconds, args.clients,
                                   lambda i, n: ask(32, stream=(i + n) % 2 == 0, content=f"Count to {10 + n % 7}."))
        bad += slowest > DEADLINE + 5
        bad += outcomes["hung"] + outcomes["429 WITHOUT Retry-After"]
        summary(f"saturation, {args.clients} clients", sampler,
                f"{dict(outcomes)}; slowest answer {slowest:.1f} s (deadline {DEADLINE} s)")

        sampler.reset()
        outcomes, slowest = hammer(args.seconds, 8,
                                   lambda i, n: ask(400, stream=(i + n) % 2 == 0, model="endless"))
        bad += outcomes["hung"] + sum(v for k, v in outcomes.items() if k.startswith("200 succeeded"))
        bad += summary("endless provider, 8 clients", sampler,
                       f"{dict(outcomes)}; slowest {slowest:.1f} s")

        sampler.reset()
        hosts = [f"127.0.1.{i}" for i in range(1, args.slowloris_hosts + 1)]
        opened, closed, most = hold_connections(args.seconds, ("127.0.0.1", http), args.slowloris, dribble=True,
                                                sources=hosts)
        bad += summary(f"slowloris, {args.slowloris} connections from {len(hosts)} hosts", sampler,
                       f"{opened} opened, {closed} closed by the gateway, at most {most} open at once")

        sampler.reset()
        opened, closed, most = hold_connections(args.seconds, ("127.0.0.1", honest_port), args.idle, dribble=False)
        bad += summary(f"{args.idle} idle connections to the provider", sampler,
                       f"{opened} opened, {closed} closed by the provider, at most {most} open at once")

        sampler.reset()
        opened, closed, most = hold_connections(args.seconds, ("127.0.0.1", http), args.idle, dribble=False)
        bad += summary(f"{args.idle} idle connections to the gateway", sampler,
                       f"{opened} opened, {closed} closed by the gateway, at most {most} open at once")

        sampler.reset()
        flood = subprocess.run([os.path.join(bins, "examples", "flood"),
                                f"/ip4/127.0.0.1/tcp/{honest_port}/p2p/{peer}", "--seconds", str(int(args.seconds)),
                                "--held", "1000"], capture_output=True, text=True, timeout=args.seconds + 60)
        bad += summary("streams, each peer holding up to 1,000", sampler,
                       flood.stdout.strip() or f"flood failed: {flood.stderr.strip()[-300:]}")
    finally:
        sampler.stop.set()
        for p in procs:
            if p.poll() is None:
                p.terminate()
        for p in procs:
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
    print(f"\n{'FAILED' if bad else 'held'}: {bad} problems (failed probes, answers past the deadline, "
          "hangs, 429s without Retry-After, endless answers that succeeded)")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
