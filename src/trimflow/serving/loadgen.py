"""A closed-loop load generator for a scoring server: `clients` threads, each on its own
keep-alive connection, POST one request of texts at a time to `/invocations` and send the next
as soon as the answer arrives, until `max_requests` were sent or `max_seconds` have passed.

Every exchange keeps its texts and answer, so a caller can check that each client got the
answer of its own texts (`wrong_answers`). Bounded in count and time by design: the serving
benchmark and the load test of `make test-all` use it on 127.0.0.1.
"""

from __future__ import annotations

import itertools
import json
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from http.client import HTTPConnection, HTTPException
from urllib.parse import urlsplit

import numpy as np

REQUEST_TIMEOUT_S = 60
LOST = 0  # the status of a request that got no HTTP answer (connection refused or reset)


@dataclass
class Exchange:
    """One request: its texts, the HTTP status, the predictions (200 only) and its latency."""

    client: int
    texts: list[str]
    status: int
    predictions: list[dict] | None
    seconds: float


@dataclass
class LoadRun:
    """What a load run sent and got back, and how long it took from first to last request."""

    exchanges: list[Exchange]
    wall_s: float

    def summary(self) -> dict:
        """Requests, texts answered per second, failures by status, latency percentiles (ms)."""
        answered = [exchange for exchange in self.exchanges if exchange.status == 200]
        latencies_ms = np.array([exchange.seconds for exchange in answered]) * 1000
        failures = Counter(str(e.status) for e in self.exchanges if e.status != 200)
        percentiles = (
            {f"p{q}_ms": float(np.percentile(latencies_ms, q)) for q in (50, 90, 99)}
            if len(answered)
            else {}
        )
        return {
            "requests": len(self.exchanges),
            "answered": len(answered),
            "failures_by_status": dict(failures),
            "wall_s": self.wall_s,
            "texts_per_s": sum(len(exchange.texts) for exchange in answered) / self.wall_s,
            **percentiles,
            "max_ms": float(latencies_ms.max()) if len(answered) else None,
        }


def post_json(connection: HTTPConnection, path: str, body: dict, headers: dict) -> tuple:
    """(status, parsed JSON or None) of a POST on a kept-alive connection."""
    connection.request("POST", path, json.dumps(body).encode(), headers)
    response = connection.getresponse()
    text = response.read()
    is_json = (response.getheader("content-type") or "").startswith("application/json")
    return response.status, json.loads(text) if is_json else None


def run_load(
    url: str,
    texts: Sequence[str],
    clients: int = 16,
    max_requests: int = 1000,
    max_seconds: float = 60.0,
    texts_per_request: int = 1,
    token: str | None = None,
) -> LoadRun:
    """Send `texts` in order (cycling), `texts_per_request` a request, from `clients` threads
    at once; stop at `max_requests` requests or after `max_seconds`."""
    address = urlsplit(url)
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    next_request = itertools.count()
    take = threading.Lock()
    start_together = threading.Barrier(clients)
    started = time.perf_counter()
    deadline = started + max_seconds

    def client_run(client: int) -> list[Exchange]:
        connection = HTTPConnection(address.hostname, address.port, timeout=REQUEST_TIMEOUT_S)
        exchanges = []
        start_together.wait()
        try:
            while time.perf_counter() < deadline:
                with take:
                    index = next(next_request)
                if index >= max_requests:
                    break
                first = index * texts_per_request
                batch = [texts[(first + k) % len(texts)] for k in range(texts_per_request)]
                sent_at = time.perf_counter()
                try:
                    status, answer = post_json(
                        connection, "/invocations", {"inputs": batch}, headers
                    )
                except (OSError, HTTPException):
                    status, answer = LOST, None
                    connection.close()  # reconnects on the next request
                predictions = answer["predictions"] if status == 200 else None
                elapsed = time.perf_counter() - sent_at
                exchanges.append(Exchange(client, batch, status, predictions, elapsed))
        finally:
            connection.close()
        return exchanges

    with ThreadPoolExecutor(clients) as pool:
        runs = list(pool.map(client_run, range(clients)))
    wall_s = time.perf_counter() - started
    return LoadRun([exchange for run in runs for exchange in run], wall_s)


def wrong_answers(
    exchanges: Sequence[Exchange], agrees: Callable[[str, dict], bool]
) -> list[tuple[Exchange, int]]:
    """(exchange, index of the text) of every answered text whose row `agrees(text, row)`
    rejects, or that got a different number of rows than it sent texts (index -1)."""
    wrong = []
    for exchange in exchanges:
        if exchange.status != 200:
            continue
        if len(exchange.predictions) != len(exchange.texts):
            wrong.append((exchange, -1))
            continue
        for index, (text, row) in enumerate(zip(exchange.texts, exchange.predictions, strict=True)):
            if not agrees(text, row):
                wrong.append((exchange, index))
    return wrong
