"""rklu_fast: Reverse-KL knowledge-distillation unlearning (RKLU) for LLMs, with fused loss kernels."""
from rklu_fast.backends import backends
from rklu_fast.fused_linear import fused_linear_forward_kl_loss, fused_linear_reverse_kl_loss
from rklu_fast.loss import forward_kl_loss, reverse_kl_loss, teacher_logits
from rklu_fast.reference import TEACHER_FORMS, shifted_augmented

__version__ = "0.1.0"
__all__ = ["reverse_kl_loss", "forward_kl_loss", "teacher_logits", "shifted_augmented", "TEACHER_FORMS",
           "fused_linear_reverse_kl_loss", "fused_linear_forward_kl_loss", "backends", "__version__"]
