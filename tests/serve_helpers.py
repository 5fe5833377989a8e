"""Helpers for the serve tests: two tiny models, a server on an ephemeral loopback port, a load
generator with a bounded number of requests, and an SSE reader."""
from __future__ import annotations

import copy
import json
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import httpx
import pytest
import torch

from autocompress.models import LoadedModel
from autocompress.serve.server import ServeConfig, Server

CHAT_TEMPLATE = ("{% for m in messages %}<{{ m.role }}>{{ m.content }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<assistant>{% endif %}")
PROMPTS = ["The module", "Return the value of", "A list of", "Open the file and", "This function"]


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """One torch thread while a module's servers run: the engine shares this process with the
    event loop and eight client threads, and on two busy cores a second OpenMP thread only
    spins against them (the failover tests ran 30x slower with two)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_pair(tokenizer, noise: float = 1e-3):
    """(original, candidate): a tiny Llama and a copy with slightly perturbed weights, as LoadedModels."""
    from tiny import tiny_model

    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.chat_template = CHAT_TEMPLATE
    original = tiny_model("llama")
    with torch.no_grad():
        # random weights give near-uniform next-token distributions whose top-1 flips under any
        # perturbation; a sharper head makes agreement a property of the models, not of noise
        original.lm_head.weight.mul_(30)
    candidate = copy.deepcopy(original)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in candidate.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * noise)
    return (LoadedModel(original, tokenizer, "tiny-original", "directory"),
            LoadedModel(candidate, tokenizer, "tiny-candidate", "directory"))


def start_server(pair, out, policy, **settings) -> Server:
    """A started server (loopback, free port) for ``pair`` with ``policy``; the caller stops it."""
    config = ServeConfig("tiny-original", "tiny-candidate", str(out), **settings)
    server = Server(config, pair[0], pair[1], policy, bucket_s=1.0)
    server.start()
    return server


def read_sse(text: str) -> list:
    """The ``data:`` payloads of an SSE body: dicts, and the string "[DONE]"."""
    out = []
    for block in text.split("\n\n"):
        if block.startswith("data: "):
            payload = block[len("data: "):]
            out.append(payload if payload == "[DONE]" else json.loads(payload))
    return out


def valid_answer(response: httpx.Response, stream: bool) -> bool:
    """Whether ``response`` is a complete, error-free OpenAI answer."""
    if response.status_code != 200:
        return False
    if not stream:
        body = response.json()
        return isinstance(body["choices"][0]["text"], str) and body["choices"][0]["finish_reason"] in ("stop", "length")
    events = read_sse(response.text)
    return (bool(events) and events[-1] == "[DONE]" and not any("error" in e for e in events[:-1])
            and events[-2]["choices"][0]["finish_reason"] in ("stop", "length"))


@dataclass
class Load:
    """Results of :func:`run_load`."""

    answers: list = field(default_factory=list)  # (status, valid, arm header)
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def failed(self) -> int:
        """Requests that did not get a valid answer."""
        return sum(not valid for _, valid, _ in self.answers)


def run_load(url: str, requests: int, workers: int = 8, max_tokens: int = 3, on_done=None) -> Load:
    """``requests`` completions from ``workers`` concurrent clients (every other one streamed);
    ``on_done(count)`` is called after each answer."""
    load = Load()
    counter = iter(range(requests))

    def worker():
        with httpx.Client(base_url=url, timeout=60) as client:
            while True:
                with load.lock:
                    i = next(counter, None)
                if i is None:
                    return
                stream = i % 2 == 1
                response = client.post("/v1/completions", json={
                    "prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": max_tokens, "temperature": 0,
                    "stream": stream})
                with load.lock:
                    load.answers.append((response.status_code, valid_answer(response, stream),
                                         response.headers.get("x-autocompress-arm")))
                    done = len(load.answers)
                if on_done is not None:
                    on_done(done)

    with ThreadPoolExecutor(workers) as pool:
        for future in [pool.submit(worker) for _ in range(workers)]:
            future.result()
    return load
