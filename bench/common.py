"""Helpers the benchmark scripts share: a free loopback port and one timed streaming request."""
import json
import socket
import time
import urllib.request
from dataclasses import dataclass


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
