"""Memory options for training a 7B student on one GPU: bf16 weights whose small updates still land, low-precision
optimizer states, gradient checkpointing, and the memory arithmetic behind them (docs/memory-and-scale.md).

Why updates vanish in bf16: bf16 keeps 8 significant bits, so a weight w moves only if the update exceeds half
an ulp, about |w|/300.  A typical weight of 0.02 has ulp = 2⁻¹³ ≈ 1.2e-4; an Adam step at lr 1e-5 is ≈ 1e-5 —
it rounds away every time and the model never trains.  Two cures, both in ``BF16AdamW``:

- ``update="kahan"``: a bf16 compensation buffer per weight keeps the part of each update that rounding lost
  and adds it back next step (Kahan summation); the weights follow an fp32-master run closely.  +2 bytes/param.
- ``update="stochastic"``: round the new weight up or down at random with probabilities that make the rounding
  unbiased; no extra memory, more noise per element (the expectation follows the fp32 run).

Optimizer states stored in bf16 are written with stochastic rounding too: with β₂ = 0.999, ``v·β₂`` rounded to
nearest is ``v`` again (a 1e-3 change is below bf16's 2⁻⁸ resolution), so ``v`` could never decay.
"""
from __future__ import annotations

import math

import torch

UPDATES = ("kahan", "stochastic")
OPTIMIZERS = ("adamw", "adamw_bf16", "adamw_8bit")


def stochastic_round_to_bf16(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """fp32 → bf16, rounding up with probability equal to the dropped fraction (unbiased: E[round(x)] = x).

    bf16 is the top 16 bits of an fp32; adding a uniform random 16-bit integer to the low half before truncating
    carries into the kept half with exactly that probability (for either sign: the bits are sign-magnitude).
    """
    if x.dtype != torch.float32:
        raise TypeError(f"x: expected float32, got {x.dtype}")
    noise = torch.randint(0, 1 << 16, x.shape, dtype=torch.int32, device=x.device, generator=generator)
    bits = (x.view(torch.int32) + noise) & -65536  # -65536 == 0xFFFF0000 as int32
    return bits.view(torch.float32).to(torch.bfloat16)  # exact: the low 16 bits are zero


class BF16AdamW(torch.optim.Optimizer):
    """AdamW (decoupled weight decay, as ``torch.optim.AdamW``) for bf16 parameters.

    The arithmetic runs in fp32 one tensor at a time (transient memory: one fp32 copy of the largest tensor);
    what is stored stays small: the weights in bf16, ``exp_avg``/``exp_avg_sq`` in ``state_dtype`` (bf16: 4
    bytes/param for both; fp32: 8), and with ``update="kahan"`` a bf16 compensation buffer (2 bytes/param).
    Stochastic rounding draws from a generator seeded by ``(seed, step, parameter index)``, so a resumed run
    repeats the same roundings without saving generator state.
    """

    def __init__(self, params, lr: float = 1e-5, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.01, *, update: str = "kahan", state_dtype: torch.dtype = torch.bfloat16,
                 seed: int = 0):
        if update not in UPDATES:
            raise ValueError(f"update: must be one of {UPDATES}, got {update!r}")
        if state_dtype not in (torch.bfloat16, torch.float32):
            raise ValueError(f"state_dtype: must be torch.bfloat16 or torch.float32, got {state_dtype}")
        if lr < 0 or eps < 0 or weight_decay < 0 or not all(0 <= b < 1 for b in betas):
            raise ValueError(f"lr/eps/weight_decay must be ≥ 0 and betas in [0, 1): got lr={lr}, eps={eps}, "
                             f"weight_decay={weight_decay}, betas={betas}")
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.update, self.state_dtype, self.seed = update, state_dtype, seed
        for group in self.param_groups:
            for p in group["params"]:
                if p.dtype != torch.bfloat16:
                    raise TypeError(f"params: BF16AdamW is for bf16 weights, got {p.dtype}; use torch.optim.AdamW "
                                    "for fp32 weights")

    def _store(self, dst: torch.Tensor, value: torch.Tensor, gen: torch.Generator) -> None:
        dst.copy_(stochastic_round_to_bf16(value, gen) if dst.dtype == torch.bfloat16 else value)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        index = 0
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                index += 1
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p, dtype=self.state_dtype)
                    state["exp_avg_sq"] = torch.zeros_like(p, dtype=self.state_dtype)
                    if self.update == "kahan":
                        state["compensation"] = torch.zeros_like(p)
                state["step"] += 1
                t = state["step"]
                gen = torch.Generator(p.device).manual_seed(hash((self.seed, t, index)) & 0x7FFFFFFF)
                g = p.grad.float()
                m = state["exp_avg"].to(torch.float32, copy=True).mul_(beta1).add_(g, alpha=1 - beta1)
                v = state["exp_avg_sq"].to(torch.float32, copy=True).mul_(beta2).addcmul_(g, g, value=1 - beta2)
                self._store(state["exp_avg"], m, gen)
                self._store(state["exp_avg_sq"], v, gen)
                # torch.optim.AdamW's formula, as the change of the weight
                denom = (v.sqrt_() / math.sqrt(1 - beta2 ** t)).add_(group["eps"])
                w = p.float()
                delta = m.div_(denom).mul_(-group["lr"] / (1 - beta1 ** t))
                delta.add_(w, alpha=-group["lr"] * group["weight_decay"])
                if self.update == "kahan":
                    comp = state["compensation"]
                    delta.add_(comp.float())           # y = update + what earlier roundings lost
                    new = (w + delta).to(torch.bfloat16)
                    comp.copy_(delta.sub_(new.float().sub_(w)))  # y − (what actually landed)
                    p.copy_(new)
                else:
                    p.copy_(stochastic_round_to_bf16(w.add_(delta), gen))
        return loss


# Hugging Face Trainer's rule (``Trainer.get_decay_parameter_names``), which TOFU and open-unlearning train with:
# no weight decay on LayerNorm modules' parameters, biases and parameters named like a norm (Llama's RMSNorm).
NO_DECAY_PATTERNS = [r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)"]


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """The trainable parameters of ``model`` in two optimizer groups: with ``weight_decay``, and without it for
    biases and normalisation weights (Hugging Face Trainer's groups)."""
    from transformers.trainer_pt_utils import get_parameter_names

    decay = set(get_parameter_names(model, [torch.nn.LayerNorm], NO_DECAY_PATTERNS))
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [{"params": [p for n, p in trainable if n in decay], "weight_decay": weight_decay},
              {"params": [p for n, p in trainable if n not in decay], "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def _tensors(params: list) -> list[torch.Tensor]:
    """The parameters of a list of parameters or of parameter groups."""
    return [t for item in params for t in (item["params"] if isinstance(item, dict) else [item])]


def build_optimizer(params, name: str = "adamw", *, lr: float, weight_decay: float = 0.01,
                    betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, update: str = "kahan",
                    seed: int = 0) -> torch.optim.Optimizer:
    """The optimizer named in the config (``unlearn.optimizer``); ``params``: parameters or parameter groups.

    - ``adamw``: ``torch.optim.AdamW``; states in the weights' dtype (fp32 weights: 8 bytes/param of state).
    - ``adamw_bf16``: ``BF16AdamW`` for bf16 weights: bf16 states, ``update`` = ``kahan`` | ``stochastic``.
    - ``adamw_8bit``: block-wise 8-bit states (2 bytes/param) from torchao (``AdamW8bit``, with stochastic
      rounding of bf16 weights) or bitsandbytes, whichever is installed.
    """
    params = list(params)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    if name == "adamw_bf16":
        return BF16AdamW(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, update=update, seed=seed)
    if name == "adamw_8bit":
        try:
            from torchao.optim import AdamW8bit
        except ImportError:
            AdamW8bit = None
        if AdamW8bit is not None:
            bf16 = any(t.dtype == torch.bfloat16 for t in _tensors(params))
            return AdamW8bit(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                             bf16_stochastic_round=bf16)
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise ValueError("optimizer: 'adamw_8bit' needs torchao (`pip install torchao`) or bitsandbytes "
                             "(`pip install bitsandbytes`); neither is installed. 'adamw_bf16' needs "
                             "neither.") from None
        return bnb.optim.AdamW8bit(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    raise ValueError(f"optimizer: must be one of {OPTIMIZERS}, got {name!r}")


def set_gradient_checkpointing(model, enabled: bool) -> None:
    """Recompute each decoder layer's activations in backward instead of storing them (HF models, peft-wrapped
    or not).  Non-reentrant checkpointing: works with frozen inputs (LoRA) and needs no input-grad hooks."""
    # transformers ≥ 5.2x renamed the switch (activation_checkpointing_*); the GPU machine's 5.17 has the old name
    new_api = hasattr(model, "activation_checkpointing_enable")
    if enabled:
        kwargs = {"use_reentrant": False}
        if new_api:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        model.config.use_cache = False  # a KV cache is useless in training and conflicts with recomputation
    elif new_api:
        model.activation_checkpointing_disable()
    else:
        model.gradient_checkpointing_disable()


GiB = 1024 ** 3
_OPTIMIZER_STATE_BYTES = {"adamw_fp32": 8, "adamw_bf16": 4, "adamw_8bit": 2}


def estimate_training_memory(n_params: int, *, n_layers: int, hidden: int, vocab: int, tokens_per_micro_batch: int,
                             weight_bytes: int = 2, grad_bytes: int = 2, optimizer: str = "adamw_bf16",
                             update: str = "kahan", gradient_checkpointing: bool = True,
                             teacher_models_on_gpu: int = 0, teacher_weight_bytes: int = 2,
                             logits_bytes: int = 2) -> dict[str, float]:
    """GiB of GPU memory one training step of a decoder LM needs, term by term (a planning estimate; the real
    number is ``torch.cuda.max_memory_reserved()``, measured by ``benchmarks/bench_train_step.py``).

    Activations with checkpointing: each layer's input ``[tokens, hidden]`` is kept (2 bytes each), plus one
    layer's full activations during recomputation (≈ 34·hidden bytes/token for attention + MLP in bf16, after
    Korthikanti et al. 2022, without the s·heads attention term that SDPA/flash attention does not store).
    Without checkpointing: that per-layer figure times ``n_layers``.  Logits: student logits, their gradient and
    the teacher rows (original + augmented), ``[tokens, vocab]`` each.
    """
    if optimizer not in _OPTIMIZER_STATE_BYTES:
        raise ValueError(f"optimizer: must be one of {sorted(_OPTIMIZER_STATE_BYTES)}, got {optimizer!r}")
    per_layer = 34 * hidden * tokens_per_micro_batch
    activations = (n_layers * 2 * hidden * tokens_per_micro_batch + per_layer) if gradient_checkpointing \
        else n_layers * per_layer
    terms = {
        "weights": n_params * weight_bytes,
        "gradients": n_params * grad_bytes,
        "optimizer_states": n_params * _OPTIMIZER_STATE_BYTES[optimizer],
        "kahan_compensation": n_params * 2 if (optimizer == "adamw_bf16" and update == "kahan") else 0,
        "teacher_models": teacher_models_on_gpu * n_params * teacher_weight_bytes,  # frozen: bf16 suffices
        "activations": activations,
        "logits_and_teacher_rows": 4 * tokens_per_micro_batch * vocab * logits_bytes,
    }
    out = {k: v / GiB for k, v in terms.items()}
    out["total"] = sum(out.values())
    return out
