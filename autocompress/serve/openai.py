"""The OpenAI wire format: request bodies checked into plain settings, answers and stream chunks built.

Only what the server honours is accepted: ``n``, ``best_of`` above 1, ``echo``, ``logprobs``
and ``suffix`` are refused with a 400 naming the field; fields that change nothing here
(``user``, penalties at 0, ``stream_options``, ...) are ignored as the OpenAI API ignores
unknown ones.
"""
from __future__ import annotations

import time
import uuid
from dataclasses import dataclass


class BadRequest(Exception):
    """A request the server refuses: HTTP ``status``, an OpenAI error ``code`` and the field at fault."""

    def __init__(self, message: str, param: str | None = None, status: int = 400, code: str | None = None):
        super().__init__(message)
        self.param, self.status, self.code = param, status, code


@dataclass(frozen=True)
class Params:
    """Generation settings of one request."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stream: bool = False


_UNSUPPORTED = {"echo": False, "logprobs": None, "suffix": None, "top_logprobs": None}


def _number(body: dict, name: str, default, low: float, high: float, integer: bool = False):
    value = body.get(name, default)
    if value is None:
        return default
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or not low <= value <= high:
        kind = "an integer" if integer else "a number"
        raise BadRequest(f"{name} must be {kind} from {low:g} to {high:g}, got {value!r}", name)
    return value


def parse_params(body: dict, max_tokens_limit: int) -> Params:
    """The generation settings of a completions or chat request body."""
    for name, allowed in _UNSUPPORTED.items():
        if body.get(name, allowed) not in (allowed, None, False):
            raise BadRequest(f"{name} is not supported by this server", name)
    for name in ("n", "best_of"):
        if body.get(name, 1) not in (1, None):
            raise BadRequest(f"{name} must be 1 (one completion per request)", name)
    limit_name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _number(body, limit_name, 16, 1, max_tokens_limit, integer=True)
    stop = body.get("stop")
    if stop is None:
        stop = ()
    elif isinstance(stop, str):
        stop = (stop,)
    elif isinstance(stop, list) and len(stop) <= 4 and all(isinstance(s, str) and s for s in stop):
        stop = tuple(stop)
    else:
        raise BadRequest("stop must be a non-empty string or a list of at most 4 of them", "stop")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise BadRequest(f"stream must be true or false, got {stream!r}", "stream")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise BadRequest(f"seed must be an integer, got {seed!r}", "seed")
    return Params(max_tokens=max_tokens, temperature=float(_number(body, "temperature", 1.0, 0, 2)),
                  top_p=float(_number(body, "top_p", 1.0, 0, 1)), seed=seed, stop=stop, stream=stream)


def parse_prompt(body: dict) -> str:
    """The prompt of a completions body (a string, or a list holding one string)."""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise BadRequest("prompt must be a string (or a list of one string)", "prompt")
    return prompt


def parse_messages(body: dict) -> list[dict]:
    """The messages of a chat body: a non-empty list of ``{"role", "content"}`` with string content
    (a list of text parts is joined)."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("messages must be a non-empty list", "messages")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ("system", "user", "assistant", "developer"):
            raise BadRequest(f"messages[{i}] needs a role of system, user, assistant or developer", f"messages[{i}]")
        content = message.get("content")
        if isinstance(content, list):
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise BadRequest(f"messages[{i}].content: only text parts are supported", f"messages[{i}].content")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise BadRequest(f"messages[{i}].content must be a string", f"messages[{i}].content")
        role = "system" if message["role"] == "developer" else message["role"]
        out.append({"role": role, "content": content})
    return out


def error_body(message: str, param: str | None = None, code: str | None = None,
               kind: str = "invalid_request_error") -> dict:
    """An OpenAI error object."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def new_id(prefix: str) -> str:
    """A fresh response id."""
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    """The usage object."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_body(rid: str, model: str, text: str, finish: str, use: dict, arm: str, retried: bool) -> dict:
    """A ``text_completion`` answer; ``arm`` names the model that served it."""
    return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "text": text, "finish_reason": finish, "logprobs": None}],
            "usage": use, "arm": arm, "retried": retried}


def completion_chunk(rid: str, model: str, text: str, finish: str | None, arm: str) -> dict:
    """One streamed piece of a completion."""
    return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "text": text, "finish_reason": finish, "logprobs": None}], "arm": arm}


def chat_body(rid: str, model: str, text: str, finish: str, use: dict, arm: str, retried: bool) -> dict:
    """A ``chat.completion`` answer; ``arm`` names the model that served it."""
    return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish,
                         "logprobs": None}],
            "usage": use, "arm": arm, "retried": retried}


def chat_chunk(rid: str, model: str, delta: dict, finish: str | None, arm: str) -> dict:
    """One streamed piece of a chat completion (``delta`` holds ``role`` and/or ``content``)."""
    return {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}], "arm": arm}
