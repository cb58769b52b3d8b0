"""The op tables a model runs on: the fused Triton ops or their PyTorch `_ref` twins, field for field."""
from __future__ import annotations

from dataclasses import dataclass, fields


@dataclass
class Ops:
    time_embed: object
    ln_modulate: object
    gate_residual_ln_modulate: object
    input_stage: object
    bias_gelu: object
    attention: object
    name: str = "torch"


OP_NAMES = tuple(f.name for f in fields(Ops) if f.name != "name")


def reference_ops() -> Ops:
    """The pure-PyTorch references (imported here, so the reference path never imports Triton)."""
    from .adaln import ln_modulate_ref
    from .attention import attention_ref
    from .bias_gelu import bias_gelu_ref
    from .gate_residual import gate_residual_ln_modulate_ref
    from .input_stage import input_stage_ref
    from .time_embed import time_embed_ref
    return Ops(time_embed_ref, ln_modulate_ref, gate_residual_ln_modulate_ref, input_stage_ref, bias_gelu_ref,
               attention_ref, "torch")


def triton_ops() -> Ops:
    """The fused-op table used by MFMDiT(impl='triton')."""
    from .fused import OPS
    return Ops(**OPS, name="triton")


def op_kernels(ops: Ops) -> dict:
    """op name -> 'triton' or 'ref' for an op table."""
    kinds = {n: ("ref" if getattr(ops, n).__name__.endswith("_ref") else "triton") for n in OP_NAMES}
    if kinds["attention"] == "triton":
        kinds["attention"] = "dispatch (see attention)"  # flash/xformers/SDPA kernels, chosen per call
    return kinds
