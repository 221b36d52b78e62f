"""TraceMeta: the descriptive metadata of a TraceSet, validated field by field.

Nothing here changes a statistic, but a wrong type or size would surface later as an
audit error, so every field is checked up front and each problem is reported as
``meta.<field>``: what was given and what is expected (not pydantic's own text)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from routeaudit.errors import TraceValidationError
from routeaudit.traces._common import _brief

# ------------------------------------------------------------------------------ metadata
#: What each TraceMeta field must be, in words (used in error messages).
_META_EXPECTED = {
    "name": "a string",
    "family": "a string such as 'attnres-full', 'attnres-block', 'moe' or 'synthetic'",
    "routing_mode": "'soft' or 'hard'",
    "source_families": "an object mapping a family name to a list of source indices, "
                       "e.g. {\"current\": [0]}",
    "layer_names": "a list of strings, one per routing layer",
    "layer_types": "a list of strings ('attn', 'mlp', 'final', ...), one per routing layer",
    "layer_depth": "a list of integers (transformer block index), one per routing layer",
    "schedule": "an [L, S] list of lists of numbers (the analytic routing)",
    "replicate": "an integer (the index of a trained replicate) or null",
    "per_token": "true or false",
    "source_kind": "'depth' (AttnRes depth sources) or 'experts' (MoE experts)",
    "top_k": "a positive integer (experts each token is sent to) or null",
    "expert_layer": "an integer (the routing layer whose experts expert_logits are) or null",
}


class TraceMeta(BaseModel):
    """Descriptive metadata; nothing here changes a statistic.

    Constructing one with ill-typed fields raises TraceValidationError naming
    ``meta.<field>``, what was given and what is expected (not pydantic's raw text). The
    fields that describe the routing (``schedule``, ``layer_*``, ``source_families``) are
    checked against the arrays by :meth:`TraceSet.validate`.
    """

    model_config = ConfigDict(extra="allow")

    name: str = "traces"
    family: str = "unknown"  # attnres-full | attnres-block | moe | synthetic | ...
    routing_mode: Literal["soft", "hard"] = "soft"
    source_families: dict[str, list[int]] = Field(default_factory=dict)
    layer_names: list[str] | None = None
    layer_types: list[str] | None = None  # per routing layer: "attn" | "mlp" | "final" | ...
    layer_depth: list[int] | None = None  # per routing layer: transformer block index
    schedule: list[list[float]] | None = None  # analytic routing [L, S] the model declares
    replicate: int | None = None  # index of a trained replicate; replicates become the seeds
    per_token: bool = False
    #: What the S axis of ``routing`` is: ``depth`` sources (their index is a depth, so
    #: depth summaries apply) or MoE ``experts`` (the index is a name: no order).
    source_kind: Literal["depth", "experts"] = "depth"
    #: MoE: experts each token is sent to (1 with ``routing_mode == "hard"``).
    top_k: int | None = None
    #: MoE: the routing layer whose experts ``expert_logits [N, E, K]`` are, and whose top-1
    #: choice defines each expert's routed region (None: the last routing layer).
    expert_layer: int | None = None

    def __init__(self, /, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as exc:
            raise _meta_error(exc) from None

    @classmethod
    def model_validate(cls, obj: Any, *args: Any, **kwargs: Any) -> TraceMeta:
        try:
            return super().model_validate(obj, *args, **kwargs)
        except ValidationError as exc:
            raise _meta_error(exc) from None

    @classmethod
    def parse(cls, value: Any) -> TraceMeta:
        """``value`` (a TraceMeta, a mapping of fields, or None) as a validated TraceMeta."""
        if isinstance(value, TraceMeta):
            return value
        if value is None:
            return cls()
        if not isinstance(value, Mapping):
            raise TraceValidationError(
                "meta", f"is {_brief(value)}",
                expected="a mapping of metadata fields (a JSON object), e.g. {\"name\": \"m\"}")
        keys = [k for k in value if not isinstance(k, str)]
        if keys:
            raise TraceValidationError("meta", f"has the key {_brief(keys[0])}",
                                       expected="field names that are strings")
        return cls(**dict(value))


def _meta_error(exc: ValidationError) -> TraceValidationError:
    """The first problem pydantic found, as a TraceValidationError naming ``meta.<field>``."""
    problems = exc.errors(include_url=False)
    first = problems[0]
    loc = tuple(first.get("loc", ()))
    expected = _META_EXPECTED.get(str(loc[0]) if loc else "", first.get("msg", "a valid value"))
    if len(problems) > 1:
        others = ", ".join(_meta_field(tuple(p.get("loc", ()))) for p in problems[1:4])
        expected += f" (also wrong: {others}{', ...' if len(problems) > 4 else ''})"
    return TraceValidationError(_meta_field(loc), f"is {_brief(first.get('input'))}",
                                expected=expected)


def _meta_field(loc: tuple) -> str:
    if not loc:
        return "meta"
    return "meta." + str(loc[0]) + "".join(f"[{p}]" if isinstance(p, int) else f"[{p!r}]"
                                           for p in loc[1:])


