"""Put the pieces together: load both models, open the event log, start the engine, serve with uvicorn.

:func:`serve` is the ``autocompress serve`` verb (blocks until Ctrl-C). :func:`build_server`
gives the same server as an object that tests and benchmarks run in a background thread on
an ephemeral loopback port (:meth:`Server.start`, :meth:`Server.stop`).
"""
from __future__ import annotations

import asyncio
import socket
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError
from .app import ServeState, build_app
from .controller import Controller
from .engine import Engine
from .events import FILENAME, EventLog, read_events
from .generation import stop_ids
from .policy import Policy, load_policy, policy_from_dict
from .routing import Arm


@dataclass(frozen=True)
class ServeConfig:
    """Settings of ``autocompress serve``; shares are percentages."""

    original: str
    candidate: str
    out: str
    canary: float | None = None
    shadow: float = 20.0
    policy: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    resume: bool = False
    admin_token_file: str | None = None
    seed: int = 0
    max_batch: int = 8
    max_tokens: int = 256
    model_name: str | None = None
    trust_remote_code: bool = False


def read_token(path: str | None) -> str | None:
    """The admin bearer token in ``path`` (surrounding whitespace dropped); None without a path."""
    if path is None:
        return None
    try:
        token = Path(path).read_text().strip()
    except OSError as exc:
        raise UserError(f"--admin-token-file {path}: cannot read it ({exc.strerror or exc})") from None
    if len(token) < 8 or any(c.isspace() for c in token):
        raise UserError(f"--admin-token-file {path}: the token must be at least 8 characters without spaces")
    return token


def choose_policy(config: ServeConfig) -> Policy:
    """The policy of a new rollout, or of the resumed one (its logged policy unless --policy is given)."""
    log = Path(config.out) / FILENAME
    if log.exists() and not config.resume:
        raise UserError(f"{config.out} already holds a rollout's event log; pass --resume to continue it, "
                        f"or choose another --out")
    if not config.resume:
        return load_policy(config.policy).with_start(config.canary)
    if not log.exists():
        raise UserError(f"--resume: {log} does not exist; start a new rollout without --resume")
    if config.canary is not None:
        raise UserError("--canary sets the first stage of a new rollout; a resumed rollout keeps its stage")
    starts = [e for e in read_events(log) if e["type"] == "start"]
    if not starts:
        raise UserError(f"--resume: {log} holds no start event; it is not a rollout's log")
    for key, value in (("original", config.original), ("candidate", config.candidate)):
        if starts[-1][key] != value:
            raise UserError(f"--resume: the log in {config.out} is a rollout of {key} {starts[-1][key]!r}, "
                            f"not {value!r}; give the same models, or another --out")
    if config.policy is not None:
        return load_policy(config.policy)
    return policy_from_dict(starts[-1]["policy"], f"the policy recorded in {log}")


def _served_name(config: ServeConfig) -> str:
    return config.model_name or Path(config.original.rstrip("/")).name or config.original


class Server:
    """A ready server: engine, controller, Starlette app; optionally running in a thread."""

    def __init__(self, config: ServeConfig, original, candidate, policy: Policy, *, bucket_s: float = 5.0):
        from ..models import check_vocabulary  # noqa: PLC0415

        check_vocabulary(candidate.model, original.tokenizer, config.candidate)
        rows = {arm: m.model.get_input_embeddings().num_embeddings for arm, m in
                ((Arm.ORIGINAL, original), (Arm.CANDIDATE, candidate))}
        if rows[Arm.ORIGINAL] != rows[Arm.CANDIDATE]:
            raise UserError(f"{config.candidate} has a vocabulary of {rows[Arm.CANDIDATE]} tokens, {config.original} "
                            f"one of {rows[Arm.ORIGINAL]}; shadow scoring needs the same tokenizer")
        self.config = config
        token = read_token(config.admin_token_file)
        self.engine = Engine({Arm.ORIGINAL: original.model, Arm.CANDIDATE: candidate.model}, original.model,
                             max_batch=config.max_batch)
        self.log = EventLog(config.out)
        start = {"original": config.original, "candidate": config.candidate, "shadow": config.shadow,
                 "seed": config.seed}
        self.controller = Controller(policy, self.log, self.engine, seed=config.seed, shadow=config.shadow,
                                     start=start, bucket_s=bucket_s)
        context = min(getattr(m.model.config, "max_position_embeddings", None) or 2048 for m in (original, candidate))
        self.state = ServeState(self.controller, original.tokenizer,
                                {Arm.ORIGINAL: stop_ids(original), Arm.CANDIDATE: stop_ids(candidate)},
                                _served_name(config), config.max_tokens, context, token)
        self.app = build_app(self.state)
        self.engine.start()
        self._uvicorn = None
        self._thread: threading.Thread | None = None
        self.url: str | None = None

    def _uvicorn_server(self):
        import uvicorn  # noqa: PLC0415

        return uvicorn.Server(uvicorn.Config(self.app, log_level="warning", access_log=False, lifespan="off",
                                             timeout_graceful_shutdown=5))

    def start(self, host: str = "127.0.0.1", port: int = 0, timeout: float = 30.0) -> str:
        """Serve in a background thread on ``host:port`` (0: a free port); returns the base URL."""
        sock = bind(host, port)
        self._uvicorn = self._uvicorn_server()
        self._thread = threading.Thread(target=self._uvicorn.run, kwargs={"sockets": [sock]}, daemon=True,
                                        name="autocompress-uvicorn")
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._uvicorn.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        self.url = f"http://{host}:{sock.getsockname()[1]}"
        return self.url

    def stop(self, timeout: float = 10.0) -> None:
        """Stop uvicorn (if started here), the engine and the log."""
        if self._uvicorn is not None:
            self._uvicorn.should_exit = True
            self._thread.join(timeout)
        self.engine.stop(timeout)
        self.log.close()

    def run_forever(self, host: str, port: int) -> None:
        """Serve in this thread until interrupted (the CLI)."""
        sock = bind(host, port)
        print(f"serving {self.state.model_name!r} on http://{host}:{sock.getsockname()[1]} "
              f"(dashboard at /, metrics at /metrics); event log {self.log.path}", flush=True)
        try:
            asyncio.run(self._uvicorn_server().serve(sockets=[sock]))
        finally:
            self.stop()


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port``; a UserError when the address is taken or invalid."""
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(128)
    except OSError as exc:
        raise UserError(f"cannot listen on {host}:{port}: {exc.strerror or exc}; choose another --host/--port") \
            from None
    sock.setblocking(False)
    return sock


def load_pair(config: ServeConfig):
    """Load the original and the candidate (any model spec ``eval`` accepts)."""
    from ..models import load_model  # noqa: PLC0415

    original = load_model(config.original, trust_remote_code=config.trust_remote_code)
    candidate = load_model(config.candidate, trust_remote_code=config.trust_remote_code)
    return original, candidate


def build_server(config: ServeConfig, pair=None, *, bucket_s: float = 5.0) -> Server:
    """A :class:`Server` for ``config``; ``pair`` (original, candidate) skips loading."""
    policy = choose_policy(config)
    read_token(config.admin_token_file)
    original, candidate = pair if pair is not None else load_pair(config)
    return Server(config, original, candidate, policy, bucket_s=bucket_s)


def serve(config: ServeConfig) -> None:
    """Run ``autocompress serve`` until interrupted."""
    if config.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: listening on {config.host}, not only on this machine", file=sys.stderr)
    server = build_server(config)
    server.run_forever(config.host, config.port)
