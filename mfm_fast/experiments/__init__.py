"""The paper's experiments, runnable on a CPU in minutes: `python -m mfm_fast experiment gmm|digits|finetune-gmm|posterior|estimators`.

Each writes a table (markdown + CSV, also printed) and a PNG into --out. The main job is `python -m mfm_fast demo`.
"""
from __future__ import annotations

import importlib
import sys

EXPERIMENTS = {
    "gmm": ("mfm_fast.experiments.gmm", "steering on the paper's 2-D GMM vs the exact tilted target"),
    "digits": ("mfm_fast.experiments.digits", "classifier-reward steering on 8x8 digits; Best-of-N vs MFM-G cost"),
    "finetune-gmm": ("mfm_fast.experiments.finetune_gmm", "MFM-FT on the GMM: distance to the tilt vs step"),
    "finetune-digits": ("mfm_fast.experiments.finetune_digits", "MFM-FT, class-conditional digits DiT vs the exact tilt"),
    "estimators": ("mfm_fast.experiments.estimators", "what MFM-G / MFM-GF estimate at finite N vs the exact ∇V"),
    "posterior": ("mfm_fast.experiments.posterior", "GMM one-step posterior accuracy vs the noise floor, per recipe"),
}


def _usage() -> str:
    lines = ["usage: python -m mfm_fast experiment <name> [options]", "", "experiments:"]
    lines += [f"  {name:<13} {help_}" for name, (_, help_) in EXPERIMENTS.items()]
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    if argv[0] not in EXPERIMENTS:
        print(f"unknown experiment {argv[0]!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    return int(importlib.import_module(EXPERIMENTS[argv[0]][0]).main(argv[1:]) or 0)
