"""routeaudit-multicalibration: an example third-party routeaudit plugin.

The plugin module is :mod:`routeaudit_multicalibration.plugin` (registered under the
``routeaudit`` entry-point group, so an installed copy shows up in ``routeaudit audits``).
"""

from __future__ import annotations

from routeaudit_multicalibration.plugin import MIN_SIZE, TOLERANCE, MulticalibrationAudit

__all__ = ["MIN_SIZE", "TOLERANCE", "MulticalibrationAudit"]
__version__ = "0.1.0"
