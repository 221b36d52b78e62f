"""The session's configuration: parsed options plus the plugin manager and registries."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import Any

import pluggy

from routeaudit.audit import AuditSettings
from routeaudit.summaries import SummaryRegistry


@dataclass
class Config:
    """Handed to every hook that needs configuration; plugins may stash state in ``stash``."""

    options: argparse.Namespace
    pluginmanager: pluggy.PluginManager
    summaries: SummaryRegistry
    calibrators: dict[str, Any] = field(default_factory=dict)
    stash: dict[str, Any] = field(default_factory=dict)

    @property
    def hook(self) -> Any:
        return self.pluginmanager.hook

    def settings(self) -> AuditSettings:
        o = self.options
        return AuditSettings(
            alpha=o.alpha,
            n_permutations=o.permutations,
            n_bootstrap=o.bootstrap,
            n_bins=o.bins,
            bin_strategy=o.bin_strategy,
            strata=o.strata,
            min_count=o.min_count,
            stability=o.stability,
            sequential_h=o.sequential_h,
            device=o.device,
        )

    def as_dict(self) -> dict[str, Any]:
        """Options as JSON-friendly values, recorded in every report."""
        out = {}
        for key, value in sorted(vars(self.options).items()):
            if isinstance(value, (str, int, float, bool)) or value is None:
                out[key] = value
            elif isinstance(value, (list, tuple)):
                out[key] = [v if isinstance(v, (str, int, float, bool)) else str(v) for v in value]
            else:
                out[key] = str(value)
        return out
