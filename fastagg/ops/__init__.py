"""The fused ops of DESIGN.md section 2: one reference (plain PyTorch) per op, and the dispatch
to the compiled backends (``backend`` = "torch", "triton", ...). See fastagg.backends."""

from .fused_linear_kd import fused_linear_kd_reference
from .kd_loss import kd_loss, kd_loss_grad, kd_loss_grad_reference
from .merge import fused_merge, fused_merge_reference

__all__ = [
    "fused_merge", "fused_merge_reference", "kd_loss", "kd_loss_grad", "kd_loss_grad_reference",
    "fused_linear_kd_reference",
]
