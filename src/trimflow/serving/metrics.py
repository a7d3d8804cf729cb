"""Prometheus metrics of `trimflow serve`, exposed at /metrics in the text format.

Requests by route and status, their latency, the micro-batches formed, what the model answers
(labels, or entity types for NER, and their scores) and how many texts it truncated.
"""

from __future__ import annotations

import time
from collections.abc import Collection

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
)
from starlette.types import ASGIApp, Message, Receive, Scope, Send

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
CONFIDENCE_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)
OTHER_ROUTE = "other"  # unknown paths share one label: a scan cannot grow the series


def scored_labels(row: dict) -> list[tuple[str, float]]:
    """(label, score) of one prediction: its label, or each of its entities for NER."""
    if "entities" in row:
        return [(entity["type"], entity["score"]) for entity in row["entities"]]
    return [(row["label"], row["score"])]


class ServiceMetrics:
    """The service's metrics, in a registry of their own (with the process's CPU and memory)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        self.requests = Counter(
            "trimflow_requests",
            "HTTP requests by route and status (errors included)",
            ["route", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "trimflow_request_seconds",
            "Time from request to response, by route",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.batch_texts = Histogram(
            "trimflow_batch_texts",
            "Texts per micro-batch: concurrent requests merged into one model call",
            buckets=BATCH_BUCKETS,
            registry=self.registry,
        )
        self.queued_texts = Gauge(
            "trimflow_queued_texts",
            "Texts of accepted requests waiting for a micro-batch",
            registry=self.registry,
        )
        self.predictions = Counter(
            "trimflow_predictions",
            "Predicted labels (NER: entities, by type)",
            ["label"],
            registry=self.registry,
        )
        self.confidence = Histogram(
            "trimflow_confidence",
            "Score of each predicted label (NER: of each entity)",
            buckets=CONFIDENCE_BUCKETS,
            registry=self.registry,
        )
        self.truncated = Counter(
            "trimflow_truncated_texts",
            "Texts longer than the model's max_length tokens, cut to it",
            registry=self.registry,
        )

    def observe_batch(self, rows: list[dict]) -> None:
        """Count one micro-batch's size and each of its predictions."""
        self.batch_texts.observe(len(rows))
        for row in rows:
            for label, score in scored_labels(row):
                self.predictions.labels(label).inc()
                self.confidence.observe(score)
            if row["truncated"]:
                self.truncated.inc()

    def exposition(self) -> bytes:
        """Every metric in Prometheus's text format."""
        return generate_latest(self.registry)


class RequestMetrics:
    """ASGI middleware: count each HTTP request by route and status, and time it."""

    def __init__(self, app: ASGIApp, metrics: ServiceMetrics, routes: Collection[str]) -> None:
        self.app = app
        self.metrics = metrics
        self.routes = routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        route = scope["path"] if scope["path"] in self.routes else OTHER_ROUTE
        status = 500  # unless a response starts: an exception escaped the app

        async def send_noting_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        start = time.perf_counter()
        try:
            await self.app(scope, receive, send_noting_status)
        finally:
            self.metrics.latency.labels(route).observe(time.perf_counter() - start)
            self.metrics.requests.labels(route, str(status)).inc()
