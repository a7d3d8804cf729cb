"""A local team tracking stack: PostgreSQL, an S3 server and `mlflow server` with basic auth.

`trimflow team up` starts the three on 127.0.0.1 (state, logs and PIDs under `.team/`) and
writes the client settings to `.team/client.env`; `trimflow team down` stops them by PID. The
same start functions serve the tests' fixtures, so what is tested is what users run.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

log = logging.getLogger(__name__)
# Fake credentials of the local S3 server (moto accepts any); the MLflow server holds them,
# clients never do.
S3_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
}
STATE_FILE = "team.json"


class StackError(RuntimeError):
    """A part of the stack is missing or did not start; the message names it."""


CLIENT_FILE = "client.env"


def free_port() -> int:
    """A TCP port free on 127.0.0.1 at the time of asking."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_for_http(url: str, process: subprocess.Popen, what: str, seconds: float = 120) -> None:
    """Poll `url` until it answers (any HTTP status), failing if `process` exits first."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except urllib.error.HTTPError:
            return
        except OSError:
            if process.poll() is not None:
                raise StackError(f"{what} exited with {process.returncode}") from None
            if time.monotonic() > deadline:
                raise StackError(f"{what} did not answer on {url}") from None
            time.sleep(0.3)


def postgres_bin() -> Path | None:
    """The directory of PostgreSQL's server programs (initdb, postgres), if installed."""
    found = shutil.which("initdb")
    if found:
        return Path(found).resolve().parent
    candidates = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    return candidates[-1].parent if candidates else None


def start_postgres(root: Path, port: int, **popen) -> subprocess.Popen:
    """A PostgreSQL cluster in `root/data` (created if new) on 127.0.0.1:`port`, trust auth.

    As root it runs as the `postgres` user (PostgreSQL refuses root), so `root` must be a
    folder that user can enter.
    """
    import psycopg2

    bindir = postgres_bin()
    if bindir is None:
        raise StackError("PostgreSQL is not installed (Debian: apt-get install postgresql)")
    as_user = {"user": "postgres", "group": "postgres"} if os.geteuid() == 0 else {}
    if as_user:
        shutil.chown(root, "postgres", "postgres")
    data = root / "data"
    if not data.exists():
        subprocess.run(
            [bindir / "initdb", "-D", data, "--auth=trust", "-U", "postgres", "-E", "UTF8"],
            check=True,
            capture_output=True,
            **as_user,
        )
    server = subprocess.Popen(
        [bindir / "postgres", "-D", data, "-h", "127.0.0.1", "-p", str(port), "-k", root],
        **as_user,
        **popen,
    )
    deadline = time.monotonic() + 60
    while True:
        try:
            psycopg2.connect(host="127.0.0.1", port=port, user="postgres").close()
            return server
        except psycopg2.OperationalError:
            if server.poll() is not None or time.monotonic() > deadline:
                raise StackError(f"PostgreSQL did not start in {data}") from None
            time.sleep(0.3)


def create_database(port: int, name: str) -> str:
    """Create database `name` (if missing) on the local server; returns its SQLAlchemy URI."""
    import psycopg2

    connection = psycopg2.connect(host="127.0.0.1", port=port, user="postgres")
    connection.autocommit = True
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
        if cursor.fetchone() is None:
            cursor.execute(f'CREATE DATABASE "{name}"')
    connection.close()
    return f"postgresql+psycopg2://postgres@127.0.0.1:{port}/{name}"


def start_s3(port: int, **popen) -> subprocess.Popen:
    """moto's S3-compatible server on 127.0.0.1:`port`."""
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], **popen
    )
    wait_for_http(f"http://127.0.0.1:{port}/moto-api/", server, "S3 server")
    return server


def s3_client(endpoint: str):
    """A boto3 S3 client of the local server."""
    import boto3

    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=S3_CREDENTIALS["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=S3_CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
        region_name=S3_CREDENTIALS["AWS_DEFAULT_REGION"],
    )


def start_mlflow(
    root: Path,
    store: str,
    artifacts: str,
    s3_endpoint: str,
    port: int,
    admin: tuple[str, str],
    **popen,
) -> subprocess.Popen:
    """`mlflow server` on 127.0.0.1:`port`: runs in `store`, artifacts proxied to `artifacts`
    (an s3:// URI on `s3_endpoint`), behind the basic-auth app with `admin` as its admin."""
    (root / "auth.ini").write_text(
        "[mlflow]\n"
        "default_permission = READ\n"
        f"database_uri = sqlite:///{root / 'auth.db'}\n"
        f"admin_username = {admin[0]}\n"
        f"admin_password = {admin[1]}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
    )
    env = {
        **os.environ,
        **S3_CREDENTIALS,
        "MLFLOW_AUTH_CONFIG_PATH": str(root / "auth.ini"),
        "MLFLOW_S3_ENDPOINT_URL": s3_endpoint,
        "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(16),
    }
    command = [Path(sys.executable).parent / "mlflow", "server", "--backend-store-uri", store]
    command += ["--artifacts-destination", artifacts, "--app-name", "basic-auth"]
    command += ["--host", "127.0.0.1", "--port", str(port)]
    server = subprocess.Popen(command, cwd=root, env=env, **popen)
    wait_for_http(f"http://127.0.0.1:{port}/health", server, "mlflow server", seconds=180)
    return server


def stop(pid: int, sig: int = signal.SIGTERM, seconds: float = 30, group: bool = False) -> None:
    """Signal `pid` (its whole process group with `group`) and wait until it is gone."""
    try:
        (os.killpg if group else os.kill)(pid, sig)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if _ended(pid):
            return
        time.sleep(0.2)
    os.kill(pid, signal.SIGKILL)


def _ended(pid: int) -> bool:
    """Whether `pid` has exited. A child of this process is reaped here: until then it is a
    zombie, which still takes signals."""
    try:
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return True
    except ChildProcessError:  # not a child of this process
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def up(folder: Path, mlflow_port: int = 5000) -> dict:
    """Start the stack with its state in `folder`; returns the state written to team.json."""
    folder.mkdir(parents=True, exist_ok=True)
    if (folder / STATE_FILE).exists():
        raise StackError(f"{folder / STATE_FILE} exists: `trimflow team down` first")
    pg_root = Path(tempfile.mkdtemp(prefix="trimflow-team-pg-"))
    pg_port, s3_port = free_port(), free_port()
    endpoint = f"http://127.0.0.1:{s3_port}"
    admin = ("admin", secrets.token_urlsafe(12))
    started: list[subprocess.Popen] = []
    with contextlib.ExitStack() as files:  # the servers keep their own copies of the logs

        def detached(name: str) -> dict:
            log_file = files.enter_context(open(folder / f"{name}.log", "ab"))
            return {"start_new_session": True, "stdout": log_file, "stderr": subprocess.STDOUT}

        try:
            started.append(start_postgres(pg_root, pg_port, **detached("postgres")))
            started.append(start_s3(s3_port, **detached("s3")))
            s3_client(endpoint).create_bucket(Bucket="mlflow")
            started.append(
                start_mlflow(
                    folder.resolve(),
                    create_database(pg_port, "mlflow"),
                    "s3://mlflow/artifacts",
                    endpoint,
                    mlflow_port,
                    admin,
                    **detached("mlflow"),
                )
            )
        except BaseException:  # leave nothing running half-started
            for process in reversed(started):
                stop(process.pid, group=True)
            shutil.rmtree(pg_root, ignore_errors=True)
            raise
    postgres, s3, mlflow = started
    uri = f"http://127.0.0.1:{mlflow_port}"
    state = {
        "uri": uri,
        "postgres": {"pid": postgres.pid, "port": pg_port, "dir": str(pg_root)},
        "s3": {"pid": s3.pid, "endpoint": endpoint},
        "mlflow": {"pid": mlflow.pid},
    }
    (folder / STATE_FILE).write_text(json.dumps(state, indent=2))
    client = folder / CLIENT_FILE
    client.write_text(
        f"export MLFLOW_TRACKING_URI={uri}\n"
        f"export MLFLOW_TRACKING_USERNAME={admin[0]}\n"
        f"export MLFLOW_TRACKING_PASSWORD={admin[1]}\n"
    )
    client.chmod(0o600)
    return state


def down(folder: Path) -> None:
    """Stop the stack recorded in `folder/team.json` (mlflow, then S3, then PostgreSQL)."""
    state_file = folder / STATE_FILE
    if not state_file.exists():
        raise StackError(f"no {state_file}: nothing started with `trimflow team up`")
    state = json.loads(state_file.read_text())
    stop(state["mlflow"]["pid"], group=True)  # the server and its uvicorn workers
    stop(state["s3"]["pid"])
    stop(state["postgres"]["pid"], signal.SIGINT, seconds=60)  # PostgreSQL's fast shutdown
    shutil.rmtree(state["postgres"]["dir"], ignore_errors=True)
    state_file.unlink()
    (folder / CLIENT_FILE).unlink(missing_ok=True)
