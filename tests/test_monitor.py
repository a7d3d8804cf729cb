"""The prediction log and `trimflow monitor`.

The masking patterns are the shipped ones (params.yaml). Log lines come from a real `Service`
(the `trimflow serve` app on uvicorn, in a thread) of a tiny BERT classifier, and are checked
against the same model predicting in this process and the tokenizer counting pieces. The
reference profile is built by evaluate's function on tiny BERTs. `trimflow monitor` runs on
synthetic logs: samples of a synthetic reference (no drift, exit 0), shifted ones (exit 1,
naming the features), malformed ones (exit 2, naming the line).
"""

from __future__ import annotations

import json
import logging
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from helpers import TINY_LABELS, TINY_TAGS, build_tiny_bert, build_tiny_tagger, perturbed

from trimflow.cli import main
from trimflow.config.loading import ConfigError, load_params, write_params
from trimflow.layout import dvc_layout
from trimflow.models.loading import save_model_dir
from trimflow.monitoring import monitor as monitor_module
from trimflow.monitoring.features import feature_values
from trimflow.monitoring.monitor import compare
from trimflow.monitoring.profile import read_profile, reference_profile, split_texts
from trimflow.monitoring.records import LogFormatError, read_log
from trimflow.serving.masking import Masker
from trimflow.serving.pyfunc import VariantModel
from trimflow.serving.server import free_port
from trimflow.serving.service import Service
from trimflow.stages import evaluate
from trimflow.utils.atomic import write_json

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "test-token-0123456789abcdef"
TIMEOUT_S = 60
LONG_TEXT = "wheat " * 300  # more pieces than the tiny model's 128 positions
TEXTS = [
    "oil prices rose sharply on opec news",
    "mail jane.doe@example.com or call +44 20 7946 0958 about the wheat deal",
    "card 4111 1111 1111 1111 was charged in 1987 at 3.5 pct",
    "the bank 😀 cut rates ☃",
    LONG_TEXT,
]
# R8's test split: 2,189 texts in 8 classes.
R8_CLASSES = {
    "earn": 1083,
    "acq": 696,
    "crude": 121,
    "money-fx": 87,
    "interest": 81,
    "trade": 75,
    "ship": 36,
    "grain": 10,
}


# --- masking -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def masker() -> Masker:
    """The shipped patterns of serve.prediction_log.mask."""
    return Masker(load_params(ROOT / "params.yaml").serve.prediction_log.mask)


@pytest.mark.parametrize(
    ("text", "masked"),
    [
        ("write to jane.doe+r8@mail.example.co.uk today", "write to <email> today"),
        ("Reach J_Smith@ACME-corp.com.", "Reach <email>."),
        ("call +44 20 7946 0958 now", "call <phone> now"),
        ("call +1 555 123 4567", "call <phone>"),
        ("office (555) 123-4567, cell 555-123-4567", "office <phone>, cell <phone>"),
        ("dial 020 7946 0958.", "dial <phone>."),
        ("card 4111 1111 1111 1111 expired", "card <digits> expired"),
        ("card 4111-1111-1111-1111", "card <digits>"),
        ("account 12345678, ref 123456", "account <digits>, ref <digits>"),
        ("ssn 123-45-6789", "ssn <digits>"),
        ("id A12345678", "id A<digits>"),
        ("mail a.b@c.org or 555-123-4567", "mail <email> or <phone>"),
    ],
)
def test_masking_hides_addresses_phone_numbers_and_digit_runs(masker, text, masked):
    assert masker(text) == masked


@pytest.mark.parametrize(
    "text",
    [
        "Net profit rose 3.5 pct in 1987",
        "shr 1.45 dlrs vs 1.20 dlrs, revs 1,250,000 dlrs",
        "on March 31 1987 and in Q3 2024",
        "dated 2024-01-15 (15-01-2024), up 12 pct from 1986 1985 levels",
        "12345 shares at 99.5",
        "the user@ sign and example.com alone",
    ],
)
def test_masking_leaves_ordinary_numbers_and_words(masker, text):
    assert masker(text) == text


def test_a_null_pattern_masks_nothing_and_a_bad_one_is_a_config_error(masker):
    params = ROOT / "params.yaml"
    cfg = load_params(params, ["serve.prediction_log.mask.digits=null"]).serve.prediction_log
    assert (
        Masker(cfg.mask)("card 4111 1111 1111 1111, x@y.io") == "card 4111 1111 1111 1111, <email>"
    )
    with pytest.raises(ConfigError, match=r"serve.prediction_log.mask: .*phone: not a regular"):
        load_params(params, ["serve.prediction_log.mask.phone=(unclosed"])
    with pytest.raises(ConfigError, match=r"serve.prediction_log.mask.Bad-Name.*should match"):
        load_params(params, ["serve.prediction_log.mask.Bad-Name=x"])


# --- the log of a real service -----------------------------------------------------------------


@pytest.fixture(scope="module")
def project(tmp_path_factory, packaged_tokenizer) -> Path:
    """A project folder: models/tiny (a tiny BERT classifier) and params.yaml from conf/."""
    root = tmp_path_factory.mktemp("monitor-project")
    model = perturbed(build_tiny_bert(), scale=0.5)
    save_model_dir(model, packaged_tokenizer, {"labels": TINY_LABELS}, root / "models/tiny")
    write_params([], root / "params.yaml")
    return root


def post(url: str, texts: list[str]) -> list[dict]:
    """The service's answers for `texts` (status 200 asserted)."""
    request = urllib.request.Request(
        f"{url}/invocations",
        json.dumps({"inputs": texts}).encode(),
        {"Content-Type": "application/json", "Authorization": f"Bearer {TOKEN}"},
    )
    with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
        assert response.status == 200
        return json.loads(response.read())["predictions"]


def wait_until_ready(url: str) -> None:
    """Until /ready answers 200 (the model loaded and warmed up)."""
    deadline = time.monotonic() + TIMEOUT_S
    request = urllib.request.Request(f"{url}/ready", headers={"Authorization": f"Bearer {TOKEN}"})
    while True:
        try:
            with urllib.request.urlopen(request, timeout=TIMEOUT_S):
                return
        except (urllib.error.HTTPError, urllib.error.URLError):
            assert time.monotonic() < deadline, "the service was not ready in time"
            time.sleep(0.1)


def serve_and_log(project: Path, log_file: Path, raw_text: bool, requests: list[list[str]]):
    """Run a `Service` of models/tiny logging to `log_file`, send `requests` one by one, stop
    it; returns the answers."""
    cfg = load_params(
        project / "params.yaml",
        [
            f"serve.port={free_port()}",
            f"serve.prediction_log.path={log_file}",
            f"serve.prediction_log.raw_text={str(raw_text).lower()}",
        ],
    ).serve
    service = Service(cfg, lambda: VariantModel().load(project / "models/tiny"), [TOKEN], "tiny")
    thread = threading.Thread(target=service.server.run)  # not the main thread: no signals
    thread.start()
    url = f"http://127.0.0.1:{cfg.port}"
    try:
        wait_until_ready(url)
        answers = [row for texts in requests for row in post(url, texts)]
    finally:
        service.server.should_exit = True
        thread.join(TIMEOUT_S)
    assert not thread.is_alive()
    return answers


@pytest.mark.parametrize("raw_text", [False, True], ids=["no-text", "masked-text"])
def test_the_service_logs_a_line_per_answered_text(
    project, tmp_path, packaged_tokenizer, masker, raw_text
):
    log_file = tmp_path / "logs/predictions.jsonl"  # its folder is created
    log_file.parent.mkdir()
    log_file.write_text("")  # appended to
    answers = serve_and_log(project, log_file, raw_text, [TEXTS[:2], TEXTS[2:]])
    lines = [json.loads(line) for line in log_file.read_text().splitlines()]
    assert len(lines) == len(TEXTS)  # the warm-up batch is not logged
    expected_rows, expected_pieces = (
        VariantModel().load(project / "models/tiny").predict_with_pieces(TEXTS)
    )
    for line, text, answer, row, pieces in zip(
        lines, TEXTS, answers, expected_rows, expected_pieces, strict=True
    ):
        assert line["model"] == "tiny" and line["time"].endswith("+00:00")
        assert (line["label"], line["truncated"]) == (answer["label"], answer["truncated"])
        assert line["score"] == pytest.approx(answer["score"], abs=1e-6)
        assert line["score"] == pytest.approx(row["score"], abs=1e-5)
        # Pieces as the tokenizer counts them, truncated ones included.
        ids = packaged_tokenizer(text, add_special_tokens=False)["input_ids"]
        assert line["pieces"] == len(ids) == pieces["pieces"]
        assert line["unknown_pieces"] == ids.count(packaged_tokenizer.unk_token_id)
        assert line["chars"] == len(text)
        assert ("text" in line) == raw_text
        if raw_text:
            assert line["text"] == masker(text)
    assert lines[4]["truncated"] and lines[4]["pieces"] == 300
    assert lines[3]["unknown_pieces"] == 2  # the emoji and the snowman
    if raw_text:
        assert lines[1]["text"] == "mail <email> or call <phone> about the wheat deal"
        assert lines[2]["text"] == "card <digits> was charged in 1987 at 3.5 pct"
    assert len(read_log(log_file)) == len(TEXTS)  # the monitor reads what the service writes


def test_an_unwritable_log_path_stops_the_service_at_once(project, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    cfg = load_params(
        project / "params.yaml", [f"serve.prediction_log.path={blocker}/predictions.jsonl"]
    ).serve
    with pytest.raises(ConfigError, match="serve.prediction_log.path: cannot append to"):
        Service(cfg, lambda: None, [TOKEN], "tiny")


# --- evaluate's reference profile --------------------------------------------------------------


def test_evaluate_profiles_the_served_answers_of_every_test_text(project, tmp_path):
    layout = dvc_layout(tmp_path)
    texts = [TEXTS[0], LONG_TEXT, "wheat", *TEXTS[1:4]]
    layout.prepared.mkdir(parents=True)
    frame = pd.DataFrame({"text": texts, "label": ["alpha"] * len(texts)})
    frame.to_parquet(layout.prepared / "test.parquet")
    layout.models.mkdir()
    (layout.models / "tiny").symlink_to(project / "models/tiny")
    cfg = load_params(project / "params.yaml", ["model.max_length=32", "evaluate.batch_size=4"])
    profile = evaluate._reference_profile(cfg, layout, "tiny")
    model = VariantModel().load(project / "models/tiny", max_length=32)
    assert (profile["variant"], profile["task"], profile["max_length"]) == (
        "tiny",
        "classification",
        32,
    )
    assert profile["texts"] == len(profile["records"]) == len(texts)
    # In test-row order (though predicted shortest first), as the service answers each text.
    for text, record in zip(texts, profile["records"], strict=True):
        (row,), (pieces,) = model.predict_with_pieces([text])
        assert record["label"] == row["label"] and record["truncated"] == row["truncated"]
        assert record["score"] == pytest.approx(row["score"], abs=1e-5)
        assert (record["pieces"], record["chars"]) == (pieces["pieces"], len(text))
    assert profile["records"][1]["truncated"] and profile["records"][1]["pieces"] == 300
    write_json(layout.reference_profile, profile)
    assert len(read_profile(layout.reference_profile).records) == len(texts)


def test_reference_profile_of_a_tagger_lists_entities_without_their_words(
    tmp_path, packaged_tokenizer
):
    tagger = perturbed(build_tiny_tagger(), scale=0.2)
    save_model_dir(tagger, packaged_tokenizer, {"labels": TINY_TAGS}, tmp_path / "ner")
    tokens = [["Kuala", "Lumpur", "and", "Wolfsburg", "signed"], ["oil", "prices", "rose"]] * 3
    pd.DataFrame({"tokens": tokens, "tags": [["O"] * len(t) for t in tokens]}).to_parquet(
        tmp_path / "test.parquet"
    )
    texts = split_texts(tmp_path, "test", "ner")
    assert texts[0] == "Kuala Lumpur and Wolfsburg signed"
    model = VariantModel().load(tmp_path / "ner")
    profile = reference_profile(model, texts, "ner", "test", batch_size=4)
    assert profile["task"] == "ner"
    answers = model.predict_texts(texts)
    entities = [entity for record in profile["records"] for entity in record["entities"]]
    assert entities, "the tagger should find some entities"
    for record, answer in zip(profile["records"], answers, strict=True):
        assert [(e["type"], e["start"], e["end"]) for e in record["entities"]] == [
            (e["type"], e["start"], e["end"]) for e in answer["entities"]
        ]
        assert all(
            set(entity) == {"type", "start", "end", "score"} for entity in record["entities"]
        )
    write_json(tmp_path / "profile.json", profile)
    reference = read_profile(tmp_path / "profile.json")
    values = feature_values(reference.records, "ner")
    assert len(values["label"]) == len(values["confidence"]) == len(entities)
    assert values["entities"] == [len(record["entities"]) for record in profile["records"]]


# --- `trimflow monitor` on synthetic logs ------------------------------------------------------


def synthetic_records(rng: np.random.Generator, count: int) -> list[dict]:
    """Log records shaped like R8's served answers: its class shares, confident answers,
    long-tailed lengths (truncated past 128 pieces), a few unknown pieces."""
    names = list(R8_CLASSES)
    shares = np.array(list(R8_CLASSES.values())) / sum(R8_CLASSES.values())
    chars = np.exp(rng.normal(6.2, 0.8, count)).astype(int) + 1
    pieces = (chars / rng.uniform(4.0, 5.0, count)).astype(int) + 1
    unknown = np.where(rng.random(count) < 0.93, 0, rng.integers(1, 4, count))
    return [
        {
            "label": str(rng.choice(names, p=shares)),
            "score": float(1 - rng.beta(1, 30)),
            "chars": int(chars[i]),
            "pieces": int(pieces[i]),
            "unknown_pieces": int(min(unknown[i], pieces[i])),
            "truncated": bool(pieces[i] > 126),
        }
        for i in range(count)
    ]


class LogText(logging.Handler):
    """Collects the formatted records it handles; `.text` as caplog's."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))

    @property
    def text(self) -> str:
        return "\n".join(self.lines)


@pytest.fixture
def monitor_log():
    """What `trimflow monitor` logs, read from a handler on the monitor module's own logger, enabled
    at INFO for the test: independent of the logging tree earlier tests leave (in whole test-all
    runs the drift lines never reached caplog) and of pytest's per-phase caplog handlers."""
    logger, handler = monitor_module.log, LogText()
    saved = (logger.level, logger.disabled, logger.manager.disable)
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.disabled = False
    logging.disable(logging.NOTSET)
    yield handler
    logger.removeHandler(handler)
    logger.setLevel(saved[0])
    logger.disabled = saved[1]
    logging.disable(saved[2])


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[Path, list[dict]]:
    """A synthetic reference profile of R8's size: (its file, its records)."""
    records = synthetic_records(np.random.default_rng(0), sum(R8_CLASSES.values()))
    path = tmp_path_factory.mktemp("reference") / "reference_profile.json"
    write_json(
        path,
        {"variant": "synthetic", "task": "classification", "texts": 2189, "records": records},
    )
    return path, records


@pytest.fixture(scope="module")
def params(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("params") / "params.yaml"
    write_params([], path)
    return path


def write_log(path: Path, records: list[dict]) -> Path:
    """`records` as a prediction log, with the time and model the service adds."""
    with open(path, "w") as handle:
        for record in records:
            line = {"time": "2025-01-01T12:00:00.000+00:00", "model": "models:/m@champion"}
            handle.write(json.dumps({**line, **record}) + "\n")
    return path


def run_monitor(reference: Path, log: Path, out: Path, params: Path, *overrides: str) -> int:
    arguments = ["--log", str(log), "--reference", str(reference), "--out", str(out)]
    return main(["monitor", *arguments, "--params", str(params), *overrides])


def test_samples_of_the_reference_do_not_drift(reference, params, tmp_path):
    path, records = reference
    rng = np.random.default_rng(1)
    log = write_log(tmp_path / "log.jsonl", list(rng.choice(records, 500, replace=False)))
    assert run_monitor(path, log, tmp_path / "out", params) == 0
    summary = json.loads((tmp_path / "out/monitor.json").read_text())
    assert not summary["drifted"] and summary["drifted_features"] == []
    assert set(summary["features"]) == {
        "label",
        "confidence",
        "chars",
        "pieces",
        "unknown_share",
        "truncated",
    }
    assert all(result["psi"] < 0.1 for result in summary["features"].values())
    assert summary["inputs"]["logged_texts"] == 500
    assert summary["inputs"]["models"] == ["models:/m@champion"]
    assert summary["thresholds"] == {
        "psi_threshold": 0.2,
        "p_value": 0.01,
        "bins": 10,
        "min_texts": 200,
    }
    # Neither many other samples of it (of 200 to 2,000 texts), nor fresh draws from its
    # distribution, drift on the defaults.
    cfg = load_params(params).monitor
    reference_values = feature_values(read_profile(path).records, "classification")
    samples = [
        *(list(rng.choice(records, size, replace=False)) for size in (200, 500, 2000) * 10),
        *(synthetic_records(rng, size) for size in (200, 500, 2000) * 5),
    ]
    for sample in samples:
        logged = read_log(write_log(tmp_path / "sample.jsonl", sample))
        results = compare(
            cfg, "classification", reference_values, feature_values(logged, "classification")
        )
        assert not [name for name, result in results.items() if result["drifted"]], len(sample)


def one_label(records: list[dict]) -> list[dict]:
    return [record for record in records if record["label"] == "acq"][:500]


def long_texts(records: list[dict]) -> list[dict]:
    return [
        {**record, "chars": record["chars"] * 4, "pieces": record["pieces"] * 4, "truncated": True}
        for record in records[:500]
    ]


def unsure(records: list[dict]) -> list[dict]:
    rng = np.random.default_rng(2)
    return [{**record, "score": float(rng.uniform(0.3, 0.7))} for record in records[:500]]


@pytest.mark.parametrize(
    ("shift", "drifted"),
    [
        (one_label, ["label"]),
        (long_texts, ["chars", "pieces", "truncated"]),
        (unsure, ["confidence"]),
    ],
    ids=["one-label", "long-texts", "low-confidence"],
)
def test_shifted_logs_drift_exit_1_naming_the_features(
    reference, params, tmp_path, monitor_log, shift, drifted
):
    path, records = reference
    log = write_log(tmp_path / "log.jsonl", shift(records[::-1]))  # not the reference's first
    assert run_monitor(path, log, tmp_path / "out", params) == 1
    summary = json.loads((tmp_path / "out/monitor.json").read_text())
    assert summary["drifted"] and summary["drifted_features"] == drifted
    for name in drifted:
        result = summary["features"][name]
        assert result["psi"] > 0.2 and result["p_value"] < 0.01
    assert f"drift in {', '.join(drifted)}" in monitor_log.text
    page = (tmp_path / "out/monitor.html").read_text()
    assert page.count('<img src="data:image/png;base64,') == len(summary["features"])
    assert f"Drift in {', '.join(drifted)}." in page
    if shift is one_label:  # a higher bar clears it: the thresholds are settings
        assert run_monitor(path, log, tmp_path / "out", params, "monitor.psi_threshold=1e3") == 0


def test_ner_traffic_without_entities_drifts_on_entities_per_text(params, tmp_path):
    rng = np.random.default_rng(3)
    base = synthetic_records(rng, 600)
    with_entities = [
        {
            **{key: value for key, value in record.items() if key not in ("label", "score")},
            "entities": [
                {"type": str(rng.choice(["loc", "per"])), "start": 0, "end": 3, "score": 0.9}
            ]
            * int(rng.integers(1, 4)),
        }
        for record in base
    ]
    write_json(
        tmp_path / "profile.json",
        {"variant": "tagger", "task": "ner", "records": with_entities[:400]},
    )
    empty = [{**record, "entities": []} for record in with_entities[400:]]
    log = write_log(tmp_path / "log.jsonl", empty)
    assert run_monitor(tmp_path / "profile.json", log, tmp_path / "out", params) == 1
    summary = json.loads((tmp_path / "out/monitor.json").read_text())
    assert summary["drifted_features"] == ["entities"]
    assert summary["features"]["label"]["note"] == "no values in the log"
    assert summary["features"]["confidence"]["psi"] is None


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"label": "earn", "score": 0.9, "chars": 10', ":3: Invalid JSON"),
        ('{"label": "earn", "score": 0.9, "chars": 10, "truncated": false}', ":3: pieces: Field"),
        (
            '{"label": "earn", "score": 1.5, "chars": 1, "pieces": 1, "unknown_pieces": 0, '
            '"truncated": false}',
            ":3: score: Input should be less than or equal to 1",
        ),
        (
            '{"label": "earn", "score": 0.5, "chars": "12", "pieces": 1, "unknown_pieces": 0, '
            '"truncated": false}',
            ":3: chars: Input should be a valid integer",
        ),
        (
            '{"label": "earn", "score": 0.5, "chars": 12, "pieces": 1, "unknown_pieces": 2, '
            '"truncated": false}',
            ":3: 'unknown_pieces' exceeds 'pieces'",
        ),
        (
            '{"entities": [], "chars": 12, "pieces": 1, "unknown_pieces": 0, "truncated": false}',
            ":3: a ner answer, expected classification",
        ),
        (
            '{"chars": 12, "pieces": 1, "unknown_pieces": 0, "truncated": false}',
            ":3: expected 'label' and 'score' (classification) or 'entities' (NER)",
        ),
        ("[1, 2]", ":3: Input should be an object"),
    ],
    ids=["json", "missing", "range", "type", "counts", "task", "answer", "object"],
)
def test_a_malformed_line_is_exit_2_naming_file_and_line(
    reference, params, tmp_path, monitor_log, line, message
):
    path, records = reference
    log = write_log(tmp_path / "log.jsonl", records[:2])
    with open(log, "a") as handle:
        handle.write(line + "\n")
        handle.writelines(json.dumps(record) + "\n" for record in records[2:300])
    assert run_monitor(path, log, tmp_path / "out", params) == 2
    assert f"{log}{message}" in monitor_log.text
    assert not (tmp_path / "out").exists()


def test_too_few_texts_or_no_reference_is_exit_2(reference, params, tmp_path, monitor_log):
    path, records = reference
    log = write_log(tmp_path / "log.jsonl", records[:199])
    with open(log, "a") as handle:
        handle.write("\n")  # blank lines are skipped
    assert run_monitor(path, log, tmp_path / "out", params) == 2
    assert "199 texts logged, fewer than monitor.min_texts=200" in monitor_log.text
    assert run_monitor(tmp_path / "none.json", log, tmp_path / "out", params) == 2
    assert "none.json: no reference profile (evaluate writes it" in monitor_log.text
    with pytest.raises(LogFormatError, match="missing.jsonl: cannot read the log"):
        read_log(tmp_path / "missing.jsonl")
    assert not (tmp_path / "out").exists()
