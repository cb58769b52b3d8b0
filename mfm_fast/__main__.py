"""`python -m mfm_fast <command> ...` — each command lives in the module that owns it."""
from __future__ import annotations

import importlib
import sys

# command -> (module, function, one-line help)
COMMANDS = {
    "demo": ("mfm_fast.experiments.demo", "main", "train/reuse a GMM MFM, steer it with every method, table + PNG"),
    "train": ("mfm_fast.train", "main", "train an MFM (GMM, digits or latent shards)"),
    "finetune": ("mfm_fast.finetune", "main", "MFM-FT: off-policy reward fine-tuning of the drift"),
    "steer": ("mfm_fast.cli", "steer_main", "reward-steered sampling (torchrun: data parallel) -> samples.npz, grid"),
    "sample": ("mfm_fast.cli", "sample_main", "K-step refinement sampling (torchrun: data parallel) -> samples.npz"),
    "encode": ("mfm_fast.latents", "encode_main", "encode an image folder into SD-VAE latent shards"),
    "profile": ("mfm_fast.profile", "main", "steering-throughput profiler with NVML telemetry"),
    "kernels": ("mfm_fast.aot", "main", "compile every Triton kernel for a target GPU (no GPU needed): regs, spills"),
    "info": ("mfm_fast.backend", "info_main", "versions, GPU, chosen kernels and attention backend"),
    "experiment": ("mfm_fast.experiments", "main", "run a paper experiment (gmm, digits, finetune-gmm)"),
}


def _usage() -> str:
    lines = ["usage: python -m mfm_fast <command> [options]", "", "commands:"]
    lines += [f"  {name:<11} {help_}" for name, (_, _, help_) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module, func, _ = COMMANDS[name]
    result = getattr(importlib.import_module(module), func)(rest)
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
