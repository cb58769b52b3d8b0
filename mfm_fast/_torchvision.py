"""`import torchvision` beside a CPU-only torch: open_clip, imscore, timm, and through them transformers and diffusers
import it, and PyPI's x86_64 wheel otherwise fails to import there (`ensure_torchvision`)."""
from __future__ import annotations

import importlib
import importlib.util
import sys

import torch

_TORCHVISION_SCHEMAS = None  # keeps the schema declarations below alive


def ensure_torchvision() -> None:
    """Make `import torchvision` succeed beside a CPU-only torch; call it before importing those libraries.

    PyPI's torchvision wheels for x86_64 link their C++ ops against the CUDA build of torch. Beside the CPU build
    that library does not load, which torchvision tolerates, except for two fake-kernel registrations (nms, qnms)
    that then fail with "operator torchvision::nms does not exist". Declaring those two schemas lets the import
    finish. The reward libraries use only torchvision's Python transforms, which then work unchanged; its C++ ops
    (nms, roi_align, ...) still raise torchvision's own "Couldn't load custom C++ ops" error if called.
    Does nothing when torchvision is absent, already imported, or imports by itself."""
    global _TORCHVISION_SCHEMAS
    if "torchvision" in sys.modules or importlib.util.find_spec("torchvision") is None:
        return
    try:
        importlib.import_module("torchvision")
        return
    except RuntimeError as err:
        if "torchvision::nms" not in str(err):
            raise
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]  # the failed import left its submodules behind
    lib = torch.library.Library("torchvision", "FRAGMENT")
    for op in ("nms", "qnms"):
        lib.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _TORCHVISION_SCHEMAS = lib
    importlib.import_module("torchvision")
