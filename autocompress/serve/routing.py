"""Which arm serves a request, and which candidate requests are shadow-scored: pure functions.

Each decision draws one number ``u`` in [0, 1) for the request's index and compares it with
the share. The draws follow a golden-ratio sequence started at a seeded offset: as random
looking as a hash for any one request, but evenly spread, so the realised share over any
run of requests tracks the asked share to within a fraction of a point (independent coin
flips wander by about a point over 2,000 requests at a 25% share). Routing and shadow
sampling use different seeds, so they are not correlated.
"""
from __future__ import annotations

import enum
import hashlib

GOLDEN = (5 ** 0.5 - 1) / 2


class Arm(str, enum.Enum):
    """The two models being compared: the one in service and the one being rolled out."""

    ORIGINAL = "original"
    CANDIDATE = "candidate"


def seed_offset(seed: int, stream: str) -> float:
    """A reproducible start in [0, 1) for the draw sequence named ``stream`` under ``seed``."""
    digest = hashlib.blake2b(f"{stream}:{seed}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2 ** 64


def draw(seed: int, index: int, stream: str = "route") -> float:
    """The ``index``-th draw in [0, 1) of the sequence ``stream`` under ``seed``."""
    return (seed_offset(seed, stream) + index * GOLDEN) % 1.0


def choose_arm(share: float, seed: int, index: int, pin: Arm | None = None) -> Arm:
    """The arm for request number ``index`` when ``share`` percent goes to the candidate.

    ``pin`` (from the request's header) overrides the draw.
    """
    if pin is not None:
        return pin
    return Arm.CANDIDATE if draw(seed, index) * 100 < share else Arm.ORIGINAL


def take_shadow(fraction: float, seed: int, index: int) -> bool:
    """Whether candidate request number ``index`` is scored by the original (``fraction`` percent are)."""
    return draw(seed, index, "shadow") * 100 < fraction
