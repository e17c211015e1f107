"""What differs between the transformers versions the toolkit runs on (5.2x here, 5.17 on the GPU machine)."""
from __future__ import annotations

import inspect

import torch


def cache_kwarg(model: torch.nn.Module) -> str:
    """The name of a causal LM's KV-cache argument: ``cache`` (transformers ≥ 5.2x; ``past_key_values`` still
    works there with a deprecation warning) or ``past_key_values`` (earlier 5.x)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def output_cache(output):
    """The KV cache of a model output, whichever name the installed transformers gives it."""
    if "cache" in type(output).__dataclass_fields__:  # transformers ≥ 5.2x
        return output.cache
    return output.past_key_values
