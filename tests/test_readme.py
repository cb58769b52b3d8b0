"""Every ```python block of README.md runs here (issue #24, item 5), in a temporary working directory that holds
tiny stand-ins for the files it names. A block is recognised by a text of its own (`marker` below); a block that
matches none fails `test_every_python_block_is_run_or_listed`, so a new example cannot go untested unnoticed.

How each block is made runnable (the block's text runs unchanged except for the listed substitutions, each of which
must match, so an edit of the README that they no longer fit fails here instead of running something else):
- "quickstart" (Using the library): `make demo` writes the demo's model to outputs/gmm_mfm.pt with
  scripts/export_demo_model.py. Here the demo's model (`experiments.common.gmm_mfm`, minutes of training) is a
  small preconditioned MFMMLP with its network term zeroed: the exact meta flow map of N(0, I) data. (An untrained
  network, or the flow map of data as broad as N(0, 2.5²I), makes the block's MFM-G run at K = 100 diverge on
  the paper's sharp reward, which `steer` now reports; the trained demo model steers stably there.) The same
  script exports it into the temporary directory; the block then runs as is.
- "run_sharded" (Many GPUs): `mfm-xl2.pt` is a random MFM-T/2 with 1000 classes in the release's key format,
  `sd-vae-ft-mse/` a tiny diffusers VAE (4x8x8 latents -> 32x32 images), and the reward names (hpsv2, clip, ...)
  build the registry's toy CLIP-shaped reward at HPSv2's scale (`REWARD_MODELS` patched: the real adapters need
  multi-GB weights);
  the stand-in factory still checks the block's keyword arguments against the real factory's signature.
  Substitutions: the CUDA device -> "cpu", 250 steps -> 2, 1024 samples in shards of 16 -> 4 in shards of 2.
- "finetune" (MFM-FT): the same files, `latents/` two tiny latent shards; "cuda" -> "cpu", 10000 steps -> 2.
- "score_images" (Reward models): the block decodes a `latents` it does not define: bound to a (2, 4, 8, 8) batch;
  "cuda" -> "cpu".
A block that does not run goes to NOT_RUN with the reason (one there: the image-training example of
train_images.py).
"""
import dataclasses
import importlib.util
import inspect
import pathlib
import re

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


@dataclasses.dataclass
class Block:
    marker: str  # text of the block that identifies it
    setup: str  # name of the stand-in builder below
    substitutions: tuple = ()  # (old, new) text replacements, each must occur
    names: tuple = ()  # names bound before the block runs (stand-ins for what the block assumes exists)


BLOCKS = {
    "quickstart": Block('model = mfm_fast.load("outputs/gmm_mfm.pt")', "demo_model"),
    "run_sharded": Block("run_sharded(make_shard, 1024, \"steer_hpsv2\", seed=0, shard_size=16, device=device)",
                         "release_files",
                         (('f"cuda:{info.local_rank}"', '"cpu"'), ("steps=250", "steps=2"),
                          ("run_sharded(make_shard, 1024,", "run_sharded(make_shard, 4,"),
                          ("shard_size=16", "shard_size=2"))),
    "finetune": Block("from mfm_fast.finetune import FinetuneConfig, finetune", "release_files",
                      (('"cuda"', '"cpu"'), ("steps=10000", "steps=2"))),
    "score_images": Block("from mfm_fast.reward_models import build_scorers, score_images", "release_files",
                          (('"cuda"', '"cpu"'),), ("latents",)),
}
NOT_RUN = {  # marker -> why the block does not run here
    'model = init_model("dmf", "ckpts/dmf_xl_2_256.pt")':
        "image training from a DMF checkpoint (mfm_fast/train_images.py, added while this test was written and "
        "still changing): runnable with a tiny DMF stand-in plus config=\"MFM-T/2\", `.cuda()` -> `` and a "
        "2-step image_defaults — left to that module's owner; its toy-size path runs in "
        "tests/test_release_train_loss.py",
}


def python_blocks(text: str) -> list:
    """[(first line number, source)] of the ```python blocks."""
    return [(text[:m.start()].count("\n") + 2, m.group(1))
            for m in re.finditer(r"^```python\n(.*?)^```", text, flags=re.M | re.S)]


def identify(source: str) -> list:
    """The keys of BLOCKS (and markers of NOT_RUN) whose marker text the block contains."""
    return [k for k, b in BLOCKS.items() if b.marker in source] + [m for m in NOT_RUN if m in source]


def test_every_python_block_is_run_or_listed():
    blocks = python_blocks(README.read_text())
    assert len(blocks) >= 4
    seen = []
    for line, source in blocks:
        found = identify(source)
        assert len(found) == 1, (f"README.md:{line}: a ```python block that tests/test_readme.py does not know "
                                 f"(matches {found}): add it to BLOCKS (with how it is made runnable) or to NOT_RUN "
                                 f"(with the reason)")
        seen += found
    assert len(seen) == len(set(seen)), seen
    assert sorted(seen) == sorted(list(BLOCKS) + list(NOT_RUN)), "a listed block is gone from the README"


# ---------------------------------------------------------------------------------------------- stand-ins
def demo_model(tmp, monkeypatch):
    """outputs/gmm_mfm.pt as `make demo` writes it: scripts/export_demo_model.py with the demo's model."""
    from mfm_fast.experiments import common
    from mfm_fast.models import MFMMLP
    stand_in = MFMMLP(2, 16, 2, sigma_data=1.0).eval()
    with torch.no_grad():  # network term off: the exact meta flow map of N(0, I), a well-behaved "trained" model
        stand_in.out.weight.zero_()
        stand_in.out.bias.zero_()
    monkeypatch.setattr(common, "gmm_mfm", lambda device, quick=False, progress=True: (stand_in, "stand-in"))
    spec = importlib.util.spec_from_file_location("export_demo_model", ROOT / "scripts" / "export_demo_model.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.main([]) == 0
    assert (tmp / "outputs" / "gmm_mfm.pt").is_file()
    return {}


def _toy_factory(real):
    """A factory with `real`'s signature that builds the toy CLIP-shaped reward, its scores scaled from ±10 to
    HPSv2's range (~0.3): MFM-FT's λ = 50 would overflow exp(λ·r) on the toy's own scale."""
    from mfm_fast.reward_models import ToyClipReward

    class Toy(ToyClipReward):
        def score(self, images, prompts):
            return 0.03 * super().score(images, prompts)

    params = inspect.signature(real).parameters

    def factory(**kwargs):
        inspect.signature(real).bind(**kwargs)  # the block's keywords must be the real adapter's
        return Toy().to(kwargs.get("device", "cpu") if "device" in params else "cpu")

    return factory


def release_files(tmp, monkeypatch):
    """mfm-xl2.pt, the SD-VAE folders, latents/ and the reward names, all tiny."""
    from diffusers import AutoencoderKL

    from mfm_fast import reward_models
    from mfm_fast.latents import write_shard
    from mfm_fast.models.dit import MFMDiT, make_config
    torch.manual_seed(0)
    config = dataclasses.replace(make_config("MFM-T/2"), num_classes=1000)  # the README uses class 281
    model = MFMDiT(config, impl="torch")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    torch.save({"model": {"model.model.dit." + k: v for k, v in model.state_dict().items()},
                "config": dataclasses.asdict(config)}, tmp / "mfm-xl2.pt")
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 3,
                        up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(8, 8, 8), layers_per_block=1,
                        latent_channels=4, norm_num_groups=4, sample_size=32)
    for folder in ("sd-vae-ft-mse", "weights/sd-vae-ft-mse"):
        vae.save_pretrained(tmp / folder)
    (tmp / "latents").mkdir()
    for k in range(2):
        write_shard(tmp / "latents" / f"shard_{k:03d}.safetensors", torch.randn(6, 4, 8, 8, generator=g) * 0.8,
                    torch.randint(0, 1000, (6,), generator=g))
    for name in ("hpsv2", "imagereward", "pickscore", "clip", "aesthetic"):
        monkeypatch.setitem(reward_models.REWARD_MODELS, name, _toy_factory(reward_models.REWARD_MODELS[name]))
    return {"latents": torch.randn(2, 4, 8, 8, generator=g)}


# ---------------------------------------------------------------------------------------------- the runs
@pytest.mark.parametrize("key", list(BLOCKS))
def test_readme_python_block_runs(key, tmp_path, monkeypatch):
    block = BLOCKS[key]
    matches = [(line, src) for line, src in python_blocks(README.read_text()) if identify(src) == [key]]
    assert len(matches) == 1, f"README block {key!r} not found"
    line, source = matches[0]
    for old, new in block.substitutions:
        assert old in source, f"README.md:{line} ({key}): the substitution of {old!r} no longer matches the block"
        source = source.replace(old, new)
    monkeypatch.chdir(tmp_path)
    bound = globals()[block.setup](tmp_path, monkeypatch)
    namespace = {"__name__": f"readme_{key}"}
    namespace.update({name: bound[name] for name in block.names})
    exec(compile(source, f"README.md:{line}", "exec"), namespace)  # noqa: S102 — the README's own example


def test_make_demo_writes_the_model_the_readme_loads():
    """The first example loads outputs/gmm_mfm.pt: `make demo` must write exactly that file after the demo."""
    makefile = (ROOT / "Makefile").read_text()
    recipe = re.search(r"^demo:.*\n((?:\t.*\n)+)", makefile, flags=re.M).group(1)
    lines = [line.strip() for line in recipe.splitlines()]
    assert lines[0].endswith("-m mfm_fast demo"), lines
    assert any(line.endswith("scripts/export_demo_model.py outputs/gmm_mfm.pt") for line in lines[1:]), lines
