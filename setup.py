"""mfm_fast: Triton-accelerated Meta Flow Maps for PyTorch (pure Python; Triton JIT-compiles at run time)."""
from setuptools import find_packages, setup

setup(
    name="mfm_fast",
    version="0.1.0",
    description="Meta Flow Maps: one-step posterior sampling, value gradients, reward steering and fine-tuning",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["mfm_fast", "mfm_fast.*", "csrc_triton", "csrc_triton.*"]),
    install_requires=[
        # torch is not pinned to a build: the README commands install the CPU wheel on CPU-only machines
        "torch>=2.4",
        "triton>=3.0; platform_system=='Linux'",
        "numpy",
        "einops>=0.7",
        "safetensors>=0.4",
        "tqdm",
        "matplotlib",
    ],
    extras_require={
        "dev": ["pytest>=7", "hypothesis", "pytest-benchmark", "scikit-learn", "scipy", "diffusers>=0.25"],
        "bench": ["pytest-benchmark", "nvidia-ml-py"],
        "latent": ["diffusers>=0.25"],
        # the release's reward libraries on a current stack; torchvision must match the installed torch
        # (scripts/install.sh pins torch while installing, so this extra never swaps the torch build)
        "rewards": ["transformers>=5", "open_clip_torch>=3", "imscore>=0.0.11", "torchvision", "diffusers>=0.25"],
        "flash": ["flash-attn>=2.5"],
        "xformers": ["xformers"],
    },
    entry_points={"console_scripts": ["mfm-fast=mfm_fast.__main__:main"]},
)
