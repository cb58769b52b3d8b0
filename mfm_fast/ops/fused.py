"""The fused-op table of MFMDiT(impl="triton"): field name -> the Triton op with its `_ref` twin's signature."""
from __future__ import annotations

from .adaln import ln_modulate
from .attention import attention
from .bias_gelu import bias_gelu
from .gate_residual import gate_residual_ln_modulate
from .input_stage import input_stage
from .time_embed import time_embed

OPS = dict(time_embed=time_embed, ln_modulate=ln_modulate, gate_residual_ln_modulate=gate_residual_ln_modulate,
           input_stage=input_stage, bias_gelu=bias_gelu, attention=attention)
