"""Helpers the benchmark scripts share: a free loopback port, waiting for a mesh to come up, a
node's peer id from its log, and one timed streaming request."""
import json
import socket
import sys
import time
import urllib.request
from dataclasses import dataclass


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_providers(base_url, count, work, within=120):
    """Waits until the gateway at `base_url` reports `count` providers; exits (naming the log
    folder `work`) when it does not within `within` seconds."""
    deadline = time.time() + within
    while time.time() < deadline:
        try:
            if json.load(urllib.request.urlopen(base_url + "/healthz", timeout=5))["providers"] == count:
                return
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.5)
    sys.exit(f"the mesh did not come up; logs in {work}")


def peer_id_from_log(path):
    """The peer id a node logged with its listen address, or None."""
    with open(path) as log:
        for line in log:
            if "listening" in line and "peer=" in line:
                return line.split("peer=")[1].split()[0].strip('"')
    return None


@dataclass
class StreamTiming:
    """perf_counter() instants of one streamed completion, and what it produced."""
    start: float
    first: float  # first content chunk
    last: float  # last content chunk
    end: float  # stream closed
    chunks: int  # content chunks seen
    tokens: int | None  # completion_tokens from the usage chunk, when sent
    arrivals: list  # perf_counter() of every content chunk


def stream_chat(url, body, timeout):
    """POSTs `body` (with `"stream": true`) and times the SSE answer; raises on an error event."""
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"content-type": "application/json"})
    start = time.perf_counter()
    first = last = None
    chunks, tokens, arrivals = 0, None, []
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        for raw in resp:
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(chunk["error"])
            if chunk.get("choices") and chunk["choices"][0].get("delta", {}).get("content"):
                last = time.perf_counter()
                first = first or last
                chunks += 1
                arrivals.append(last)
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    if first is None:
        raise RuntimeError("the stream carried no content")
    return StreamTiming(start, first, last, time.perf_counter(), chunks, tokens, arrivals)
