"""`trimflow serve`: the real service, started as `trimflow serve --variant tiny` on a free port of
127.0.0.1 in a project folder holding a tiny BERT classifier, and stopped by PID.

Its answers are compared with the same `VariantModel` predicting in this process. The
micro-batcher, the token bucket and the token sources are also checked directly, and readiness
and a failed load on an in-process server (a model loader that waits, or fails, on cue).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import signal
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from http.client import HTTPConnection
from pathlib import Path

import mlflow
import pytest
from helpers import TINY_LABELS, build_tiny_bert, perturbed
from mlflow import MlflowClient
from prometheus_client.parser import text_string_to_metric_families

from trimflow.cli import main
from trimflow.config.loading import ConfigError, load_params, write_params
from trimflow.models.loading import save_model_dir
from trimflow.serving.access import TokenBucket, read_tokens
from trimflow.serving.batching import BatcherClosed, MicroBatcher
from trimflow.serving.loadgen import run_load, wrong_answers
from trimflow.serving.loading import ModelLoadError, model_source
from trimflow.serving.pyfunc import VariantModel, log_variant_model
from trimflow.serving.registry import register_recommended
from trimflow.serving.server import TrimflowServer, free_port
from trimflow.serving.service import Service

TOKEN = "test-token-0123456789abcdef"
OTHER_TOKEN = "other-token-0123456789abcdef"
TOKEN_ENV = {"TRIMFLOW_SERVE_TOKEN": TOKEN}
SUBJECTS = ["oil prices", "wheat exports", "the central bank", "quarterly earnings", "copper"]
EVENTS = ["rose sharply on opec news", "fell again", "were unchanged", "beat forecasts"]
TEXTS = [f"{subject} {event}" for subject in SUBJECTS for event in EVENTS]
LONG_TEXT = "wheat " * 300  # far more word pieces than the tiny model's 128 positions
MAX_BODY_BYTES = 16_384  # room for a text of max_chars (10,000) + 1 characters
TIMEOUT_S = 60


# --- a project to serve, and talking to the service --------------------------------------------


@pytest.fixture(scope="module")
def project(tmp_path_factory, packaged_tokenizer) -> Path:
    """A project folder: models/tiny (a tiny BERT classifier whose answers differ between
    texts) and params.yaml composed from conf/."""
    root = tmp_path_factory.mktemp("serve-project")
    model = perturbed(build_tiny_bert(), scale=0.5)
    save_model_dir(model, packaged_tokenizer, {"labels": TINY_LABELS}, root / "models/tiny")
    write_params([], root / "params.yaml")
    return root


def project_copy(project: Path, folder: Path) -> Path:
    """`folder` as a project of its own (its server logs apart) sharing `project`'s files."""
    folder.mkdir()
    for name in ("models", "params.yaml"):
        (folder / name).symlink_to(project / name)
    return folder


@pytest.fixture(scope="module")
def expected(project) -> dict[str, dict]:
    """Each text's answer when the model predicts it alone in this process."""
    model = VariantModel().load(project / "models/tiny")
    rows = {text: model.predict_texts([text])[0] for text in [*TEXTS, LONG_TEXT]}
    labels = {row["label"] for row in rows.values()}
    scores = sorted(row["score"] for row in rows.values())
    # A mis-routed answer must be told apart: several labels, scores far apart.
    gaps = [higher - lower for lower, higher in itertools.pairwise(scores)]
    assert len(labels) > 1 and min(gaps) > 1e-4
    return rows


def call(url: str, path: str, body: bytes | None = None, token: str | None = TOKEN):
    """(status, headers, JSON or text) of a GET, or a POST of `body`, with the bearer token."""
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(url + path, body, headers)
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
            status, headers, text = response.status, response.headers, response.read().decode()
    except urllib.error.HTTPError as error:
        status, headers, text = error.code, error.headers, error.read().decode()
    is_json = headers.get("content-type", "").startswith("application/json")
    return status, headers, json.loads(text) if is_json else text


def predict(url: str, texts: list[str]) -> list[dict]:
    """The service's answers for `texts`; fails on any status but 200."""
    status, _, answer = call(url, "/invocations", json.dumps({"inputs": texts}).encode())
    assert status == 200, answer
    return answer["predictions"]


def assert_answers(rows: list[dict], texts: list[str], expected: dict[str, dict]) -> None:
    """`rows` are the in-process answers of `texts`, in order (scores up to padding noise)."""
    assert len(rows) == len(texts)
    for row, text in zip(rows, texts, strict=True):
        want = expected[text]
        assert (row["label"], row["truncated"]) == (want["label"], want["truncated"]), text
        assert row["score"] == pytest.approx(want["score"], abs=1e-5), text


def wait_until_ready(url: str, token: str = TOKEN) -> None:
    """Until /ready answers 200 (the model loaded and warmed up)."""
    deadline = time.monotonic() + TIMEOUT_S
    while call(url, "/ready", token=token)[0] != 200:
        assert time.monotonic() < deadline, "the service was not ready in time"
        time.sleep(0.1)


def metrics(url: str) -> dict[tuple, float]:
    """The samples of /metrics: (name, (label, value), ...) -> value."""
    status, _, text = call(url, "/metrics")
    assert status == 200
    return {
        (sample.name, *sorted(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def deltas(before: dict[tuple, float], after: dict[tuple, float]) -> dict[tuple, float]:
    """How much each sample grew (new samples from zero)."""
    return {key: value - before.get(key, 0.0) for key, value in after.items()}


@pytest.fixture(scope="module")
def server(project):
    """`trimflow serve --variant tiny` with batches of up to 8 texts, no rate limit, ready."""
    arguments = [
        *("--variant", "tiny", "serve.max_batch=8", "serve.max_wait_ms=100"),
        *("serve.rate_limit=null", f"serve.max_body_bytes={MAX_BODY_BYTES}"),
    ]
    with TrimflowServer(project, arguments, TOKEN_ENV) as running:
        running.wait_until_ready(TOKEN)
        yield running
    assert running.process.returncode == 0, running.stderr_tail()


# --- access ------------------------------------------------------------------------------------


def test_health_needs_no_token(server):
    assert call(server.url, "/health", token=None)[:1] == (200,)


@pytest.mark.parametrize("path", ["/ready", "/metrics", "/invocations", "/no-such-route"])
def test_every_other_route_needs_the_token(server, path):
    body = json.dumps({"inputs": TEXTS[:1]}).encode() if path == "/invocations" else None
    for token in (None, "wrong-token-0123456789abcdef", TOKEN[:-1], f"{TOKEN}x"):
        status, headers, answer = call(server.url, path, body, token=token)
        assert status == 401 and headers["WWW-Authenticate"] == "Bearer"
        assert answer["error_code"] == "UNAUTHORIZED"
    basic = urllib.request.Request(server.url + path, body, {"Authorization": f"Basic {TOKEN}"})
    with pytest.raises(urllib.error.HTTPError, match="401"):
        urllib.request.urlopen(basic, timeout=TIMEOUT_S)
    assert call(server.url, path, body)[0] == (404 if path == "/no-such-route" else 200)


# --- answers -----------------------------------------------------------------------------------


def test_answers_are_the_in_process_predictions(server, expected):
    assert_answers(predict(server.url, [*TEXTS, LONG_TEXT]), [*TEXTS, LONG_TEXT], expected)
    assert predict(server.url, [LONG_TEXT])[0]["truncated"]


@pytest.mark.parametrize(
    "request_body",
    [
        {"instances": TEXTS[:3]},
        {"dataframe_split": {"columns": ["text"], "data": [[text] for text in TEXTS[:3]]}},
        {"dataframe_records": [{"text": text} for text in TEXTS[:3]]},
    ],
    ids=["instances", "dataframe_split", "dataframe_records"],
)
def test_every_mlflow_request_format_is_understood(server, expected, request_body):
    status, _, answer = call(server.url, "/invocations", json.dumps(request_body).encode())
    assert status == 200, answer
    assert_answers(answer["predictions"], TEXTS[:3], expected)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"inputs": ["fine", 3]}, "input[1] is a int, not a string"),
        ({"inputs": ["fine", "ok", "   "]}, "input[2] is empty"),
        ({"inputs": ["x" * 10_001]}, "input[0] has 10001 characters, more than max_chars=10000"),
        ({"inputs": []}, "the input list is empty"),
        ({"inputs": "one text"}, "expected a list of texts, got str"),
        ({"text": ["a"]}, "expected a JSON object with one of the keys inputs, instances"),
        (
            {"dataframe_split": {"columns": ["text"], "data": [["a"], [None]]}},
            "input[1] is missing",
        ),
        ({"dataframe_split": ["a"]}, "dataframe_split: not a data frame"),
        (b'{"inputs": ["unterminated', "the request body is not valid JSON"),
    ],
)
def test_bad_requests_are_400_naming_the_item(server, body, message):
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    status, _, answer = call(server.url, "/invocations", raw)
    assert status == 400
    assert answer["error_code"] == "INVALID_PARAMETER_VALUE" and message in answer["message"]


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_a_body_over_max_body_bytes_is_413(server, chunked):
    body = json.dumps({"inputs": ["oil " * 1000] * 5}).encode()
    assert len(body) > MAX_BODY_BYTES
    connection = HTTPConnection("127.0.0.1", server.port, timeout=TIMEOUT_S)
    headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
    if chunked:  # no Content-Length: the service counts what it reads
        pieces = (body[start : start + 1024] for start in range(0, len(body), 1024))
        connection.request("POST", "/invocations", pieces, headers, encode_chunked=True)
    else:
        connection.request("POST", "/invocations", body, headers)
    response = connection.getresponse()
    answer = json.loads(response.read())
    connection.close()
    assert response.status == 413
    assert answer["message"] == f"the request body exceeds serve.max_body_bytes={MAX_BODY_BYTES}"


# --- micro-batching and metrics ----------------------------------------------------------------


def test_concurrent_callers_each_get_their_own_answers_in_shared_batches(server, expected):
    clients, rounds = 16, 4
    # Client c sends, in round r, one or two texts of its own: interleaved, all different.
    plan = {
        (client, round_): [TEXTS[(client + 5 * round_) % len(TEXTS)]]
        + ([TEXTS[(client * 3 + round_) % len(TEXTS)]] if (client + round_) % 3 == 0 else [])
        for client in range(clients)
        for round_ in range(rounds)
    }
    start_together = threading.Barrier(clients)

    def client_run(client: int) -> list[tuple[list[str], list[dict]]]:
        answers = []
        for round_ in range(rounds):
            start_together.wait(timeout=TIMEOUT_S)
            texts = plan[client, round_]
            answers.append((texts, predict(server.url, texts)))
        return answers

    before = metrics(server.url)
    with ThreadPoolExecutor(clients) as pool:
        results = [answer for answers in pool.map(client_run, range(clients)) for answer in answers]
    grown = deltas(before, metrics(server.url))
    assert len(results) == clients * rounds
    for texts, rows in results:
        assert_answers(rows, texts, expected)
    sent = sum(len(texts) for texts in plan.values())
    batches = grown[("trimflow_batch_texts_count",)]
    assert grown[("trimflow_batch_texts_sum",)] == sent
    assert batches < clients * rounds  # requests were merged
    assert grown[("trimflow_batch_texts_bucket", ("le", "8.0"))] == batches  # max_batch held
    assert grown[("trimflow_requests_total", ("route", "/invocations"), ("status", "200"))] == (
        clients * rounds
    )


@pytest.mark.slow  # the bounded load test of make test-all
def test_a_bounded_load_of_16_clients_loses_and_misroutes_nothing(server, expected):
    texts = [*TEXTS, LONG_TEXT]
    before = metrics(server.url)
    run = run_load(server.url, texts, clients=16, max_requests=600, max_seconds=90, token=TOKEN)
    grown = deltas(before, metrics(server.url))
    summary = run.summary()
    assert summary["requests"] >= 16 and summary["answered"] == summary["requests"], summary

    def agrees(text: str, row: dict) -> bool:
        want = expected[text]
        same = (row["label"], row["truncated"]) == (want["label"], want["truncated"])
        return same and abs(row["score"] - want["score"]) <= 1e-5

    assert wrong_answers(run.exchanges, agrees) == []
    assert grown[("trimflow_batch_texts_sum",)] == summary["requests"]
    assert grown[("trimflow_batch_texts_count",)] < summary["requests"] / 2  # merged under load


def test_metrics_count_requests_predictions_and_truncation(server, expected):
    texts = [TEXTS[0], TEXTS[1], LONG_TEXT]
    before = metrics(server.url)
    predict(server.url, texts[:2])
    predict(server.url, texts[2:])
    call(server.url, "/invocations", b"{}")
    call(server.url, "/invocations", b"{}", token=None)
    grown = deltas(before, metrics(server.url))

    def requests(status: int) -> float:
        return grown[
            ("trimflow_requests_total", ("route", "/invocations"), ("status", str(status)))
        ]

    assert (requests(200), requests(400), requests(401)) == (2, 1, 1)
    assert grown[("trimflow_request_seconds_count", ("route", "/invocations"))] == 4
    assert grown[("trimflow_requests_total", ("route", "/metrics"), ("status", "200"))] == 1
    labels = Counter(expected[text]["label"] for text in texts)
    for label in TINY_LABELS:
        assert grown.get(("trimflow_predictions_total", ("label", label)), 0) == labels[label]
    assert grown[("trimflow_confidence_count",)] == len(texts)
    assert grown[("trimflow_confidence_sum",)] == pytest.approx(
        sum(expected[text]["score"] for text in texts), abs=1e-4
    )
    assert grown[("trimflow_truncated_texts_total",)] == 1
    assert grown[("trimflow_batch_texts_sum",)] == len(texts)
    assert grown[("trimflow_queued_texts",)] == 0


# --- the token bucket, graceful shutdown (servers of their own) --------------------------------


def test_rate_limit_per_token_from_a_token_file(project, tmp_path):
    token_file = tmp_path / "tokens"
    token_file.write_text(f"{TOKEN}\n\n{OTHER_TOKEN}\n")
    arguments = ["--variant", "tiny", f"serve.token_file={token_file}", "serve.rate_limit=2"]
    # The file's tokens, not the environment's: the variable names another token.
    env = {"TRIMFLOW_SERVE_TOKEN": "environment-token-0123456789"}
    with TrimflowServer(project_copy(project, tmp_path / "limited"), arguments, env) as server:
        server.wait_until_ready(TOKEN)
        time.sleep(1.1)  # the bucket refills: a burst of 2
        answers = [call(server.url, "/ready") for _ in range(10)]
        statuses = [status for status, _, _ in answers]
        assert statuses[:2] == [200, 200] and 429 in statuses
        status, headers, answer = answers[statuses.index(429)]
        assert answer["error_code"] == "TOO_MANY_REQUESTS" and int(headers["Retry-After"]) >= 1
        assert call(server.url, "/ready", token=OTHER_TOKEN)[0] == 200  # a bucket of its own
        assert call(server.url, "/ready", token=env["TRIMFLOW_SERVE_TOKEN"])[0] == 401
        assert {call(server.url, "/health", token=None)[0] for _ in range(6)} == {200}


@pytest.mark.slow  # a signal to a real process: make test-all
def test_sigterm_finishes_the_request_in_flight_then_exits_0(project, tmp_path, expected):
    # A lone request waits max_wait_ms for company: 3 s in flight.
    arguments = ["--variant", "tiny", "serve.max_wait_ms=3000", "serve.rate_limit=null"]
    server = TrimflowServer(project_copy(project, tmp_path / "draining"), arguments, TOKEN_ENV)
    with server:
        server.wait_until_ready(TOKEN)
        texts = TEXTS[:2]
        with ThreadPoolExecutor(1) as pool:
            in_flight = pool.submit(predict, server.url, texts)
            deadline = time.monotonic() + TIMEOUT_S
            while metrics(server.url)[("trimflow_queued_texts",)] < len(texts):
                assert time.monotonic() < deadline and not in_flight.done()
                time.sleep(0.05)
            os.killpg(server.process.pid, signal.SIGTERM)
            assert_answers(in_flight.result(timeout=TIMEOUT_S), texts, expected)
        assert server.process.wait(timeout=TIMEOUT_S) == 0, server.stderr_tail()
    assert "Shutting down" in server.stderr_tail()


# --- start-up: readiness, refusals -------------------------------------------------------------


def in_process_service(project: Path, load_model) -> Service:
    """A `Service` of the project's params on a free port, not started."""
    cfg = load_params(project / "params.yaml", [f"serve.port={free_port()}"]).serve
    return Service(cfg, load_model, [TOKEN])


def test_ready_only_once_the_model_is_loaded_and_warm(project, expected):
    loaded = threading.Event()

    def load_on_cue() -> VariantModel:
        assert loaded.wait(TIMEOUT_S)
        return VariantModel().load(project / "models/tiny")

    service = in_process_service(project, load_on_cue)
    url = f"http://127.0.0.1:{service.cfg.port}"
    thread = threading.Thread(target=service.server.run)  # not the main thread: no signals
    thread.start()
    try:
        deadline = time.monotonic() + TIMEOUT_S
        while not service.server.started:
            assert time.monotonic() < deadline and thread.is_alive()
            time.sleep(0.05)
        assert call(url, "/health", token=None)[0] == 200
        status, _, answer = call(url, "/ready")
        assert (status, answer) == (503, {"ready": False})
        status, _, answer = call(url, "/invocations", json.dumps({"inputs": TEXTS[:1]}).encode())
        assert (status, answer["error_code"]) == (503, "SERVICE_UNAVAILABLE")
        loaded.set()
        wait_until_ready(url)
        assert_answers(predict(url, TEXTS[:2]), TEXTS[:2], expected)
    finally:
        loaded.set()
        service.server.should_exit = True
        thread.join(TIMEOUT_S)
    assert not thread.is_alive()


def test_a_model_that_fails_to_load_stops_the_service(project):
    def failing_load() -> VariantModel:
        raise OSError("the model's disk is gone")

    service = in_process_service(project, failing_load)
    thread = threading.Thread(target=service.server.run)
    thread.start()
    thread.join(TIMEOUT_S)
    assert not thread.is_alive()
    assert str(service.failure) == "the model's disk is gone"


def test_a_registered_model_is_served_through_its_pyfunc(project, tracking_db, tmp_path, expected):
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(tracking_db)
    try:
        experiment = mlflow.create_experiment(tmp_path.name, (tmp_path / "artifacts").as_uri())
        with mlflow.start_run(experiment_id=experiment) as run:
            info = log_variant_model(project / "models/tiny")
        name = f"serve-{tmp_path.name}"
        client = MlflowClient(tracking_db)
        register_recommended(client, run.info.run_id, info.model_uri, name, 0.9, "tiny")
        cfg = load_params(project / "params.yaml", [f"tracking.uri={tracking_db}"])
        source = model_source(cfg, f"models:/{name}@champion", None)
        model = source.load()
        with pytest.raises(ModelLoadError, match=f"models:/{name}@staging: "):
            model_source(cfg, f"models:/{name}@staging", None)
    finally:
        mlflow.set_tracking_uri(previous)
    assert source.name == f"models:/{name}/1"  # the alias pinned: the version logged is loaded
    assert_answers(model.predict_texts(TEXTS), TEXTS, expected)


@pytest.mark.parametrize(
    ("env_token", "arguments", "message"),
    [
        (None, ["--variant", "tiny"], "the environment variable TRIMFLOW_SERVE_TOKEN (named by"),
        ("short", ["--variant", "tiny"], "a token is shorter than 16 characters"),
        (None, ["--variant", "tiny", "serve.token_env=MY_TOKEN"], "variable MY_TOKEN (named"),
        (TOKEN, ["--variant", "nope"], "no such variant"),
        (TOKEN, ["--variant", "tiny", "serve.prot=1"], "serve.prot: unknown key"),
    ],
)
def test_serve_refuses_to_start(project, monkeypatch, caplog, env_token, arguments, message):
    monkeypatch.chdir(project)
    monkeypatch.delenv("TRIMFLOW_SERVE_TOKEN", raising=False)
    if env_token is not None:
        monkeypatch.setenv("TRIMFLOW_SERVE_TOKEN", env_token)
    assert main(["serve", *arguments]) == 2
    assert message in caplog.text


# --- the parts, directly -----------------------------------------------------------------------


def test_tokens_come_from_the_environment_or_else_a_file(project, tmp_path, monkeypatch):
    cfg = load_params(project / "params.yaml").serve
    monkeypatch.setenv("TRIMFLOW_SERVE_TOKEN", f" {TOKEN}\n")
    assert read_tokens(cfg) == [TOKEN]
    token_file = tmp_path / "tokens"
    token_file.write_text(f"{OTHER_TOKEN}\n\n  {TOKEN}  \n")
    cfg.token_file = str(token_file)
    assert read_tokens(cfg) == [OTHER_TOKEN, TOKEN]
    token_file.write_text("\n")
    with pytest.raises(ConfigError, match=r"serve.token_file \(.*tokens\) holds none"):
        read_tokens(cfg)
    cfg.token_file = str(tmp_path / "missing")
    with pytest.raises(ConfigError, match="serve.token_file: .*missing not found"):
        read_tokens(cfg)


def test_token_bucket_allows_bursts_of_one_second_then_the_rate():
    now = [0.0]
    bucket = TokenBucket(2.0, clock=lambda: now[0])
    assert [bucket.take() for _ in range(3)] == [True, True, False]
    assert bucket.wait_s() == 1
    now[0] = 0.5  # one token back
    assert [bucket.take(), bucket.take()] == [True, False]
    now[0] = 100.0  # never more than the burst
    assert [bucket.take() for _ in range(3)] == [True, True, False]


def test_micro_batcher_merges_splits_and_drains():
    batches = []

    def predict_batch(texts: list[str]) -> list[str]:
        batches.append(list(texts))
        return [text.upper() for text in texts]

    async def scenario() -> list[list[str]]:
        batcher = MicroBatcher(predict_batch, max_batch=4, max_wait_s=0.2)
        requests = [["a"], ["b", "c"], ["d"], ["e", "f", "g", "h", "i"], ["j"]]
        answers = await asyncio.gather(*(batcher.predict(texts) for texts in requests))
        lone = asyncio.ensure_future(batcher.predict(["k"]))
        await asyncio.sleep(0)
        await batcher.close()  # answers the queued request at once
        with pytest.raises(BatcherClosed):
            await batcher.predict(["late"])
        return [*answers, await lone]

    started = time.monotonic()
    answers = asyncio.run(scenario())
    assert time.monotonic() - started < 1.5
    assert answers == [["A"], ["B", "C"], ["D"], ["E", "F", "G", "H", "I"], ["J"], ["K"]]
    # Full batches go at once; a request larger than max_batch goes alone.
    assert batches == [["a", "b", "c", "d"], ["e", "f", "g", "h", "i"], ["j"], ["k"]]
