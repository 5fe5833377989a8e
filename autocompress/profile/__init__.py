"""autocompress.profile: measured per-unit sensitivity, cheap proxies and linguistic roles.

The verb is :func:`profile_model` (library) / :func:`profile_run` (run directory, reuse and
refusal of ``profile.json``); the artifact is :class:`Profile`. The verb is imported lazily,
so reading a ``profile.json`` does not pull in the measuring machinery.
"""
from .artifact import AdditivityCheck, Profile, UnitProfile

__all__ = ["AdditivityCheck", "Profile", "ProfileOutcome", "ProfileSettings", "Shard", "UnitProfile",
           "merge_profiles", "profile_model", "profile_run", "profile_shard"]


def __getattr__(name: str):
    if name in ("ProfileOutcome", "ProfileSettings", "profile_model", "profile_run"):
        from . import run  # noqa: PLC0415

        return getattr(run, name)
    if name in ("Shard", "merge_profiles", "profile_shard"):
        from . import shard  # noqa: PLC0415

        return getattr(shard, name)
    raise AttributeError(f"module 'autocompress.profile' has no attribute {name!r}")
