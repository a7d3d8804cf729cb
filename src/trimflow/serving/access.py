"""Access control of `trimflow serve`: bearer tokens, checked in constant time, rate-limited.

Tokens come from the environment or a file, never from the command line (where `ps` shows
them). Every route but the open ones (/health) needs one: 401 without a known token, 429 when
the token's bucket is empty.
"""

from __future__ import annotations

import hmac
import math
import os
import time
from collections.abc import Callable, Collection
from http import HTTPStatus
from pathlib import Path

from starlette.datastructures import Headers
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from trimflow.config.loading import ConfigError
from trimflow.config.schema import ServeConfig

MIN_TOKEN_CHARS = 16
NEW_TOKEN = "python -c 'import secrets; print(secrets.token_urlsafe(32))'"


def error_response(
    status: int, message: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    """An error as the scoring server words one: `{"error_code", "message"}`."""
    return JSONResponse(
        {"error_code": HTTPStatus(status).name, "message": message}, status, headers=headers
    )


def read_tokens(cfg: ServeConfig) -> list[str]:
    """The accepted tokens: the non-blank lines of `serve.token_file` if it is set, else
    `$<serve.token_env>`. Raises `ConfigError` when there is none or one is short."""
    if cfg.token_file is not None:
        path = Path(cfg.token_file)
        if not path.is_file():
            raise ConfigError(f"serve.token_file: {path} not found")
        source = f"serve.token_file ({path})"
        tokens = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    else:
        source = f"the environment variable {cfg.token_env} (named by serve.token_env)"
        tokens = [token] if (token := os.environ.get(cfg.token_env, "").strip()) else []
    if not tokens:
        raise ConfigError(
            f"trimflow serve needs an access token: {source} holds none (set it, or point "
            f"serve.token_file at a file of tokens; a new token: {NEW_TOKEN})"
        )
    if any(len(token) < MIN_TOKEN_CHARS for token in tokens):
        raise ConfigError(
            f"{source}: a token is shorter than {MIN_TOKEN_CHARS} characters (a new one: "
            f"{NEW_TOKEN})"
        )
    return tokens


class TokenBucket:
    """`rate` requests per second on average, in bursts of up to one second's worth."""

    def __init__(self, rate: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = rate
        self.capacity = max(rate, 1.0)
        self.level = self.capacity
        self.clock = clock
        self.updated = clock()

    def take(self) -> bool:
        """Spend one request's token if there is one."""
        now = self.clock()
        self.level = min(self.capacity, self.level + (now - self.updated) * self.rate)
        self.updated = now
        if self.level < 1:
            return False
        self.level -= 1
        return True

    def wait_s(self) -> int:
        """Whole seconds until the next token."""
        return math.ceil((1 - self.level) / self.rate)


class AccessControl:
    """ASGI middleware: a known bearer token on every path but `open_paths` (401), each token
    limited to `rate` requests per second (429; None: no limit)."""

    def __init__(
        self, app: ASGIApp, tokens: list[str], rate: float | None, open_paths: Collection[str]
    ) -> None:
        self.app = app
        self.tokens = [token.encode() for token in tokens]
        self.buckets = {token: TokenBucket(rate) for token in self.tokens} if rate else {}
        self.open_paths = open_paths

    def known_token(self, scope: Scope) -> bytes | None:
        """The request's bearer token if it is one of ours, compared in constant time."""
        scheme, _, presented = Headers(scope=scope).get("authorization", "").partition(" ")
        if scheme.lower() != "bearer":
            return None
        presented_bytes = presented.strip().encode()
        # Compare with every token, so that the time taken does not tell which one is near.
        matches = [token for token in self.tokens if hmac.compare_digest(presented_bytes, token)]
        return matches[0] if matches else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in self.open_paths:
            await self.app(scope, receive, send)
            return
        token = self.known_token(scope)
        bucket = self.buckets.get(token)
        if token is None:
            response = error_response(
                401,
                "a valid bearer token is required: Authorization: Bearer <token>",
                {"WWW-Authenticate": "Bearer"},
            )
        elif bucket is not None and not bucket.take():
            response = error_response(
                429,
                f"rate limit of {bucket.rate:g} requests per second exceeded",
                {"Retry-After": str(bucket.wait_s())},
            )
        else:
            await self.app(scope, receive, send)
            return
        await response(scope, receive, send)
