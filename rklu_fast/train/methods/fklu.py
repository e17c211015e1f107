"""FKLU: forward-KL distillation to the same teacher, the paper's ablation (Wang et al., NAACL 2025, Table 4).

``loss = Σ_v p_t(v)·(log p_t(v) − log p_θ(v))`` per counted target (KL(p_t ‖ p_θ)), normalised like RKLU.
Forward KL is mass-covering: the student must keep probability wherever the teacher has some, which the paper
finds forgets less than the mode-seeking reverse KL.
"""
from __future__ import annotations

from rklu_fast.train.methods.rklu import RKLU


class FKLU(RKLU):
    name = "fklu"
    summary = "forward KL KL(p_t ‖ p_θ) to the same teacher (the paper's ablation)"
    paper = "Wang et al., NAACL 2025 (ablation of RKLU)"
    reverse = False
