"""Triton GPU kernels of fastagg (shipped as ``fastagg.kernels``). One file per op:

- merge.py            fused correct-and-merge over the flat parameters
- kd_loss.py          fused KD loss + logit gradient
- fused_linear_kd.py  chunked linear + KD for large vocabularies (never allocates [rows, C])
- vocab_head.py       the head route's two sweeps over a vocabulary chunk (helpers of fastagg.ops.vocab_head)

Each wrapper takes the same arguments as the reference in ``fastagg.ops``. Under
``TRITON_INTERPRET=1`` they also run on CPU tensors (tests only).
"""
