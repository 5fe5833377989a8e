"""One request's way through the engine: route, generate, retry on the original, record, shadow.

:func:`generate` is an async generator of :class:`Delta` pieces ending with one
:class:`Finished`. If the candidate fails (an error, or a failover cancels it) the request
goes on on the original: a streamed request continues from the text already sent (the
original reads the prompt plus the candidate's tokens so far), a non-streamed one starts
over. Either way the client gets a valid answer, and the log records the candidate's
failure and the original's retry as two request events.
"""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import torch

from .controller import Controller
from .engine import EngineBusy, FaultKind, GenerationRequest
from .openai import BadRequest, Params
from .routing import Arm
from .scoring import ShadowJob


def post(loop: asyncio.AbstractEventLoop, callback, *args) -> None:
    """Run ``callback(*args)`` on ``loop`` from the engine thread; a loop already closed (the
    server has shut down while the engine finished a step) has no one left to tell."""
    try:
        loop.call_soon_threadsafe(callback, *args)
    except RuntimeError:
        if not loop.is_closed():
            raise


@dataclass
class Delta:
    """New text for the client, and the arm that produced it."""

    text: str
    arm: Arm


@dataclass
class Finished:
    """How the request ended."""

    arm: Arm
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    retried: bool
    text: str


class TextAssembler:
    """Decodes a growing list of token ids into text deltas, holding back what could still change:
    an incomplete UTF-8 character, or the start of a stop string."""

    def __init__(self, tokenizer, stop: tuple[str, ...]):
        self.tokenizer, self.stop = tokenizer, stop
        self.ids: list[int] = []
        self.sent = 0
        self.hold = max((len(s) for s in stop), default=1) - 1
        self.stopped = False
        self.out = ""  # everything released so far

    def push(self, token: int, final: bool = False) -> str:
        """Add ``token``; returns the text now safe to send (all of it when ``final``)."""
        self.ids.append(token)
        return self._release(final)

    def _release(self, final: bool) -> str:
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        for stop in self.stop:
            at = text.find(stop)
            if at != -1:
                text, final, self.stopped = text[:at], True, True
        if not final:
            if text.endswith("\ufffd"):
                return ""
            text = text[:max(self.sent, len(text) - self.hold)]
        delta = text[self.sent:]
        self.sent = max(self.sent, len(text))
        self.out += delta
        return delta

    def flush(self) -> str:
        """Whatever was held back, at the end of the completion."""
        return self._release(True)


class _Attempt:
    """One arm's try at a request: the engine job and the queue its events arrive on."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.queue: asyncio.Queue = asyncio.Queue()
        self.aborted = asyncio.Event()
        self.job = None
        self.loop = loop
        self.started = time.monotonic()

    def sink(self, event) -> None:
        """Called by the engine thread with each event; hands it to the event loop, time-stamped."""
        post(self.loop, self._arrive, event)

    def _arrive(self, event) -> None:
        self.queue.put_nowait((self.loop.time(), event))

    def abort(self) -> None:
        """Called by the controller on a failover: stop now, the request moves to the original."""
        self.aborted.set()
        if self.job is not None:
            self.job.cancel()
        self.queue.put_nowait((self.loop.time(), ("cancelled",)))

    async def pause(self, seconds: float) -> None:
        """Sleep (the slow-candidate fault), waking early on an abort."""
        if seconds <= 0:
            return
        try:
            await asyncio.wait_for(self.aborted.wait(), seconds)
        except asyncio.TimeoutError:
            pass


def stop_ids(loaded) -> frozenset:
    """The end-of-sequence ids of a loaded model: its tokenizer's and its generation config's."""
    ids = set()
    eos = getattr(getattr(loaded.model, "generation_config", None), "eos_token_id", None)
    ids.update(eos if isinstance(eos, (list, tuple)) else [eos])
    ids.add(loaded.tokenizer.eos_token_id)
    return frozenset(i for i in ids if i is not None)


async def generate(controller: Controller, tokenizer, eos: dict, prompt: list[int], params: Params,
                   pin: Arm | None, first: Arm | None = None):
    """Serve one request; yields :class:`Delta` pieces and finally a :class:`Finished`.

    ``first`` is the arm already chosen by the caller (to put it in a response header);
    otherwise the request is routed here. BadRequest (status 503) when the queue is full.
    """
    loop = asyncio.get_running_loop()
    engine = controller.engine
    arm = first or controller.route(pin)
    retried, prefix = False, []
    text = TextAssembler(tokenizer, params.stop)
    while True:
        attempt = _Attempt(loop)
        shadow = arm is Arm.CANDIDATE and not retried and controller.sample_shadow()
        request = GenerationRequest(prompt + prefix, params.max_tokens - len(prefix), params.temperature,
                                    params.top_p, params.seed, eos[arm], keep_logprobs=shadow)
        start, started = loop.time(), round(time.time(), 4)
        try:
            attempt.job = engine.submit(arm, request, attempt.sink)
        except EngineBusy as exc:
            raise BadRequest(f"server busy: {exc}; retry later", status=503, code="server_busy") from None
        if arm is Arm.CANDIDATE:
            controller.inflight.add(attempt)
        tokens, ttft, finish, failure = [], None, None, None
        try:
            while finish is None and failure is None:
                arrived, event = await attempt.queue.get()
                fault = engine.fault
                if arm is Arm.CANDIDATE and fault is not None and fault.kind is FaultKind.SLOW:
                    # deliver each event ``factor`` times as late as it came: every latency scales
                    await attempt.pause(start + fault.factor * (arrived - start) - loop.time())
                    if attempt.aborted.is_set():
                        event = ("cancelled",)
                if event[0] == "token":
                    tokens.append(event[1])
                    ttft = loop.time() - start if ttft is None else ttft
                    piece = text.push(event[1])
                    if text.stopped:
                        attempt.job.cancel()
                        finish = "stop"
                    if piece and params.stream:
                        yield Delta(piece, arm)
                elif event[0] == "done":
                    finish = event[1]
                else:
                    failure = event
        finally:
            controller.inflight.discard(attempt)
            if finish is None and failure is None:  # the client went away
                attempt.job.cancel()
        if finish is not None:
            controller.record({"type": "request", "arm": arm.value, "started": started,
                               "latency": round(loop.time() - start, 5),
                               "ttft": round(ttft, 5), "tokens": len(tokens), "error": False, "aborted": False,
                               "retried": retried, "stream": params.stream, "pinned": pin is not None})
            if shadow:
                logprobs = torch.stack(attempt.job.logprobs[:len(tokens)])
                job = ShadowJob(prompt, tokens, logprobs,
                                lambda score: post(loop, controller.record_shadow, score))
                if not engine.submit_shadow(job):
                    controller.record({"type": "shadow_dropped"})
            tail = text.flush()
            if tail and params.stream:
                yield Delta(tail, arm)
            yield Finished(arm, finish, len(prompt), len(prefix) + len(tokens), retried, text.out)
            return
        error = failure[0] == "error"
        controller.record({"type": "request", "arm": arm.value, "started": started, "latency": None, "ttft": None,
                           "tokens": len(tokens),
                           "error": error, "aborted": not error, "retried": retried, "stream": params.stream,
                           "pinned": pin is not None, **({"message": failure[1]} if error else {})})
        if arm is Arm.ORIGINAL:
            raise RuntimeError(failure[1] if error else "the original model's request was cancelled")
        arm, retried = Arm.ORIGINAL, True
        if params.stream:  # the client has the candidate's text: the original goes on from it
            prefix = prefix + tokens
            if len(prefix) >= params.max_tokens:
                tail = text.flush()
                if tail:
                    yield Delta(tail, arm)
                yield Finished(arm, "length", len(prompt), len(prefix), retried, text.out)
                return
        else:
            text = TextAssembler(tokenizer, params.stop)
