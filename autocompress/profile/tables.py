"""rich tables of a profile: most and least sensitive units, additivity, proxies, roles."""
from __future__ import annotations

from rich.table import Table

from ..search.space import label_bits
from .artifact import Profile


def ranking_label(profile: Profile) -> str:
    """The choice units are ranked by: ``bits=3`` when measured, else the lowest bit width, else the first."""
    labels = profile.labels()
    if "bits=3" in labels:
        return "bits=3"
    bits = [label for label in labels if label.startswith("bits=")]
    return min(bits, key=label_bits) if bits else labels[0]


def sensitivity_table(profile: Profile, count: int = 5, label: str | None = None) -> Table:
    """The ``count`` most and least sensitive units by KL at ``label``, with every choice's KL and the role."""
    label = label or ranking_label(profile)
    ranked = sorted(profile.units, key=lambda u: u.kl[label], reverse=True)
    shown = ranked if len(ranked) <= 2 * count else ranked[:count] + [None] + ranked[-count:]
    table = Table(title=f"most and least sensitive units (mean KL per token, ranked by {label})")
    table.add_column("unit")
    for name in profile.labels():
        table.add_column(name, justify="right", style="bold" if name == label else None)
    table.add_column("role")
    for unit in shown:
        if unit is None:
            table.add_row("...", *[""] * (len(profile.labels()) + 1))
            continue
        table.add_row(unit.name, *[f"{unit.kl[name]:.4g}" for name in profile.labels()],
                      unit.dominant_role or "-")
    return table


def additivity_table(profile: Profile) -> Table:
    """Per bit width: the KL of every unit changed at once, predicted as a sum and measured."""
    table = Table(title="additivity: every unit at b bits")
    for name in ("bits", "predicted KL (sum)", "measured KL", "measured / predicted",
                 "predicted loss delta", "measured loss delta"):
        table.add_column(name, justify="right")
    for check in profile.additivity:
        ratio = check.measured_kl / check.predicted_kl if check.predicted_kl > 0 else float("nan")
        table.add_row(str(check.bits), f"{check.predicted_kl:.4g}", f"{check.measured_kl:.4g}", f"{ratio:.2f}",
                      f"{check.predicted_loss_delta:+.4g}", f"{check.measured_loss_delta:+.4g}")
    return table


def proxy_table(profile: Profile) -> Table:
    """Spearman rank correlation of every proxy with the measured KL."""
    table = Table(title="cheap proxies vs measured KL (Spearman rho over units)")
    table.add_column("proxy ~ choice")
    table.add_column("rho", justify="right")
    for name, rho in sorted(profile.proxy_spearman.items(), key=lambda kv: -abs(kv[1])):
        table.add_row(name, f"{rho:+.3f}")
    return table


def role_curve_table(profile: Profile) -> Table | None:
    """Selectivity of each linguistic probe per layer (None when the profile has no roles)."""
    if not profile.meta.get("roles"):
        return None
    from .probes import RoleProfile, role_table  # noqa: PLC0415

    return role_table(RoleProfile.from_json(profile.meta["roles"]))
