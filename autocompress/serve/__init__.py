"""Safe rollout of a compressed model: ``autocompress serve ORIGINAL CANDIDATE``.

An OpenAI-compatible server (Starlette on uvicorn) in front of two models. Each request
goes to the candidate with the current canary probability; a sample of the candidate's
answers is scored by the original off the request path; a policy ramps the share stage by
stage and fails over to the original at once when a threshold is crossed. Everything is
recorded in an append-only event log that a restarted server resumes from.

Modules, one job each: :mod:`.policy` (stages and thresholds, YAML), :mod:`.routing` (which
arm), :mod:`.rollout` (state as a fold over events, the policy's verdicts), :mod:`.events`
(the JSONL log), :mod:`.monitor` and :mod:`.metrics` (live figures, Prometheus),
:mod:`.engine` (batched decoding for both models and the scorer on one thread),
:mod:`.scoring` (shadow scores), :mod:`.generation` (one request, with retry),
:mod:`.openai` (wire format), :mod:`.app` (HTTP routes), :mod:`.dashboard`, :mod:`.server`.
"""
from .server import ServeConfig, build_server, serve

__all__ = ["ServeConfig", "build_server", "serve"]
