"""TraceSet: the contract between a model and every audit, and its storage.

==============  ===========================================================================
``traceset``    ``TraceSet``: the arrays, their validation, and ``save`` / ``load``
``meta``        ``TraceMeta``: descriptive metadata, validated field by field
``reading``     reading untrusted ``.npz`` / ``.npy`` files and trace directories safely
``writing``     writing atomically, never over what routeaudit did not write
``_common``     the contract's names and limits; file errors that name the file
==============  ===========================================================================
"""

from __future__ import annotations

from routeaudit.traces._common import (
    ARRAY_NAMES,
    MANIFEST,
    MAX_DEFLATE_RATIO,
    MAX_JSON_BYTES,
    MAX_NPY_HEADER,
    OPTIONAL_ARRAYS,
    REQUIRED_ARRAYS,
    ROUTING_ROW_TOLERANCE,
    SCHEMA_VERSION,
)
from routeaudit.traces.meta import TraceMeta
from routeaudit.traces.traceset import TraceSet

__all__ = [
    "ARRAY_NAMES",
    "MANIFEST",
    "MAX_DEFLATE_RATIO",
    "MAX_JSON_BYTES",
    "MAX_NPY_HEADER",
    "OPTIONAL_ARRAYS",
    "REQUIRED_ARRAYS",
    "ROUTING_ROW_TOLERANCE",
    "SCHEMA_VERSION",
    "TraceMeta",
    "TraceSet",
]
