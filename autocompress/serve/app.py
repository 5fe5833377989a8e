"""The HTTP surface (Starlette): OpenAI endpoints, health, metrics, admin and the dashboard.

Routes::

    POST /v1/completions, /v1/chat/completions   OpenAI-compatible; "stream": true sends SSE
    GET  /v1/models                              the one served model name
    GET  /health                                 200 while the process runs
    GET  /ready                                  200 once the models are loaded and the engine runs
    GET  /metrics                                Prometheus text
    GET  /  and  /dashboard.json                 the live dashboard and its data
    POST /admin/promote | rollback | pause       bearer token from --admin-token-file

The request header ``X-Autocompress-Arm: original|candidate`` pins the arm (for tests);
every answer carries the same header and an ``arm`` field naming the arm that served it.
"""
from __future__ import annotations

import hmac
import json
from dataclasses import dataclass

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from ..errors import UserError
from . import openai
from .controller import Controller
from .dashboard import PAGE, dashboard_data, plotly_js
from .generation import Delta, Finished, generate
from .metrics import CONTENT_TYPE, render_metrics
from .openai import BadRequest
from .routing import Arm

ARM_HEADER = "X-Autocompress-Arm"
ADMIN_ACTIONS = ("promote", "rollback", "pause")


@dataclass
class ServeState:
    """What the handlers need: the controller, the tokenizer, limits and the admin token."""

    controller: Controller
    tokenizer: object
    eos: dict
    model_name: str
    max_tokens: int
    max_context: int
    admin_token: str | None = None


def _error(exc: BadRequest) -> JSONResponse:
    kind = "server_error" if exc.status >= 500 else "invalid_request_error"
    return JSONResponse(openai.error_body(str(exc), exc.param, exc.code, kind), status_code=exc.status)


async def _body(request: Request) -> dict:
    try:
        body = json.loads(await request.body() or b"{}")
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise BadRequest("the request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    return body


def _pin(request: Request) -> Arm | None:
    value = request.headers.get(ARM_HEADER)
    if value is None:
        return None
    try:
        return Arm(value.strip().lower())
    except ValueError:
        raise BadRequest(f"{ARM_HEADER} must be original or candidate, got {value!r}", ARM_HEADER) from None


def build_app(state: ServeState) -> Starlette:
    """The Starlette application over ``state``."""
    controller = state.controller

    def check_model(body: dict) -> None:
        model = body.get("model")
        if model is not None and model != state.model_name:
            raise BadRequest(f"model {model!r} is not served here; this server serves {state.model_name!r}",
                             "model", 404, "model_not_found")

    async def respond(request: Request, prompt: list[int], params: openai.Params, chat: bool) -> Response:
        if len(prompt) + params.max_tokens > state.max_context:
            raise BadRequest(f"the prompt ({len(prompt)} tokens) plus max_tokens ({params.max_tokens}) exceeds "
                             f"the model's context of {state.max_context} tokens", "max_tokens")
        pin = _pin(request)
        arm = controller.route(pin)
        pieces = generate(controller, state.tokenizer, state.eos, prompt, params, pin, first=arm)
        rid = openai.new_id("chatcmpl" if chat else "cmpl")
        if not params.stream:
            try:
                finished = [p async for p in pieces if isinstance(p, Finished)][-1]
            except RuntimeError as exc:
                return JSONResponse(openai.error_body(str(exc), kind="server_error"), status_code=500)
            use = openai.usage(finished.prompt_tokens, finished.completion_tokens)
            make = openai.chat_body if chat else openai.completion_body
            body = make(rid, state.model_name, finished.text, finished.finish_reason, use, finished.arm.value,
                        finished.retried)
            return JSONResponse(body, headers={ARM_HEADER: finished.arm.value})
        try:
            first = await anext(pieces)  # a full queue (503) shows here, before any byte is sent
        except RuntimeError as exc:
            return JSONResponse(openai.error_body(str(exc), kind="server_error"), status_code=500)

        async def events():
            piece = first
            if chat:
                yield _sse(openai.chat_chunk(rid, state.model_name, {"role": "assistant", "content": ""}, None,
                                             arm.value))
            try:
                while True:
                    if isinstance(piece, Delta):
                        yield _sse(openai.chat_chunk(rid, state.model_name, {"content": piece.text}, None,
                                                     piece.arm.value) if chat else
                                   openai.completion_chunk(rid, state.model_name, piece.text, None, piece.arm.value))
                    else:
                        yield _sse(openai.chat_chunk(rid, state.model_name, {}, piece.finish_reason, piece.arm.value)
                                   if chat else openai.completion_chunk(rid, state.model_name, "",
                                                                        piece.finish_reason, piece.arm.value))
                        break
                    piece = await anext(pieces)
            except RuntimeError as exc:
                yield _sse(openai.error_body(str(exc), kind="server_error"))
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={ARM_HEADER: arm.value, "Cache-Control": "no-cache"})

    async def completions(request: Request) -> Response:
        try:
            body = await _body(request)
            check_model(body)
            params = openai.parse_params(body, state.max_tokens)
            prompt = state.tokenizer(openai.parse_prompt(body)).input_ids
            if not prompt:
                raise BadRequest("prompt is empty", "prompt")
            return await respond(request, prompt, params, chat=False)
        except BadRequest as exc:
            return _error(exc)

    async def chat_completions(request: Request) -> Response:
        try:
            body = await _body(request)
            check_model(body)
            params = openai.parse_params(body, state.max_tokens)
            messages = openai.parse_messages(body)
            if not getattr(state.tokenizer, "chat_template", None):
                raise BadRequest("the served model has no chat template; use /v1/completions", "messages")
            text = state.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            prompt = state.tokenizer(text, add_special_tokens=False).input_ids
            return await respond(request, prompt, params, chat=True)
        except BadRequest as exc:
            return _error(exc)

    async def models(request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [
            {"id": state.model_name, "object": "model", "created": 0, "owned_by": "autocompress"}]})

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def ready(request: Request) -> Response:
        if not controller.engine.alive:
            return JSONResponse({"status": "not ready", "reason": "the engine is not running"}, status_code=503)
        return JSONResponse({"status": "ready", **controller.rollout.snapshot()})

    async def metrics(request: Request) -> Response:
        return Response(render_metrics(controller.monitor, controller.rollout), media_type=CONTENT_TYPE)

    async def dashboard(request: Request) -> Response:
        return HTMLResponse(PAGE)

    async def dashboard_json(request: Request) -> Response:
        return JSONResponse(dashboard_data(controller.monitor, controller.rollout))

    async def plotly(request: Request) -> Response:
        return Response(plotly_js(), media_type="application/javascript",
                        headers={"Cache-Control": "max-age=86400"})

    async def admin(request: Request) -> Response:
        action = request.path_params["action"]
        if action not in ADMIN_ACTIONS:
            return JSONResponse(openai.error_body(f"unknown admin action {action!r}; one of "
                                                  f"{', '.join(ADMIN_ACTIONS)}"), status_code=404)
        if state.admin_token is None:
            return JSONResponse(openai.error_body("admin is off: start serve with --admin-token-file"),
                                status_code=404)
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not given.strip():
            return JSONResponse(openai.error_body("missing bearer token", code="unauthorized"), status_code=401,
                                headers={"WWW-Authenticate": "Bearer"})
        if not hmac.compare_digest(given.strip().encode(), state.admin_token.encode()):
            return JSONResponse(openai.error_body("wrong bearer token", code="forbidden"), status_code=403)
        try:
            return JSONResponse({"ok": True, **controller.admin(action, await _body(request))})
        except BadRequest as exc:
            return _error(exc)
        except UserError as exc:
            return JSONResponse(openai.error_body(str(exc)), status_code=409)

    return Starlette(routes=[
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/models", models),
        Route("/health", health),
        Route("/ready", ready),
        Route("/metrics", metrics),
        Route("/", dashboard),
        Route("/dashboard.json", dashboard_json),
        Route("/static/plotly.min.js", plotly),
        Route("/admin/{action}", admin, methods=["POST"]),
    ])


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"
