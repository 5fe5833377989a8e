"""autocompress.profile: measured per-unit sensitivity, cheap proxies and linguistic roles.

The verb is :func:`profile_model` (library) / :func:`profile_run` (run directory, reuse and
refusal of ``profile.json``); the artifact is :class:`Profile`. The verb is imported lazily,
so reading a ``profile.json`` does not pull in the measuring machinery.
"""
from .artifact import AdditivityCheck, Profile, UnitProfile

__all__ = ["AdditivityCheck", "Profile", "ProfileOutcome", "ProfileSettings", "UnitProfile", "profile_model",
           "profile_run"]


def __getattr__(name: str):
    if name in ("ProfileOutcome", "ProfileSettings", "profile_model", "profile_run"):
        from . import run  # noqa: PLC0415

        return getattr(run, name)
    raise AttributeError(f"module 'autocompress.profile' has no attribute {name!r}")
