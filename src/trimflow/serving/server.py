"""Local servers on 127.0.0.1, started and stopped by their process group.

`ScoringServer` (`mlflow models serve`) serves the serving test and the serving benchmark:
`with ScoringServer(uri, store, workdir) as server: server.predict(texts)`. The MLflow UI test
runs `mlflow ui` through the same `LocalMlflowServer`; `TrimflowServer` runs `trimflow serve`.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

START_TIMEOUT_S = 180
STOP_TIMEOUT_S = 20
REQUEST_TIMEOUT_S = 300


class ServerError(RuntimeError):
    """The server did not start, died, or answered a request with an error."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class LocalServer:
    """A command serving HTTP on a free port of 127.0.0.1 in its own session.

    Subclasses give the `command()` that serves on `self.port` and the `health_path` that
    answers 200 once it is ready. Its stdout and stderr go to `workdir/server.{stdout,stderr}`;
    errors quote the stderr tail.
    """

    health_path = "/health"
    start_timeout_s = START_TIMEOUT_S

    def __init__(self, workdir: str | Path, env: dict[str, str] | None = None) -> None:
        self.workdir = Path(workdir)
        self.env = env or {}
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    def command(self) -> list[str]:
        """The command line of this kind of server, serving on 127.0.0.1:`self.port`."""
        raise NotImplementedError

    @property
    def stderr_path(self) -> Path:
        """Where the server's stderr goes."""
        return self.workdir / "server.stderr"

    def stderr_tail(self, chars: int = 4000) -> str:
        """The end of the server's stderr, for error messages."""
        return self.stderr_path.read_text(errors="replace")[-chars:]

    def start(self) -> None:
        """Start the server in a new session (uvicorn runs in a child) and wait until healthy."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        # An MLflow server execs `uvicorn`: this interpreter's bin must be on PATH, as in a venv.
        path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
        env = {**os.environ, **self.env, "PATH": path}
        with (
            open(self.workdir / "server.stdout", "wb") as out,
            open(self.stderr_path, "wb") as err,
        ):
            self.process = subprocess.Popen(
                self.command(),
                env=env,
                cwd=self.workdir,
                stdout=out,
                stderr=err,
                start_new_session=True,
            )
        self._wait_until_ready()

    def _wait_until_ready(self) -> None:
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ServerError(
                    f"server exited with {self.process.returncode}:\n{self.stderr_tail()}"
                )
            try:
                with urllib.request.urlopen(self.url + self.health_path, timeout=5) as response:
                    if response.status == 200:
                        return
            except OSError:
                time.sleep(0.5)
        self.stop()
        raise ServerError(f"server not ready in {self.start_timeout_s} s:\n{self.stderr_tail()}")

    def stop(self) -> None:
        """SIGTERM the server's process group; SIGKILL it if it lingers."""
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def __enter__(self) -> LocalServer:
        self.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()


class LocalMlflowServer(LocalServer):
    """An `mlflow` subcommand; subclasses give its `arguments()` (without host and port)."""

    def arguments(self) -> list[str]:
        """The `mlflow` subcommand and options of this kind of server."""
        raise NotImplementedError

    def command(self) -> list[str]:
        """`python -m mlflow <arguments> --host 127.0.0.1 --port <port>`."""
        return [
            *(sys.executable, "-m", "mlflow", *self.arguments()),
            *("--host", "127.0.0.1", "--port", str(self.port)),
        ]


class TrimflowServer(LocalServer):
    """`trimflow serve <arguments> serve.port=<port>` in `workdir`, a project folder (its
    params.yaml, models/); `env` holds the token (`TRIMFLOW_SERVE_TOKEN` by default)."""

    def __init__(self, workdir: str | Path, arguments: list[str], env: dict[str, str]) -> None:
        super().__init__(workdir, env)
        self.arguments = arguments

    def command(self) -> list[str]:
        """`python -m trimflow.cli serve ...` on this server's port."""
        return [
            *(sys.executable, "-m", "trimflow.cli", "serve", *self.arguments),
            f"serve.port={self.port}",
        ]

    def get(self, path: str, token: str) -> tuple[int, str]:
        """(HTTP status, response text) of a GET with the bearer token, 4xx/5xx included."""
        request = urllib.request.Request(
            self.url + path, headers={"Authorization": f"Bearer {token}"}
        )
        try:
            with urllib.request.urlopen(request, timeout=REQUEST_TIMEOUT_S) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as error:
            return error.code, error.read().decode()

    def wait_until_ready(self, token: str) -> None:
        """Until /ready answers 200 (the port opens before the model is loaded and warm)."""
        deadline = time.monotonic() + self.start_timeout_s
        while self.get("/ready", token)[0] != 200:
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise ServerError(f"the service did not get ready:\n{self.stderr_tail()}")
            time.sleep(0.1)


class ScoringServer(LocalMlflowServer):
    """`mlflow models serve -m model_uri --env-manager local` against `tracking_uri`."""

    health_path = "/ping"

    def __init__(self, model_uri: str, tracking_uri: str, workdir: str | Path) -> None:
        super().__init__(workdir, {"MLFLOW_TRACKING_URI": tracking_uri})
        self.model_uri = model_uri

    def arguments(self) -> list[str]:
        """`mlflow models serve` of the model, in this environment."""
        return ["models", "serve", "-m", self.model_uri, "--env-manager", "local"]

    def post(self, body: bytes) -> tuple[int, str]:
        """(HTTP status, response text) of a JSON POST to /invocations, 4xx/5xx included."""
        request = urllib.request.Request(
            f"{self.url}/invocations", body, {"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(request, timeout=REQUEST_TIMEOUT_S) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as error:
            return error.code, error.read().decode()

    def predict(self, texts: list[str]) -> list[dict]:
        """The served predictions of `texts`; raises `ServerError` on any non-200 answer."""
        status, text = self.post(json.dumps({"inputs": texts}).encode())
        if status != 200:
            raise ServerError(f"POST /invocations answered {status}: {text[:2000]}")
        return json.loads(text)["predictions"]
