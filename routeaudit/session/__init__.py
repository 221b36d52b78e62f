"""The session: from a parsed command line to a finished report.

=================  ============================================================================
``config``         ``Config``: parsed options, the plugin manager, the registries
``projectconfig``  ``[tool.routeaudit]`` in pyproject.toml: discovery, validation, provenance
``plugins``        building the plugin manager (built-ins, ``-p``, entry points, user file)
``calls``          ``CallInfo`` and the guarded hook caller: plugin code never ends the run
``targets``        loading adapter files, trace directories and ``.npz`` files
``selection``      node ids and ``-k``
``runner``         collect, check, run, report
=================  ============================================================================
"""

from __future__ import annotations

from routeaudit.session.config import Config
from routeaudit.session.runner import collect_audits, run_session

__all__ = ["Config", "collect_audits", "run_session"]
