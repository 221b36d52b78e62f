"""What ``routeaudit validate`` simulates for one audit: a generator of planted cases and
the grid of planted sizes (docs/methods.md §5.2)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from routeaudit.audit import AuditContext, AuditSettings
    from routeaudit.traces import TraceSet


@dataclass(frozen=True)
class PlantedCases:
    """Synthetic models with a planted effect, for an audit's error rates.

    ``generate(effect, n=, seed=, n_layers=, n_classes=)`` returns the traces of one
    synthetic model with ``n`` examples, ``n_layers`` routing layers and ``n_classes``
    classes, deterministic in ``seed``, with a planted effect of size ``effect`` in the
    generator's own units; 0 is the audit's null (a case the claim must not pass).
    ``validate`` relates sizes to the audit's own effect units by the mean estimate over
    replicates.
    """

    generate: Callable[..., TraceSet]
    effects: tuple[float, ...]
    """The planted sizes, 0 (the null) first."""
    description: str = ""
    cells: Callable[[AuditContext], list[dict[str, Any]]] | None = None
    """The cells to simulate (default: the audit's first cell)."""
    margin: Callable[[AuditSettings], float] | None = None
    """The audit's practical margin under the run's settings (for the false-fail rate)."""


#: Planted sizes of the matched-confidence audits: P(correct) at fixed confidence moves by
#: size · (u − ½) with u the routing latent (0: the confounded null).
MATCHED_SIZES = (0.0, 0.05, 0.075, 0.1, 0.2, 0.3)
#: Planted sizes of the calibrator audits, on the capacity-only shape (0: capacity only).
CALIBRATOR_SIZES = (0.0, 0.2, 0.35, 0.5)


def _generator(shape: str) -> Callable[..., TraceSet]:
    def generate(effect: float, *, n: int, seed: int, n_layers: int, n_classes: int
                 ) -> TraceSet:
        from routeaudit.simulation.cases import generate as make

        return make(shape, n, effect=effect, seed=seed, n_layers=n_layers, n_classes=n_classes)

    generate.__name__ = f"generate_{shape}"
    return generate


def matched_cases() -> PlantedCases:
    """The planted cases of ``stratification`` and ``permutation_null``."""
    return PlantedCases(
        _generator("logit_linear"), MATCHED_SIZES,
        "routing-conditional miscalibration planted at fixed confidence; size 0 is the "
        "confounded null (routing tracks confidence, Y ⟂ R | C)",
        margin=lambda settings: settings.gap_margin)


def calibrator_cases() -> PlantedCases:
    """The planted cases of the calibrator gain audits."""
    return PlantedCases(
        _generator("capacity"), CALIBRATOR_SIZES,
        "correctness a steep non-linear function of confidence, routing confounded with it, "
        "plus a planted routing-conditional term; size 0 is capacity only",
        margin=lambda settings: settings.gain_margin)
