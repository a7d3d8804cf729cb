"""`trimflow serve`: the HTTP service of a variant, on FastAPI and uvicorn.

The model is the pyfunc's `VariantModel` (from a registered model, or a variant directory of
this project), so it answers `POST /invocations` as `mlflow models serve` does: the same request
formats, `{"predictions": [...]}`, 400 naming a bad item. Around it: micro-batching
(`batching.py`), a bearer token and a rate limit (`access.py`), Prometheus metrics
(`metrics.py`), `/health` (alive, no token) and `/ready` (model loaded and warmed up), the
opt-in prediction log (`prediction_log.py`), and `POST /explain`: word attributions of the
predicted labels (`trimflow.explain`). The model loads in the background once the port is
open; SIGTERM lets in-flight requests finish.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import threading
from collections.abc import Callable, Iterator
from functools import partial
from typing import Any

import pandas as pd
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from mlflow.exceptions import MlflowException
from prometheus_client import CONTENT_TYPE_LATEST
from uvicorn.server import HANDLED_SIGNALS

from trimflow.config.schema import ServeConfig, TrimflowConfig
from trimflow.explain.attribution import ExplainError, explain_texts, explanation_method
from trimflow.serving.access import AccessControl, error_response, read_tokens
from trimflow.serving.batching import BatcherClosed, MicroBatcher
from trimflow.serving.loading import ModelLoadError, model_source
from trimflow.serving.metrics import RequestMetrics, ServiceMetrics
from trimflow.serving.prediction_log import PredictionLog
from trimflow.serving.pyfunc import (
    INPUT_EXAMPLE,
    VariantModel,
    input_texts,
    invalid_input,
    validate_texts,
)

OPEN_PATHS = frozenset({"/health"})
ROUTES = frozenset({"/health", "/ready", "/metrics", "/invocations", "/explain"})
# MLflow's scoring protocol: a list of texts, or a frame with a `text` (or single) column.
LIST_FORMATS = ("inputs", "instances")
FRAME_FORMATS = {
    "dataframe_split": lambda split: pd.DataFrame(split["data"], columns=split.get("columns")),
    "dataframe_records": pd.DataFrame.from_records,
}
log = logging.getLogger(__name__)


class Rejected(Exception):
    """A request answered with an error status and a message saying why."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def request_texts(payload: Any) -> list:
    """The texts of a scoring request's JSON: `{"inputs" | "instances": [...]}`, or
    `{"dataframe_split" | "dataframe_records": ...}` with a `text` (or single) column."""
    keys = payload.keys() if isinstance(payload, dict) else ()
    formats = [key for key in (*LIST_FORMATS, *FRAME_FORMATS) if key in keys]
    if len(formats) != 1:
        raise invalid_input(
            "expected a JSON object with one of the keys "
            f"{', '.join((*LIST_FORMATS, *FRAME_FORMATS))}"
        )
    (key,) = formats
    if key in LIST_FORMATS:
        return input_texts(payload[key])
    try:
        frame = FRAME_FORMATS[key](payload[key])
    except (TypeError, ValueError, KeyError) as error:
        raise invalid_input(f"{key}: not a data frame ({error})") from None
    return input_texts(frame)


def explain_request(payload: Any) -> tuple[list, str]:
    """The texts and method of an /explain request: `{"text": "..."}` or `{"texts": [...]}`,
    and `"method"`: `ablation` (the default: it explains any variant), `ig` or `auto`."""
    keys = payload.keys() if isinstance(payload, dict) else ()
    if ("text" in keys) == ("texts" in keys):
        raise invalid_input('expected a JSON object with "text" (a text) or "texts" (a list)')
    texts = [payload["text"]] if "text" in keys else input_texts(payload["texts"])
    return texts, payload.get("method", "ablation")


async def read_body(request: Request, limit: int) -> bytes:
    """The request body; `Rejected` (413) as soon as it is known to exceed `limit` bytes."""
    too_large = Rejected(413, f"the request body exceeds serve.max_body_bytes={limit}")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_large
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise too_large
    return bytes(body)


def parse_json(body: bytes) -> Any:
    """The JSON document of a request body; 400 (as MLflow's) when it is not one."""
    try:
        return json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise invalid_input(f"the request body is not valid JSON: {error}") from None


class Service:
    """A model behind the routes of `create_app`, on a uvicorn server (`self.server`).

    Started, it loads the model with `load_model` in a thread, warms it up on a full batch,
    and only then is ready; if loading fails it records `failure` and stops the server. With
    `serve.prediction_log.path` set, each batch's answers are logged, naming `model_name`."""

    def __init__(
        self,
        cfg: ServeConfig,
        load_model: Callable[[], VariantModel],
        tokens: list[str],
        model_name: str = "",
    ) -> None:
        self.cfg = cfg
        self.load_model = load_model
        self.metrics = ServiceMetrics()
        self.prediction_log = (
            PredictionLog(cfg.prediction_log, model_name) if cfg.prediction_log.path else None
        )
        self.model: VariantModel | None = None
        # Held while integrated gradients hook the model's embedding layer: no batch may pass.
        self.gradient_hooks = threading.Lock()
        self.batcher: MicroBatcher | None = None
        self.loading: asyncio.Task | None = None
        self.failure: Exception | None = None
        self.server = uvicorn.Server(
            uvicorn.Config(
                create_app(self, tokens),
                host=cfg.host,
                port=cfg.port,
                timeout_graceful_shutdown=cfg.shutdown_timeout_s,
                log_config=None,  # trimflow's logging
                access_log=False,  # /metrics counts requests
                server_header=False,
            )
        )

    async def start(self) -> None:
        """Begin loading the model (the port opens meanwhile)."""
        self.loading = asyncio.create_task(self._load())

    async def _load(self) -> None:
        try:
            model = await asyncio.to_thread(self.load_model)
            await asyncio.to_thread(model.predict_texts, INPUT_EXAMPLE * self.cfg.max_batch)
        except Exception as error:
            log.exception("could not load the model")
            self.failure = error
            self.server.should_exit = True
            return
        self.batcher = MicroBatcher(
            partial(self._predict_batch, model), self.cfg.max_batch, self.cfg.max_wait_ms / 1000
        )
        self.metrics.queued_texts.set_function(lambda: self.batcher.queued_texts)
        self.model = model
        log.info("ready: http://%s:%d (labels: %s)", self.cfg.host, self.cfg.port, model.labels)

    def _predict_batch(self, model: VariantModel, texts: list[str]) -> list[dict]:
        """One micro-batch, in the batcher's worker thread: predict, count, log."""
        with self.gradient_hooks:
            if self.prediction_log is None:
                rows = model.predict_texts(texts, batch_size=self.cfg.max_batch)
            else:
                rows, pieces = model.predict_with_pieces(texts, batch_size=self.cfg.max_batch)
                self.prediction_log.write(texts, rows, pieces)
        self.metrics.observe_batch(rows)
        return rows

    async def stop(self) -> None:
        """After the server has let in-flight requests finish: stop the batcher, close the
        prediction log."""
        if self.loading is not None:
            self.loading.cancel()
        if self.batcher is not None:
            await self.batcher.close()
        if self.prediction_log is not None:
            self.prediction_log.close()

    def loaded_model(self) -> VariantModel:
        """The model; `Rejected` (503) while it loads."""
        if self.model is None:
            raise Rejected(503, "the model is still loading; see /ready")
        return self.model

    async def predict(self, texts: list) -> list[dict]:
        """The rows of a request's texts (checked here), batched with concurrent requests;
        `Rejected` (503) while the model loads or the service shuts down."""
        texts = validate_texts(texts, self.loaded_model().max_chars)
        try:
            return await self.batcher.predict(texts)
        except BatcherClosed as closed:
            raise Rejected(503, str(closed)) from None

    async def explain(self, texts: list, method: str) -> list[dict]:
        """The explanations of a request's texts (at most `serve.max_batch`) by `method`, in a
        worker thread; 400 for a method the model cannot use, 503 while it loads."""
        model = self.loaded_model()
        if len(texts) > self.cfg.max_batch:
            raise invalid_input(
                f"{len(texts)} texts to explain, more than serve.max_batch={self.cfg.max_batch}"
            )
        try:
            method = explanation_method(model, method)
        except ExplainError as error:
            raise invalid_input(str(error)) from None
        return await asyncio.to_thread(self._explain_texts, model, texts, method)

    def _explain_texts(self, model: VariantModel, texts: list, method: str) -> list[dict]:
        """`explain_texts` in a worker thread; integrated gradients hold `gradient_hooks`."""
        with self.gradient_hooks if method == "ig" else contextlib.nullcontext():
            return explain_texts(model, texts, method)


def create_app(service: Service, tokens: list[str]) -> FastAPI:
    """The routes of `service` behind its metrics and access control."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        await service.start()
        yield
        await service.stop()

    app = FastAPI(title="trimflow", lifespan=lifespan, openapi_url=None)

    @app.exception_handler(Rejected)
    async def rejected(request: Request, error: Rejected) -> JSONResponse:
        return error_response(error.status, str(error))

    @app.exception_handler(MlflowException)
    async def bad_input(request: Request, error: MlflowException) -> Response:
        return Response(
            error.serialize_as_json(), error.get_http_status_code(), media_type="application/json"
        )

    @app.get("/health")
    async def health() -> dict:
        """Liveness: the process serves HTTP (no token needed)."""
        return {"status": "ok"}

    @app.get("/ready")
    async def ready() -> JSONResponse:
        """Readiness: 200 once the model is loaded and warmed up, 503 before."""
        loaded = service.model is not None
        return JSONResponse({"ready": loaded}, 200 if loaded else 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        """The Prometheus metrics."""
        return Response(service.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    @app.post("/invocations")
    async def invocations(request: Request) -> JSONResponse:
        """Predictions of the request's texts, as `mlflow models serve` answers them."""
        payload = parse_json(await read_body(request, service.cfg.max_body_bytes))
        return JSONResponse({"predictions": await service.predict(request_texts(payload))})

    @app.post("/explain")
    async def explain(request: Request) -> JSONResponse:
        """Word attributions of the predicted label of each text (`explain_request`), as
        `trimflow explain` writes them: `{"explanations": [...]}`.

        Cost per R8 text of 128 tokens (112 words), 2 threads of an idle AVX2 EPYC: `ablation`
        (the default) runs a forward pass per word plus one: 0.75 s on the 3-layer pruned ONNX
        int8 MiniLM, 2.5 s on the 6-layer one, 2.7 s on the fp32 one; `ig` runs 50 forward and
        backward passes (3.1 s on the fp32 MiniLM), while the predictions of `/invocations`
        wait.
        """
        payload = parse_json(await read_body(request, service.cfg.max_body_bytes))
        return JSONResponse({"explanations": await service.explain(*explain_request(payload))})

    app.add_middleware(
        AccessControl, tokens=tokens, rate=service.cfg.rate_limit, open_paths=OPEN_PATHS
    )
    app.add_middleware(RequestMetrics, metrics=service.metrics, routes=ROUTES)  # outermost
    return app


@contextlib.contextmanager
def signals_left_to_uvicorn() -> Iterator[None]:
    """SIGTERM and SIGINT ignored around the server: uvicorn catches them while it runs, stops
    gracefully, then raises the signal again for the handler it found, which is this one, so
    that a server stopped gracefully exits 0."""
    previous = {signum: signal.signal(signum, signal.SIG_IGN) for signum in HANDLED_SIGNALS}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def serve(cfg: TrimflowConfig, model_uri: str | None = None, variant: str | None = None) -> None:
    """Serve until SIGTERM or SIGINT (see the module docstring); `ConfigError` without a
    token or with an unwritable prediction log, `ModelLoadError` when the model cannot be
    loaded."""
    source = model_source(cfg, model_uri, variant)
    service = Service(cfg.serve, source.load, read_tokens(cfg.serve), source.name)
    log.info("loading %s", source.name)
    with signals_left_to_uvicorn():
        service.server.run()
    if service.failure is not None:
        raise ModelLoadError(f"could not load the model: {service.failure}")
