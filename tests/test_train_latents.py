"""`train --data latents` end to end on the CPU from local files (a tiny VAE, a tiny MFM-T/2 release-format
checkpoint, safetensors latent shards): sample grids, bitwise resume, refused changes (settings, teacher, initial
weights), torchrun 2 ranks = 1 process, the other initialisations, and `sample` reading the result. Also the `train`
command's option checks (options that do not apply are errors) and its refusal to resume a distilled MFM against
another teacher."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mfm_fast import train as T
from mfm_fast.__main__ import main as cli_main
from mfm_fast.latents import write_shard
from mfm_fast.models.checkpoints import SIT_MODULES, load_official_mfm
from mfm_fast.models.dit import MFMDiT

ROOT = Path(__file__).resolve().parents[1]
GRIDS = sorted([f"samples_cfg2.5_steps{k}.png" for k in (1, 2, 4)]
               + [f"posterior_t{t}_steps{k}.png" for t in ("0", "0.2", "0.4") for k in (1, 4)])


@pytest.fixture(scope="module")
def latents(files):
    """Two latent shards of 4x8x8 latents with labels in [0, 10), as `encode` writes them."""
    root = files / "latents"
    if not root.exists():
        root.mkdir()
        g = torch.Generator().manual_seed(3)
        for k in range(2):
            write_shard(root / f"shard_{k:03d}.safetensors", torch.randn(6, 4, 8, 8, generator=g) * 0.8,
                        torch.randint(0, 10, (6,), generator=g))
    return root


def args_for(files, latents, out, *extra, steps="2", init=None):
    init = init or ["--init-from", "mfm", "--init-ckpt", str(files / "mfm-tiny.pt")]
    return ["train", "--data", "latents", "--latents", str(latents), *init, "--vae", str(files / "vae"),
            "--out", str(out), "--steps", steps, "--batch", "4", "--impl", "torch", "--device", "cpu",
            "--eval-every", "1", "--eval-samples", "2", "--eval-contexts", "1", "--quiet", *extra]


def state(path):
    ckpt = torch.load(path, weights_only=True)
    return ckpt["model"], ckpt["ema"], ckpt["optimizer"], ckpt["step"]


def assert_same(a, b):
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_train_grids_resume_refusals_and_sample(files, latents, tmp_path):
    out = tmp_path / "A" / "mfm.pt"
    assert cli_main(args_for(files, latents, out)) == 0
    ckpt = torch.load(out, weights_only=True)
    assert ckpt["step"] == 2 and ckpt["kind"] == "train"
    cfg = ckpt["train_config"]
    assert (cfg["consistency"], cfg["diagonal"], cfg["layout"], cfg["reduce"]) == ("esd", "distill", "paired", "sum")
    assert cfg["guidance_ws"] == (2.5,) and cfg["p_uncond"] == 0.2 and cfg["zero_context"] is False
    ident = ckpt["identity"]
    assert ident["init_from"] == "mfm" and ident["teacher"] == "init" and ident["teacher_omega"] == 0.0
    assert ident["init_fingerprint"].startswith("fp1:") and ident["latents_rows"] == 12
    assert all(k in ckpt["history"][-1] for k in ("loss", "diag", "cons", "grad_norm"))
    grids = tmp_path / "A" / "mfm_samples"
    assert sorted(p.name for p in grids.iterdir()) == ["step_0000001", "step_0000002"]  # --eval-every 1
    for step in ("step_0000001", "step_0000002"):
        assert sorted(p.name for p in (grids / step).iterdir()) == GRIDS
        assert all(p.stat().st_size > 100 for p in (grids / step).iterdir())

    # 1 step, then a rerun to 2, equals 2 steps in one go, bit for bit (model, EMA, optimizer)
    out_b = tmp_path / "B" / "mfm.pt"
    assert cli_main(args_for(files, latents, out_b, "--no-eval", steps="1")) == 0
    assert cli_main(args_for(files, latents, out_b, "--no-eval")) == 0
    a, b = state(out), state(out_b)
    assert a[3] == b[3] == 2
    assert_same(a[0], b[0])
    assert_same(a[1], b[1])
    for k, v in a[2]["state"].items():
        for name, tensor in v.items():
            assert torch.equal(torch.as_tensor(tensor), torch.as_tensor(b[2]["state"][k][name])), (k, name)

    # a resume with another setting, another teacher or other initial weights is refused, naming it
    with pytest.raises(ValueError, match="lr"):
        cli_main(args_for(files, latents, out_b, "--lr", "2e-4", "--no-eval", steps="3"))
    with pytest.raises(ValueError, match="teacher_omega"):
        cli_main(args_for(files, latents, out_b, "--teacher-omega", "0.6", "--no-eval", steps="3"))
    other = tmp_path / "other.pt"
    shutil.copy(files / "mfm-tiny.pt", other)
    os.utime(other, ns=(1, 1))  # the same bytes, another file: its fingerprint differs
    with pytest.raises(ValueError, match="init_fingerprint"):
        cli_main(args_for(files, latents, out_b, "--no-eval", steps="3",
                          init=["--init-from", "mfm", "--init-ckpt", str(other)]))
    assert torch.load(out_b, weights_only=True)["step"] == 2
    assert cli_main(args_for(files, latents, out_b, "--teacher-omega", "0.6", "--override", "--no-eval",
                             steps="3")) == 0
    assert torch.load(out_b, weights_only=True)["overrides"][0]["changes"]["teacher_omega"] == [0.0, 0.6]

    # `sample` and `steer` read the result through load_official_mfm: the EMA weights
    loaded = load_official_mfm(str(out), impl="torch")
    assert_same(a[1], loaded.state_dict())
    assert cli_main(["sample", "--ckpt", str(out), "--vae", str(files / "vae"), "--class", "3", "--steps", "2",
                     "--num-samples", "2", "--shard-size", "2", "--out", str(tmp_path / "S"), "--device", "cpu",
                     "--impl", "torch", "--no-progress"]) == 0
    import numpy as np
    with np.load(tmp_path / "S" / "samples.npz") as z:
        assert z["arr_0"].shape == (2, 32, 32, 3) and z["arr_0"].std() > 0


def test_torchrun_two_ranks_equal_one_process(files, latents, tmp_path):
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert cli_main(args_for(files, latents, tmp_path / "one.pt", "--no-eval", steps="2")) == 0
    finally:
        torch.set_num_threads(n)
    script = Path(sys.executable).with_name("torchrun")
    cmd = [str(script)] if script.is_file() else [sys.executable, "-m", "torch.distributed.run"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    args = args_for(files, latents, tmp_path / "two.pt", "--no-eval", steps="2")  # --batch 4: global
    res = subprocess.run([*cmd, "--standalone", "--nproc_per_node=2", "-m", "mfm_fast", *args], env=env,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    one, two = state(tmp_path / "one.pt"), state(tmp_path / "two.pt")
    assert torch.load(tmp_path / "two.pt", weights_only=True)["world_size"] == 2
    for k in one[0]:
        torch.testing.assert_close(two[0][k], one[0][k], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(two[1][k], one[1][k], rtol=1e-5, atol=1e-6)


def test_dmf_and_random_inits_and_learned_weighting(files, latents, tmp_path):
    """--init-from dmf: a flow-map checkpoint's modules copied with the time flip, s_embedder and t_embedder_second
    from its t_embedder, t_embedder.mlp[2] zeroed, x_cond_embedder from x_embedder (the release's init_from_dmf),
    and the teacher's DMF rearrangement ω = 0.6 recorded. --init-from none with --loss-weighting: the weighting
    network trains beside the model and stays out of the model file."""
    from mfm_fast.train_images import init_model
    torch.manual_seed(5)
    src = MFMDiT("MFM-T/2", impl="torch", learn_sigma=True)
    with torch.no_grad():
        for p in src.parameters():
            p.add_(0.05 * torch.randn_like(p))
    dmf = {"module." + k: v for k, v in src.state_dict().items() if k.split(".")[0] in SIT_MODULES}
    torch.save(dmf, tmp_path / "dmf.pt")
    model = init_model("dmf", tmp_path / "dmf.pt", "MFM-T/2", impl="torch")
    assert model.config.time_flip and not model.config.learn_sigma
    for name in ("s_embedder", "t_embedder_second"):
        for k, v in getattr(model, name).state_dict().items():
            assert torch.equal(v, src.t_embedder.state_dict()[k]), (name, k)
    assert not model.t_embedder.mlp[2].weight.any() and not model.t_embedder.mlp[2].bias.any()
    assert torch.equal(model.x_cond_embedder.proj.weight, src.x_embedder.proj.weight)
    assert torch.equal(model.blocks[1].mlp.fc1.weight, src.blocks[1].mlp.fc1.weight)
    out = tmp_path / "dmf_run.pt"
    assert cli_main(args_for(files, latents, out, "--model", "MFM-T/2", "--no-eval", steps="1",
                             init=["--init-from", "dmf", "--init-ckpt", str(tmp_path / "dmf.pt")])) == 0
    ident = torch.load(out, weights_only=True)["identity"]
    assert ident["init_from"] == "dmf" and ident["teacher_omega"] == 0.6

    out = tmp_path / "scratch.pt"
    assert cli_main(args_for(files, latents, out, "--model", "MFM-T/2", "--teacher", "none", "--loss-weighting",
                             "--no-eval", steps="1", init=["--init-from", "none"])) == 0
    ckpt = torch.load(out, weights_only=True)
    assert ckpt["train_config"]["diagonal"] == "data" and ckpt["train_config"]["consistency"] == "meanflow"
    assert any(k.startswith("weighting_model.") for k in ckpt["model"])
    assert isinstance(T.load(str(out)), MFMDiT)  # the weighting network is not part of the model file
    assert not any(k.startswith("weighting_model.") for k in load_official_mfm(str(out)).state_dict())


@pytest.mark.parametrize("argv,match", [
    (["--data", "gmm", "--config", "MFM-T/2"], "--config does not apply to --data gmm"),
    (["--data", "digits", "--hidden", "32"], "--hidden does not apply to --data digits"),
    (["--data", "gmm", "--teacher", "none", "--teacher-steps", "5"],
     "--teacher-steps does not apply to --teacher none"),
    (["--data", "digits", "--teacher", "none", "--rollout-bank", "8"],
     "--rollout-bank does not apply to --teacher none"),
    (["--data", "gmm", "--impl", "torch"], "--impl does not apply to --data gmm"),
    (["--data", "gmm", "--latents", "x"], "--latents does not apply to --data gmm"),
    (["--data", "digits", "--no-eval"], "--no-eval does not apply to --data digits"),
    (["--data", "gmm", "--p-uncond", "0.1"], "--p-uncond does not apply to --data gmm"),
    (["--data", "latents", "--teacher", "learned"], "--teacher learned does not apply to --data latents"),
    (["--data", "latents", "--teacher", "none", "--teacher-omega", "0.5"], "--teacher-omega does not apply"),
    (["--data", "gmm", "--layout", "paired", "--consistency-fraction", "0.5"], "--consistency-fraction"),
])
def test_options_that_do_not_apply_are_errors(tmp_path, argv, match):
    out = tmp_path / "x.pt"
    with pytest.raises(ValueError, match=match):
        T.main([*argv, "--out", str(out), "--quiet", "--device", "cpu"])
    assert not out.exists()


def test_resume_against_another_teacher_is_refused(tmp_path):
    base = ["--data", "gmm", "--batch", "32", "--hidden", "16", "--depth", "1", "--rollout-bank", "64", "--quiet",
            "--no-eval", "--device", "cpu"]
    out = str(tmp_path / "exact.pt")
    assert T.main([*base, "--out", out, "--teacher", "exact", "--steps", "2"]) == 0
    assert torch.load(out, weights_only=True)["identity"] == {"teacher": "exact"}
    with pytest.raises(ValueError, match="teacher 'exact' -> 'learned'"):
        T.main([*base, "--out", out, "--teacher", "learned", "--teacher-steps", "2", "--steps", "3"])
    assert not os.path.exists(T.teacher_path(out))  # refused before the teacher trained
    out = str(tmp_path / "learned.pt")
    assert T.main([*base, "--out", out, "--teacher-steps", "2", "--steps", "2"]) == 0
    with pytest.raises(ValueError, match="teacher_train"):
        T.main([*base, "--out", out, "--teacher-steps", "3", "--steps", "3"])
    assert T.main([*base, "--out", out, "--teacher-steps", "2", "--steps", "3"]) == 0  # the same teacher resumes
    assert torch.load(out, weights_only=True)["step"] == 3
