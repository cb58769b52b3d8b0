"""Model zoo: MFMDiT (image latents) and MFMMLP (vector data); both follow the model protocol (DESIGN §2)."""
from .dit import CONFIGS, DiTConfig, MFMDiT, make_config
from .mlp import MFMMLP

__all__ = ["CONFIGS", "DiTConfig", "MFMDiT", "MFMMLP", "make_config"]
