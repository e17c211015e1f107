"""Methods: loss plug-ins of the one training loop (``base.Method``), one file each, and their registry.

Adding a method is one file (a ``Method`` subclass: formula and paper in its docstring) plus one line below.
"""
from __future__ import annotations

import dataclasses

from rklu_fast.train.methods.base import Method, MethodContext, StepCounts
from rklu_fast.train.methods.dpo import IdkDPO
from rklu_fast.train.methods.fklu import FKLU
from rklu_fast.train.methods.ga import GA
from rklu_fast.train.methods.idk import IDK
from rklu_fast.train.methods.nll import NLL
from rklu_fast.train.methods.npo import NPO
from rklu_fast.train.methods.retain import RETAIN_TERMS, make_retain_term
from rklu_fast.train.methods.rklu import RKLU
from rklu_fast.train.methods.simnpo import SimNPO
from rklu_fast.train.methods.ta import TaskArithmetic
from rklu_fast.train.methods.teacher import Teacher

# unlearn.method → plug-in
METHODS: dict[str, type[Method]] = {
    "rklu": RKLU,
    "fklu": FKLU,
    "ga": GA,
    "npo": NPO,
    "simnpo": SimNPO,
    "idk": IDK,
    "dpo": IdkDPO,
    "ta": TaskArithmetic,
    "teacher": Teacher,
}


def method_class(name: str) -> type[Method]:
    """The plug-in class of ``name`` (``nll`` too: the fine-tuning stages' objective)."""
    if name == "nll":
        return NLL
    if name not in METHODS:
        raise ValueError(f"unlearn.method: unknown method {name!r}; choose one of {list(METHODS)}")
    return METHODS[name]


def make_method(name: str, ctx: MethodContext | None = None, **fields) -> Method:
    """An instance of method ``name``; ``fields`` set ``MethodContext`` fields (``alpha=8.0, backend="torch"``),
    and hyper-parameters the context leaves unset take the method's defaults for ``forget_split``."""
    cls = method_class(name)
    forget_split = fields.pop("forget_split", None)
    if ctx is not None and fields:
        raise TypeError(f"make_method: pass a MethodContext or its fields, not both (got {sorted(fields)})")
    ctx = dataclasses.replace(ctx) if ctx is not None else MethodContext(**fields)  # the caller's stays as given
    for key, value in cls.defaults(forget_split).items():
        if getattr(ctx, key) is None:
            setattr(ctx, key, value)
    if ctx.forget_weight is None:
        ctx.forget_weight = 1.0
    return cls(ctx)


def describe() -> list[tuple[str, str, str]]:
    """(name, one-line summary, paper) of every unlearning method, for ``rklu methods`` and the README."""
    return [(name, cls.summary, cls.paper) for name, cls in METHODS.items()]


__all__ = ["METHODS", "Method", "MethodContext", "StepCounts", "NLL", "RETAIN_TERMS", "describe", "make_method",
           "make_retain_term", "method_class"]
