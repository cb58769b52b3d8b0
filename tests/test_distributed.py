"""Data-parallel training on 2 CPU processes (gloo, localhost): the same loss trajectory and weights as one process
at the same global batch (so gradients are synchronised although the losses call the network inside
torch.func.jvp), rank-0 checkpoints, and a run killed mid-way that resumes from its last checkpoint."""
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mfm_fast import train as T
from mfm_fast.distributed import fsdp_available
from mfm_fast.data import paper_gmm
from mfm_fast.models import MFMMLP

WORLD = 2
KILL_AT = 5


def _cfg(**kw):
    base = dict(steps=8, batch=32, lr=3e-3, log_every=1, checkpoint_every=2, consistency="meanflow",
                consistency_fraction=0.25, ema_decay=0.9, seed=5)
    return T.TrainConfig(**{**base, **kw})


def _model():
    torch.manual_seed(7)
    return MFMMLP(2, 32, 2)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, port, out_dir, tag, kill_at, cfg_kw):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        if rank == 1:
            torch.manual_seed(1234)  # a different initialisation on rank 1: rank 0's weights must be broadcast
        model = _model() if rank == 0 else MFMMLP(2, 32, 2)

        def callback(step, logs):
            if step == kill_at:
                os._exit(3)  # a hard kill: no cleanup, no final checkpoint

        res = T.train(model, paper_gmm().sample, _cfg(**cfg_kw), out=os.path.join(out_dir, f"{tag}.pt"),
                      progress=False, callback=callback if kill_at else None)
        if cfg_kw.get("parallel") != "fsdp":  # FSDP2 holds shards; its full weights are in rank 0's checkpoint
            torch.save({"state": res.model.state_dict(), "history": res.history},
                       os.path.join(out_dir, f"{tag}_rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _spawn(out_dir, tag, kill_at=0, **cfg_kw):
    # fork: the children inherit the parent's imports (torch.func's first call imports torch._dynamo, ~5 s)
    mp.start_processes(_worker, args=(_free_port(), str(out_dir), tag, kill_at, cfg_kw), nprocs=WORLD, join=True,
                       start_method="fork")


def test_two_ranks_match_one_process_and_resume_after_kill(tmp_path):
    single = T.train(_model(), paper_gmm().sample, _cfg(), out=str(tmp_path / "single.pt"), progress=False)
    losses_1 = torch.tensor([h["loss"] for h in single.history])
    assert losses_1.shape == (8,)

    # a 2-rank run hard-killed after step 5 keeps rank 0's checkpoint of step 4 (at most one interval lost) ...
    with pytest.raises(mp.ProcessExitedException):
        _spawn(tmp_path, "ddp", kill_at=KILL_AT)
    ckpt = torch.load(tmp_path / "ddp.pt", weights_only=True)
    assert ckpt["step"] == 4 and ckpt["world_size"] == WORLD
    torch.testing.assert_close(torch.tensor([h["loss"] for h in ckpt["history"]]), losses_1[:4], rtol=1e-4,
                               atol=1e-5)
    # ... and the resumed run finishes the same trajectory as one process at the same global batch
    _spawn(tmp_path, "ddp")
    ranks = [torch.load(tmp_path / f"ddp_rank{r}.pt", weights_only=True) for r in range(WORLD)]
    assert [h["step"] for h in ranks[0]["history"]] == list(range(1, 9))
    torch.testing.assert_close(torch.tensor([h["loss"] for h in ranks[0]["history"]]), losses_1, rtol=1e-4,
                               atol=1e-5)
    # gradients were all-reduced: both ranks hold identical weights, equal to the single process's (up to the
    # all-reduce's summation order); without the sync each rank would follow its own half batch
    for k, v in single.model.state_dict().items():
        assert torch.equal(ranks[0]["state"][k], ranks[1]["state"][k]), k
        torch.testing.assert_close(ranks[0]["state"][k], v, rtol=1e-4, atol=1e-5)
    assert torch.load(tmp_path / "ddp.pt", weights_only=True)["step"] == 8


@pytest.mark.skipif(not fsdp_available(), reason="needs torch.distributed.fsdp.fully_shard")
def test_fsdp2_matches_one_process(tmp_path):
    single = T.train(_model(), paper_gmm().sample, _cfg(steps=4, checkpoint_every=0), progress=False)
    _spawn(tmp_path, "fsdp", steps=4, parallel="fsdp")
    ckpt = torch.load(tmp_path / "fsdp.pt", weights_only=True)
    torch.testing.assert_close(torch.tensor([h["loss"] for h in ckpt["history"]]),
                               torch.tensor([h["loss"] for h in single.history]), rtol=1e-4, atol=1e-5)
    for k, v in single.model.state_dict().items():
        torch.testing.assert_close(ckpt["model"][k], v, rtol=1e-4, atol=1e-5)
    for k, v in single.ema.state_dict().items():
        torch.testing.assert_close(ckpt["ema"][k], v, rtol=1e-4, atol=1e-5)


def test_uneven_split_is_refused():
    from mfm_fast.distributed import local_rows
    with pytest.raises(ValueError, match="split evenly"):
        local_rows((30, 3), 0, 2)
    assert local_rows((4, 2), 1, 2).tolist() == [2, 3, 5]
