"""Nothing mixed, nothing stale, nothing silent (issue #24): resumed runs refuse other input files behind the same
paths (content fingerprints in run.json), `encode` refuses a folder holding another run's shards and writes a
manifest that `list_shards` checks, image folders skip hidden and refuse empty classes, damaged files are named,
--out hazards are refused, reward specs are parsed strictly, and the jackknife names its particle count."""
import json
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from mfm_fast.__main__ import main as cli_main
from mfm_fast.fingerprint import fingerprint
from mfm_fast.latents import LatentShards, image_folder, list_shards, read_shard, write_manifest, write_shard
from mfm_fast.parallel_sample import FAULT_ENV, ShardOutput, run_sharded
from mfm_fast.reward_models import build_scorers, class_names, parse_reward_spec
from mfm_fast.value import jackknife_value


def _fake_shard(gens, start, stop):
    r = torch.stack([torch.rand((), generator=g) for g in gens])
    images = torch.arange(start, stop, dtype=torch.float32)[:, None, None, None].expand(-1, 3, 4, 4) / 255
    return ShardOutput(images, {"steer": r}, {"forward_evals": stop - start})


def _rewrite_same_size(path, offset=0):
    """Change one byte of `path` in place, keeping its size (and then its mtime: only the bytes differ)."""
    st = path.stat()
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


# ---------------------------------------------------------------------------------------------- 1. fingerprints
def test_fingerprint_of_files_and_directories(tmp_path):
    f = tmp_path / "w.bin"
    f.write_bytes(os.urandom(3 << 20))  # > 2 MiB: the sampled form
    fp = fingerprint(f)
    assert fp.startswith("fp1:") and fingerprint(f) == fp
    _rewrite_same_size(f, offset=5)  # first MiB
    assert fingerprint(f) != fp
    fp = fingerprint(f)
    _rewrite_same_size(f, offset=(3 << 20) - 7)  # last MiB
    assert fingerprint(f) != fp
    fp = fingerprint(f)
    os.utime(f, ns=(0, 10 ** 18))  # a touch (or a copy) counts too
    assert fingerprint(f) != fp
    small = tmp_path / "s.txt"
    small.write_text("abc")
    fp = fingerprint(small)
    _rewrite_same_size(small, offset=2)
    assert fingerprint(small) != fp

    d = tmp_path / "vae"
    (d / "sub").mkdir(parents=True)
    (d / "config.json").write_text("{}")
    (d / "sub" / "model.safetensors").write_bytes(b"x" * 100)
    fp = fingerprint(d)
    assert fingerprint(d) == fp and fp != fingerprint(d / "config.json")
    (d / "extra.bin").write_bytes(b"")
    assert fingerprint(d) != fp
    fp = fingerprint(d)
    _rewrite_same_size(d / "sub" / "model.safetensors", offset=50)
    assert fingerprint(d) != fp
    with pytest.raises(FileNotFoundError, match="absent"):
        fingerprint(tmp_path / "absent")


def test_resume_with_another_file_behind_the_same_path_is_refused(tmp_path, monkeypatch):
    ckpt = tmp_path / "model.pt"
    ckpt.write_bytes(b"weights-v1")
    out = tmp_path / "run"
    kw = dict(seed=3, shard_size=2, progress=False, settings={"ckpt": str(ckpt)})
    monkeypatch.setenv(FAULT_ENV, "0:raise:1")
    with pytest.raises(RuntimeError, match="fails after writing 1 shard"):
        run_sharded(_fake_shard, 4, out, inputs={"--ckpt": ckpt}, **kw)
    monkeypatch.delenv(FAULT_ENV)
    record = json.loads((out / "run.json").read_text())
    assert record["inputs"]["--ckpt"] == {"path": str(ckpt), "fingerprint": fingerprint(ckpt)}
    ckpt.write_bytes(b"weights-v2")  # another model, same path and size
    with pytest.raises(ValueError, match=r"--ckpt .*model\.pt has changed"):
        run_sharded(_fake_shard, 4, out, inputs={"--ckpt": ckpt}, **kw)
    assert not (out / "samples.npz").exists()
    ckpt.write_bytes(b"weights-v1")
    os.utime(ckpt, ns=(0, 0))
    with pytest.raises(ValueError, match="--ckpt"):  # the same bytes, but another mtime (a copy): refused too
        run_sharded(_fake_shard, 4, out, inputs={"--ckpt": ckpt}, **kw)
    # a run.json of an older version records no fingerprints: what exists (the settings) is compared, the run
    # resumes and run.json is left as it was
    record.pop("inputs")
    (out / "run.json").write_text(json.dumps(record))
    run_sharded(_fake_shard, 4, out, inputs={"--ckpt": ckpt}, **kw)
    assert (out / "samples.npz").is_file() and "inputs" not in json.loads((out / "run.json").read_text())


def test_cli_records_every_input_file_and_refuses_a_changed_checkpoint(files, tmp_path, monkeypatch):
    from mfm_fast.cli import _inputs, steer_parser
    weights = tmp_path / "hps"
    weights.mkdir()
    names = tmp_path / "names.txt"
    names.write_text("a\nb\n")
    args = steer_parser().parse_args(["--ckpt", "c.pt", "--vae", "v", "--reward", f"hpsv2,weights={weights}",
                                      "--score-with", f"clip,weights={weights},processor={names}",
                                      "--score-with", "toy,dim=8", "--class-names", str(names)])
    assert _inputs(args) == {"--ckpt": "c.pt", "--vae": "v", "--class-names": str(names),
                             "--reward weights": str(weights), "--score-with clip weights": str(weights),
                             "--score-with clip processor": str(names)}

    ckpt = tmp_path / "mfm.pt"
    shutil.copy(files / "mfm-tiny.pt", ckpt)
    out = tmp_path / "run"
    argv = ["sample", "--ckpt", str(ckpt), "--vae", str(files / "vae"), "--class", "1", "--num-samples", "4",
            "--shard-size", "2", "--steps", "1", "--impl", "torch", "--device", "cpu", "--no-progress",
            "--out", str(out)]
    monkeypatch.setenv(FAULT_ENV, "0:raise:1")
    with pytest.raises(RuntimeError, match="fails after writing 1 shard"):
        cli_main(argv)
    monkeypatch.delenv(FAULT_ENV)
    assert set(json.loads((out / "run.json").read_text())["inputs"]) == {"--ckpt", "--vae"}
    sd = torch.load(ckpt, weights_only=False)
    for v in sd["model"].values():
        if v.is_floating_point():
            v.mul_(1.5)
    torch.save(sd, ckpt)  # retrained in place: same path, other weights
    with pytest.raises(ValueError, match=rf"--ckpt {ckpt} has changed"):
        cli_main(argv)
    assert not (out / "samples.npz").exists()


# ---------------------------------------------------------------------------------------------- 2, 3. encode
def _image_folder(root, counts, seed=0):
    rng = np.random.default_rng(seed)
    for name, n in counts.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(root / name / f"{i}.png")
    return root


def _encode(images, vae, out):
    return cli_main(["encode", "--images", str(images), "--vae", str(vae), "--out", str(out), "--batch", "4",
                     "--size", "32", "--shard-size", "2", "--mean", "--device", "cpu"])


def test_encode_writes_a_manifest_and_refuses_a_folder_with_another_runs_shards(files, tmp_path):
    out = tmp_path / "latents"
    big = _image_folder(tmp_path / "big", {"a": 3, "b": 2})
    assert _encode(big, files / "vae", out) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert [e["name"] for e in manifest["shards"]] == [f"shard-{k:05d}.safetensors" for k in range(3)]
    assert [e["count"] for e in manifest["shards"]] == [2, 2, 1] and manifest["samples"] == 5
    assert manifest["classes"] == ["a", "b"]
    assert len(LatentShards(out)) == 5
    # a smaller folder into the same --out would leave shard 2 of the first run beside its own two: refused
    small = _image_folder(tmp_path / "small", {"c": 3}, seed=1)
    with pytest.raises(ValueError, match=r"--out .*latents already holds .*manifest\.json and 3 more"):
        _encode(small, files / "vae", out)
    assert json.loads((out / "manifest.json").read_text()) == manifest  # untouched
    # shards without a manifest (an interrupted encode, or written by hand) are refused as well
    (out / "manifest.json").unlink()
    with pytest.raises(ValueError, match=r"already holds .*shard-00000\.safetensors"):
        _encode(small, files / "vae", out)
    # an empty or unrelated folder is fine
    (tmp_path / "fresh").mkdir()
    (tmp_path / "fresh" / "README").write_text("notes")
    assert _encode(small, files / "vae", tmp_path / "fresh") == 0
    assert len(LatentShards(tmp_path / "fresh")) == 3


def test_list_shards_checks_the_manifest_when_there_is_one(tmp_path):
    for k in range(2):
        write_shard(tmp_path / f"s{k}.safetensors", torch.randn(3, 4, 2, 2), torch.arange(3))
    write_shard(tmp_path / "t_latents.npy", torch.randn(2, 4, 2, 2), torch.arange(2))
    assert len(list_shards(tmp_path)) == 3  # no manifest: read as it is
    write_manifest(tmp_path, classes=["x", "y", "z"])
    assert [p.name for p in list_shards(tmp_path)] == ["s0.safetensors", "s1.safetensors", "t_latents.npy"]
    assert len(LatentShards(tmp_path, shuffle=False)) == 8
    write_shard(tmp_path / "s2.safetensors", torch.randn(1, 4, 2, 2), torch.arange(1))  # a stale extra shard
    with pytest.raises(ValueError, match=r"s2\.safetensors is not listed in .*manifest\.json"):
        LatentShards(tmp_path)
    (tmp_path / "s2.safetensors").unlink()
    (tmp_path / "s1.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"s1\.safetensors is listed in .*manifest\.json but missing"):
        list_shards(tmp_path)
    write_shard(tmp_path / "s1.safetensors", torch.randn(4, 4, 2, 2), torch.arange(4))  # replaced: other size
    with pytest.raises(ValueError, match=r"s1\.safetensors has \d+ bytes"):
        list_shards(tmp_path)
    write_manifest(tmp_path)
    (tmp_path / "t_labels.npy").write_bytes((tmp_path / "t_labels.npy").read_bytes()[:-4])
    with pytest.raises(ValueError, match=r"t_labels\.npy has \d+ bytes"):
        list_shards(tmp_path)
    (tmp_path / "manifest.json").write_text('{"format": "mfm_fast-latent-manifest", "shards": [')
    with pytest.raises(ValueError, match=r"manifest .*manifest\.json is damaged"):
        list_shards(tmp_path)


def test_image_folder_skips_hidden_folders_and_refuses_empty_classes(tmp_path):
    root = _image_folder(tmp_path / "img", {"cat": 2, "dog": 1, ".ipynb_checkpoints": 1})
    (root / "cat" / ".thumbs").mkdir()
    Image.new("RGB", (4, 4)).save(root / "cat" / ".thumbs" / "0.png")
    Image.new("RGB", (4, 4)).save(root / "dog" / "._0.png")
    items, classes = image_folder(root)
    assert classes == ["cat", "dog"]
    assert [(p.relative_to(root).as_posix(), y) for p, y in items] == [("cat/0.png", 0), ("cat/1.png", 0),
                                                                        ("dog/0.png", 1)]
    (root / "emu").mkdir()
    (root / "emu" / "notes.txt").write_text("no images")
    with pytest.raises(FileNotFoundError, match=r"class folder .*emu holds no images"):
        image_folder(root)


# ---------------------------------------------------------------------------------------------- 4. damaged files
@pytest.mark.parametrize("fmt", ["safetensors", "npy"])
def test_a_truncated_shard_is_named(tmp_path, fmt):
    path = tmp_path / ("s.safetensors" if fmt == "safetensors" else "s_latents.npy")
    write_shard(path, torch.randn(3, 4, 4, 4), torch.arange(3))
    path.write_bytes(path.read_bytes()[:150])
    with pytest.raises(ValueError, match=rf"latent shard .*{path.name} is damaged"):
        read_shard(path)
    with pytest.raises(ValueError, match=rf"latent shard .*{path.name} is damaged"):
        len(LatentShards(tmp_path))
    with pytest.raises(ValueError, match=rf"latent shard .*{path.name} is damaged"):
        list(LatentShards(tmp_path))


def test_a_damaged_run_json_or_shard_is_named(tmp_path, monkeypatch):
    out = tmp_path / "run"
    monkeypatch.setenv(FAULT_ENV, "0:raise:1")
    with pytest.raises(RuntimeError):
        run_sharded(_fake_shard, 4, out, seed=3, shard_size=2, progress=False)
    monkeypatch.delenv(FAULT_ENV)
    good = (out / "run.json").read_text()
    (out / "run.json").write_text(good[: len(good) // 2])
    with pytest.raises(ValueError, match=r"run\.json is damaged \(JSONDecodeError"):
        run_sharded(_fake_shard, 4, out, seed=3, shard_size=2, progress=False)
    (out / "run.json").write_text(good)
    shard = out / "shards" / "shard-000000.npz"
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(ValueError, match=r"shard .*shard-000000\.npz is damaged"):
        run_sharded(_fake_shard, 4, out, seed=3, shard_size=2, progress=False)


# ---------------------------------------------------------------------------------------------- 5. --out hazards
def test_empty_out_and_a_foreign_samples_npz_are_refused(files, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # where an empty --out would have written
    with pytest.raises(ValueError, match="--out must name an output directory, got ''"):
        cli_main(["sample", "--ckpt", "c.pt", "--vae", "v", "--out", ""])
    with pytest.raises(ValueError, match=r"out \(--out\) must name an output directory"):
        run_sharded(_fake_shard, 2, "", seed=0, progress=False)
    assert not any(tmp_path.iterdir())
    foreign = tmp_path / "evals"
    foreign.mkdir()
    np.savez(foreign / "samples.npz", arr_0=np.zeros((1, 2, 2, 3), np.uint8))
    before = (foreign / "samples.npz").read_bytes()
    with pytest.raises(ValueError, match=r"holds .*samples\.npz but no run\.json"):
        run_sharded(_fake_shard, 2, foreign, seed=0, progress=False)
    assert (foreign / "samples.npz").read_bytes() == before


def test_an_argument_rejected_by_the_first_shard_does_not_bind_the_rerun(files, tmp_path):
    def bad(gens, start, stop):
        raise ValueError("t_start must lie in [0, 1)")

    out = tmp_path / "run"
    with pytest.raises(ValueError, match="t_start"):
        run_sharded(bad, 4, out, seed=0, shard_size=2, progress=False, settings={"t_start": 1.5})
    run_sharded(_fake_shard, 4, out, seed=0, shard_size=2, progress=False, settings={"t_start": 0.01})
    assert json.loads((out / "run.json").read_text())["settings"]["t_start"] == 0.01
    # and once a shard exists, other settings are refused as before
    with pytest.raises(ValueError, match="settings differ: t_start: 0.01 -> 0.5"):
        run_sharded(_fake_shard, 4, out, seed=0, shard_size=2, progress=False, settings={"t_start": 0.5})

    # the same through the command line: steer rejects --t-start 1.5 inside the first shard
    argv = ["steer", "--ckpt", str(files / "mfm-tiny.pt"), "--vae", str(files / "vae"), "--class", "2",
            "--reward", "toy,dim=8", "--method", "mfm-g", "--particles", "2", "--steps", "1", "--num-samples", "2",
            "--shard-size", "2", "--impl", "torch", "--device", "cpu", "--no-progress", "--out", str(tmp_path / "s")]
    with pytest.raises(ValueError, match="t_start"):
        cli_main([*argv, "--t-start", "1.5"])
    assert cli_main(argv) == 0
    assert (tmp_path / "s" / "samples.npz").is_file()


# ---------------------------------------------------------------------------------------------- 6. reward specs
def test_reward_specs_are_parsed_strictly(tmp_path):
    assert parse_reward_spec("toy,dim=8,scale=0.5,flag=True,off=false,weights=w/") == (
        "toy", {"dim": 8, "scale": 0.5, "flag": True, "off": False, "weights": "w/"})
    name, kwargs = parse_reward_spec("toy,dim=8")
    assert type(kwargs["dim"]) is int
    with pytest.raises(ValueError, match="sets 'weights' twice"):
        parse_reward_spec("hpsv2,weights=a,weights=b")
    scorers = build_scorers("toy,dim=8")  # one spec, not the characters of one
    assert list(scorers) == ["toy"]
    assert scorers["toy"](torch.rand(2, 3, 32, 32), "a cat").shape == (2,)
    with pytest.raises(ValueError, match="scorer 'toy' is given twice"):
        build_scorers(["toy,dim=8", "toy,dim=16"])
    empty = tmp_path / "names.txt"
    empty.write_text("\n  \n")
    with pytest.raises(ValueError, match=r"names\.txt holds no class names"):
        class_names(empty)
    (tmp_path / "names.json").write_text("[]")
    with pytest.raises(ValueError, match=r"names\.json holds no class names"):
        class_names(tmp_path / "names.json")


# ---------------------------------------------------------------------------------------------- 7. jackknife
def test_jackknife_value_names_its_particle_count():
    with pytest.raises(ValueError, match="n_particles >= 2.*n_particles=1"):
        jackknife_value(torch.zeros(3, 1))
    assert jackknife_value(torch.zeros(3, 2)).shape == (3,)


def test_a_truncated_image_is_named(tmp_path):
    from PIL import Image

    from mfm_fast.latents import _load_batch
    good = tmp_path / "good.png"
    Image.new("RGB", (12, 12), (10, 200, 30)).save(good)
    bad = tmp_path / "bad.png"
    bad.write_bytes(good.read_bytes()[:40])
    assert _load_batch([good], 8).shape == (1, 3, 8, 8)
    with pytest.raises(ValueError, match="bad.png is damaged"):
        _load_batch([good, bad], 8)
