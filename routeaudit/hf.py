"""Hugging Face MoE models in routeaudit: the public face of :mod:`routeaudit.plugins.hf_moe`.

``from routeaudit.hf import MoEAdapter`` and subclass it (``load`` returns the model,
``batches`` yields ``input_ids``), or wrap a loaded model directly::

    adapter = MoEAdapter(model=model, batches={"eval": [{"input_ids": ids}]})

Importing this module loads torch; transformers loads only when a model is used.
"""

from __future__ import annotations

from routeaudit.plugins.hf_moe import (
    FAMILY_RULES,
    MoEAdapter,
    RouterRule,
    SelfCheckError,
    check_router_output,
    family_rule,
    find_hf_routers,
    self_check,
    supported_families,
)

__all__ = ["FAMILY_RULES", "MoEAdapter", "RouterRule", "SelfCheckError", "check_router_output",
           "family_rule", "find_hf_routers", "self_check", "supported_families"]
