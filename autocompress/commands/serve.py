"""``autocompress serve ORIGINAL CANDIDATE``: an OpenAI-compatible canary rollout with failover."""
from __future__ import annotations

import argparse
from pathlib import Path

from .common import add_threads, add_trust_remote_code, non_negative_int, positive_int


def percent(text: str) -> float:
    """argparse type: a percentage from 0 to 100, written ``20`` or ``20%``."""
    try:
        value = float(text.strip().removesuffix("%"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a percentage such as 20 or 20%, got {text!r}") from None
    if not 0 <= value <= 100:
        raise argparse.ArgumentTypeError(f"expected a percentage from 0 to 100, got {text!r}")
    return value


def port(text: str) -> int:
    """argparse type: a TCP port (0 picks a free one)."""
    value = non_negative_int(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"expected a port from 0 to 65535, got {text!r}")
    return value


def default_out(candidate: str) -> Path:
    """``RUN/serve`` for a candidate written by ``apply`` into ``RUN/model``; ``./serve`` otherwise."""
    path = Path(candidate)
    if (path / "autocompress.json").exists():
        return path.resolve().parent / "serve"
    return Path("serve")


def register(verbs) -> None:
    """Add the ``serve`` sub-command."""
    sv = verbs.add_parser(
        "serve", help="serve ORIGINAL and CANDIDATE behind one OpenAI API: canary rollout with failover",
        description="Serve an OpenAI-compatible API (completions, chat, SSE streaming) in front of two models. "
                    "Requests go to CANDIDATE with the canary share; a sample is scored by ORIGINAL; the policy "
                    "ramps the share by stages and fails over to ORIGINAL when a threshold is crossed. "
                    "Dashboard at /, Prometheus metrics at /metrics, event log in --out.")
    sv.add_argument("original", metavar="ORIGINAL", help="the model in service (any model spec eval accepts)")
    sv.add_argument("candidate", metavar="CANDIDATE", help="the model being rolled out, e.g. runs/x/model")
    sv.add_argument("--canary", type=percent, default=None,
                    help="starting share of traffic to CANDIDATE, percent (default: the policy's first stage, 5)")
    sv.add_argument("--shadow", type=percent, default=20.0,
                    help="percent of CANDIDATE's requests scored by ORIGINAL (default 20%%)")
    sv.add_argument("--policy", metavar="YAML", help="stages and thresholds (defaults in the README)")
    sv.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    sv.add_argument("--port", type=port, default=8000, help="TCP port (default 8000; 0 picks a free one)")
    sv.add_argument("--out", help="run directory for the event log (default RUN/serve beside CANDIDATE's "
                                  "RUN/model, else ./serve)")
    sv.add_argument("--resume", action="store_true", help="continue the rollout logged in --out")
    sv.add_argument("--admin-token-file", metavar="FILE",
                    help="bearer token for /admin/promote, /admin/rollback, /admin/pause (without it admin is off)")
    sv.add_argument("--seed", type=non_negative_int, default=0, help="seed of routing and shadow sampling")
    sv.add_argument("--max-batch", type=positive_int, default=8, help="requests decoded together per model")
    sv.add_argument("--max-tokens", type=positive_int, default=256, help="largest max_tokens a request may ask")
    sv.add_argument("--model-name", help="the model id clients send (default: ORIGINAL's last path part)")
    add_trust_remote_code(sv)
    add_threads(sv)
    sv.set_defaults(run=run)


def run(args) -> int:
    """Serve until interrupted."""
    from ..serve import ServeConfig, serve  # noqa: PLC0415

    out = Path(args.out) if args.out else default_out(args.candidate)
    serve(ServeConfig(original=args.original, candidate=args.candidate, out=str(out), canary=args.canary,
                      shadow=args.shadow, policy=args.policy, host=args.host, port=args.port, resume=args.resume,
                      admin_token_file=args.admin_token_file, seed=args.seed, max_batch=args.max_batch,
                      max_tokens=args.max_tokens, model_name=args.model_name,
                      trust_remote_code=args.trust_remote_code))
    return 0
