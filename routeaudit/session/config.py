"""The session's configuration: parsed options, the plugin manager and the registries."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import Any

import pluggy

from routeaudit.audit import AuditSettings
from routeaudit.session.calls import PluginFailure
from routeaudit.summaries import SummaryRegistry


@dataclass
class Config:
    """Handed to every hook that needs configuration; plugins may stash state in ``stash``."""

    options: argparse.Namespace
    """The parsed command line, including every option plugins added."""
    pluginmanager: pluggy.PluginManager
    """The session's plugin manager (``config.hook`` calls hooks)."""
    summaries: SummaryRegistry
    """Routing summaries known to this run (built-ins and ``routeaudit_register_summaries``)."""
    calibrators: dict[str, Any] = field(default_factory=dict)
    """Calibrator factories by name (reference ones and ``routeaudit_register_calibrators``)."""
    stash: dict[str, Any] = field(default_factory=dict)
    """Free space for plugins."""
    failures: list[PluginFailure] = field(default_factory=list)
    """Plugin hooks that raised outside any audit; each is an ``error`` row, reported first."""
    sources: dict[str, str] = field(default_factory=dict)
    """Where each option's value came from: ``"command line"``, or the configuration file
    as the working directory names it (``"pyproject.toml"``, ``"../pyproject.toml"``;
    routeaudit.session.projectconfig); ``plugins`` given in both say
    ``"pyproject.toml and command line"``. An option not named here has its default."""

    @property
    def hook(self) -> Any:
        return self.pluginmanager.hook

    def settings(self) -> AuditSettings:
        """The statistical settings of every audit, from the command line and the project
        file (already merged into ``options``)."""
        o = self.options
        defaults = AuditSettings()
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
            tv_min=defaults.tv_min if o.tv_min is None else o.tv_min,
            tertile_summary=o.tertile_summary,
            device=o.device,
            gain_margin=getattr(o, "gain_margin", defaults.gain_margin),
            gap_margin=getattr(o, "gap_margin", defaults.gap_margin),
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

    def source_of(self) -> dict[str, str]:
        """For every recorded option, where its value came from."""
        return {key: self.sources.get(key, "default") for key in self.as_dict()}
