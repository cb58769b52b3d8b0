"""mfm_fast: Meta Flow Maps for PyTorch — one-step posterior sampling, value gradients, steering and fine-tuning.

Public names resolve lazily so that `import mfm_fast` is cheap, imports no Triton and makes no CUDA call.
`mfm_fast.steer` is always the function; its module is `sys.modules["mfm_fast.steer"]` (or
`importlib.import_module("mfm_fast.steer")`; `from mfm_fast.steer import ...` works as usual).
"""
from __future__ import annotations

import importlib
import sys
import types

__version__ = "0.1.0"

# public name -> defining module (DESIGN.md §3)
_EXPORTS = {
    "MFMDiT": "mfm_fast.models.dit",
    "DiTConfig": "mfm_fast.models.dit",
    "MFMMLP": "mfm_fast.models.mlp",
    "flow_map": "mfm_fast.sampling",
    "posterior_sample": "mfm_fast.sampling",
    "drift": "mfm_fast.sampling",
    "refine_sample": "mfm_fast.sampling",
    "glass_drift": "mfm_fast.glass",
    "glass_posterior_sample": "mfm_fast.glass",
    "glass_value_and_grad": "mfm_fast.glass",
    "value_and_grad": "mfm_fast.value",
    "steer": "mfm_fast.steer",
    "best_of_n": "mfm_fast.steer",
    "SteerResult": "mfm_fast.steer",
    "Cost": "mfm_fast.value",
    "as_reward": "mfm_fast.rewards",
    "LinearInverseReward": "mfm_fast.rewards",
    "ClassifierReward": "mfm_fast.rewards",
    "DecodeThenScore": "mfm_fast.rewards",
    "load": "mfm_fast.train",
    "save": "mfm_fast.train",
    "load_official_mfm": "mfm_fast.models.checkpoints",
    "mfm_from_sit": "mfm_fast.models.checkpoints",
    "save_safetensors": "mfm_fast.models.checkpoints",
    "LatentShards": "mfm_fast.latents",
    "decode_latents": "mfm_fast.latents",
    "save_image_grid": "mfm_fast.latents",
    "get_reward_model": "mfm_fast.reward_models",
    "build_scorers": "mfm_fast.reward_models",
    "score_images": "mfm_fast.reward_models",
    "LatentDecoder": "mfm_fast.latents",
    "build_vae": "mfm_fast.latents",
    "auto_chunk_size": "mfm_fast.memory",
    "GraphCaptureError": "mfm_fast.graphs",
    "run_sharded": "mfm_fast.parallel_sample",
    "ShardOutput": "mfm_fast.parallel_sample",
    "sample_generator": "mfm_fast.parallel_sample",
}
_SUBMODULES = {"data", "metrics", "rewards", "losses", "interpolant", "glass", "value", "finetune",
               "train", "backend", "ops", "models", "sampling", "graphs", "experiments",
               "memory", "profile", "parallel_sample", "distributed"}

__all__ = sorted(_EXPORTS) + sorted(_SUBMODULES)


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    if name in _SUBMODULES:
        module = importlib.import_module(f"mfm_fast.{name}")
        globals()[name] = module
        return module
    raise AttributeError(f"module 'mfm_fast' has no attribute {name!r}")


def __dir__():
    return __all__


class _Package(types.ModuleType):
    # Importing the submodule mfm_fast.steer (any `from .steer import ...`, e.g. by profile, cli) makes the
    # import system bind it as the package attribute `steer`, shadowing the public function: bind the function.
    def __setattr__(self, name, value):
        if name == "steer" and isinstance(value, types.ModuleType):
            value = value.steer
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
