"""One compute thread for both models and the shadow scorer: batched decoding, taken in turns.

Each arm keeps a queue of waiting requests and up to ``max_active`` running batches; a
batch does one forward pass per step (the prefill first, then one token for every live
row). Three lanes share the thread: original, candidate and shadow scoring. Each step goes
to the busy lane that has used the least compute time so far (fair queuing by time, as
an OS scheduler shares a CPU; a lane that was idle starts level with the busy ones, so it
cannot bank credit). On a small CPU no lane can starve another, and each lane gets an
equal share of the CPU however slow its steps are: a candidate ten times slower than the
original does not slow the original down, and the latencies the policy compares are each
model's own. Waiting requests join a new batch as soon as an arm has room (up to
``max_batch`` rows); finished and cancelled rows leave their batch at once, their
key/value cache rows dropped.

Results go to each request's ``sink``, a callable the thread calls with events:
``("token", id)``, ``("done", finish_reason, logprobs or None)``, ``("error", message)``,
``("cancelled",)``. The server turns them into asyncio queue items.

A :class:`Fault` (tests and benchmarks only) makes the candidate fail, or replaces its
next-token distribution with noise, from the moment it is set.
"""
from __future__ import annotations

import enum
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import torch
from torch import nn

from .routing import Arm
from .scoring import ShadowJob, forward_kwargs, score_batch


class FaultKind(str, enum.Enum):
    """How an injected fault breaks the candidate."""

    ERRORS = "errors"    # every forward pass raises
    SLOW = "slow"        # answers take ``factor`` times as long (applied by the server)
    GARBAGE = "garbage"  # next-token logits replaced by noise: random tokens


@dataclass(frozen=True)
class Fault:
    """A fault injected into the candidate, for tests and benchmarks only."""

    kind: FaultKind
    factor: float = 5.0


class InjectedFault(RuntimeError):
    """Raised inside the candidate's forward pass by a :attr:`FaultKind.ERRORS` fault."""


class EngineBusy(RuntimeError):
    """The arm's queue is full."""


@dataclass
class GenerationRequest:
    """What to generate: prompt ids, a token limit and sampling settings.

    ``temperature`` 0 is greedy; ``seed`` makes sampling reproducible; ``stop_ids`` end the
    completion (the end-of-sequence tokens); ``keep_logprobs`` keeps the per-step
    distribution for shadow scoring.
    """

    prompt: list[int]
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop_ids: frozenset = frozenset()
    keep_logprobs: bool = False


@dataclass(eq=False)
class Job:
    """One request inside the engine."""

    request: GenerationRequest
    sink: object
    cancelled: bool = False
    tokens: list = field(default_factory=list)
    logprobs: list = field(default_factory=list)

    def cancel(self) -> None:
        """Stop generating for this job; it leaves its batch at the next step."""
        self.cancelled = True


def _pick(logits: torch.Tensor, request: GenerationRequest, generator: torch.Generator | None) -> int:
    """The next token from one row of logits under the request's sampling settings."""
    if request.temperature <= 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / request.temperature, dim=-1)
    if request.top_p < 1:
        ordered, order = probs.sort(descending=True)
        # keep the smallest prefix whose mass reaches top_p (the first token always stays)
        drop = ordered.cumsum(-1) - ordered > request.top_p
        ordered[drop] = 0
        probs = torch.zeros_like(probs).scatter(-1, order, ordered)
    return int(torch.multinomial(probs, 1, generator=generator))


class Engine:
    """The compute thread. ``models`` maps each arm to its module; ``scorer`` scores shadows."""

    def __init__(self, models: dict[Arm, nn.Module], scorer: nn.Module, *, max_batch: int = 8,
                 max_active: int = 2, max_queue: int = 256, max_shadow_queue: int = 16):
        self.models = models
        self.scorer = scorer
        self.max_batch, self.max_active, self.max_queue = max_batch, max_active, max_queue
        self.max_shadow_queue = max_shadow_queue
        self.fault: Fault | None = None
        self._accepts = {arm: forward_kwargs(model) for arm, model in models.items()}
        self._pending = {arm: deque() for arm in models}
        self._active = {arm: deque() for arm in models}
        self._shadow: deque[ShadowJob] = deque()
        self._scoring = False
        self._lock = threading.Lock()
        self._work = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self.steps = {arm: 0 for arm in models} | {"shadow": 0}
        self.largest_batch = {arm: 0 for arm in models}  # evidence of batching, for tests and the bench

    # -- called from other threads -------------------------------------------------------
    def start(self) -> None:
        """Start the compute thread."""
        self._thread = threading.Thread(target=self._run, name="autocompress-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Ask the thread to finish its current step and end; wait at most ``timeout`` seconds."""
        self._stopping.set()
        self._work.set()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        """Whether the compute thread runs."""
        return self._thread is not None and self._thread.is_alive()

    def submit(self, arm: Arm, request: GenerationRequest, sink) -> Job:
        """Queue ``request`` on ``arm``; its events go to ``sink``. EngineBusy when the queue is full."""
        job = Job(request, sink)
        with self._lock:
            if len(self._pending[arm]) >= self.max_queue:
                raise EngineBusy(f"{arm.value} queue is full ({self.max_queue} requests waiting)")
            self._pending[arm].append(job)
        self._work.set()
        return job

    def submit_shadow(self, job: ShadowJob) -> bool:
        """Queue a shadow score; False (and nothing queued) when the scoring queue is full."""
        with self._lock:
            if len(self._shadow) >= self.max_shadow_queue:
                return False
            self._shadow.append(job)
        self._work.set()
        return True

    def shadow_idle(self) -> bool:
        """Whether no shadow score is queued or being computed."""
        with self._lock:
            return not self._shadow and not self._scoring

    def cancel(self, arm: Arm) -> int:
        """Cancel every waiting and running request of ``arm``; returns how many were cancelled."""
        with self._lock:
            jobs = list(self._pending[arm])
            self._pending[arm].clear()
            running = [job for batch in self._active[arm] for job in getattr(batch, "jobs", [])]
        for job in jobs:
            job.cancel()
            job.sink(("cancelled",))
        for job in running:
            job.cancel()
        return len(jobs) + len(running)

    # -- the compute thread ----------------------------------------------------------------
    def _busy(self, lane) -> bool:
        if lane == "shadow":
            return bool(self._shadow)
        return bool(self._pending[lane] or self._active[lane])

    def _run(self) -> None:
        lanes = [*self.models, "shadow"]
        used = {lane: 0.0 for lane in lanes}  # compute seconds per lane, levelled on wake-up
        was_busy: set = set()
        with torch.inference_mode():
            while not self._stopping.is_set():
                busy = [lane for lane in lanes if self._busy(lane)]
                if not busy:
                    was_busy.clear()
                    self._work.wait(0.05)
                    self._work.clear()
                    continue
                level = min((used[lane] for lane in busy if lane in was_busy), default=None)
                for lane in busy:
                    if lane not in was_busy and level is not None:
                        used[lane] = max(used[lane], level)
                was_busy = set(busy)
                lane = min(busy, key=used.__getitem__)
                start = time.perf_counter()
                if lane == "shadow":
                    self._score_turn()
                else:
                    self._turn(lane)
                used[lane] += time.perf_counter() - start
            self._abandon()

    def _abandon(self) -> None:
        """On stop: every request still waiting or running ends with an error event."""
        with self._lock:
            jobs = [job for arm in self.models for job in self._pending[arm]]
            jobs += [job for arm in self.models for batch in self._active[arm] for job in batch.jobs]
        for job in jobs:
            if not job.cancelled:
                job.sink(("error", "the server is shutting down"))

    def _turn(self, arm: Arm) -> bool:
        with self._lock:
            pending, active = self._pending[arm], self._active[arm]
            if pending and len(active) < self.max_active:
                jobs = []
                while pending and len(jobs) < self.max_batch:
                    job = pending.popleft()
                    if not job.cancelled:
                        jobs.append(job)
                if jobs:
                    try:
                        active.append(_Batch(self, arm, jobs))
                    except Exception as exc:  # noqa: BLE001 (the rows fail; the thread must live on)
                        for job in jobs:
                            job.sink(("error", f"{type(exc).__name__}: {exc}"))
                    self.largest_batch[arm] = max(self.largest_batch[arm], len(jobs))
            if not active:
                return False
            batch = active[0]
            active.rotate(-1)
        if not batch.step():
            with self._lock:
                active.remove(batch)
        self.steps[arm] += 1
        return True

    def _score_turn(self) -> bool:
        with self._lock:
            jobs = [self._shadow.popleft() for _ in range(min(self.max_batch, len(self._shadow)))]
            self._scoring = bool(jobs)
        if not jobs:
            return False
        try:
            scores = score_batch(self.scorer, jobs)
        except Exception as exc:  # noqa: BLE001 (a scoring failure must not stop serving)
            scores = [{"error": f"{type(exc).__name__}: {exc}"}] * len(jobs)
        for job, score in zip(jobs, scores):
            job.sink(score)
        with self._lock:
            self._scoring = False
        self.steps["shadow"] += 1
        return True

    def forward(self, arm: Arm, ids, mask, positions, cache) -> torch.Tensor:
        """One forward pass of ``arm``'s model; the last position's logits ``[rows, vocab]``."""
        if arm is Arm.CANDIDATE and self.fault is not None and self.fault.kind is FaultKind.ERRORS:
            raise InjectedFault("injected fault: the candidate failed")
        accepts = self._accepts[arm]
        kwargs = {"input_ids": ids, "attention_mask": mask, "use_cache": True}
        kwargs["cache" if "cache" in accepts else "past_key_values"] = cache
        if "position_ids" in accepts:
            kwargs["position_ids"] = positions
        if "logits_to_keep" in accepts:
            kwargs["logits_to_keep"] = 1
        logits = self.models[arm](**kwargs).logits[:, -1].float()
        if arm is Arm.CANDIDATE and self.fault is not None and self.fault.kind is FaultKind.GARBAGE:
            logits = torch.randn_like(logits) * 10
        return logits


class _Batch:
    """Rows decoding together on one arm; :meth:`step` does one forward pass."""

    def __init__(self, engine: Engine, arm: Arm, jobs: list[Job]):
        from transformers import DynamicCache  # noqa: PLC0415

        self.engine, self.arm, self.jobs = engine, arm, jobs
        self.generators = [torch.Generator().manual_seed(job.request.seed) if job.request.seed is not None else None
                           for job in jobs]
        width = max(len(job.request.prompt) for job in jobs)
        self.ids = torch.zeros(len(jobs), width, dtype=torch.long)
        self.mask = torch.zeros(len(jobs), width, dtype=torch.long)
        for i, job in enumerate(jobs):
            self.ids[i, width - len(job.request.prompt):] = torch.tensor(job.request.prompt)
            self.mask[i, width - len(job.request.prompt):] = 1
        self.positions = (self.mask.cumsum(-1) - 1).clamp(min=0)
        self.cache = DynamicCache(config=engine.models[arm].config)
        self.logits: torch.Tensor | None = None

    def step(self) -> bool:
        """Advance one forward pass; False once every row is finished (or the batch failed)."""
        try:
            return self._step()
        except Exception as exc:  # noqa: BLE001 (the rows get the error; the server retries them)
            message = f"{type(exc).__name__}: {exc}"
            for job in self.jobs:
                if not job.cancelled:
                    job.sink(("error", message))
            self.jobs = []
            return False

    def _step(self) -> bool:
        logits = self.engine.forward(self.arm, self.ids, self.mask, self.positions, self.cache)
        keep, tokens = [], []
        for row, job in enumerate(self.jobs):
            if job.cancelled:
                job.sink(("cancelled",))
                continue
            request = job.request
            if request.keep_logprobs:
                job.logprobs.append(torch.log_softmax(logits[row], dim=-1))
            token = _pick(logits[row], request, self.generators[row])
            job.tokens.append(token)
            job.sink(("token", token))
            if token in request.stop_ids or len(job.tokens) >= request.max_tokens:
                reason = "stop" if token in request.stop_ids else "length"
                job.sink(("done", reason, torch.stack(job.logprobs) if request.keep_logprobs else None))
                continue
            keep.append(row)
            tokens.append(token)
        if not keep:
            self.jobs = []
            return False
        if len(keep) < len(self.jobs):
            index = torch.tensor(keep)
            self.cache.batch_select_indices(index)
            self.jobs = [self.jobs[i] for i in keep]
            self.generators = [self.generators[i] for i in keep]
            self.mask, self.positions = self.mask[index], self.positions[index]
        self.ids = torch.tensor(tokens).view(-1, 1)
        self.mask = torch.cat([self.mask, torch.ones(len(keep), 1, dtype=torch.long)], dim=1)
        self.positions = self.positions[:, -1:] + 1
        return True
