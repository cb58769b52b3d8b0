"""The image training objective against the release's, item by item, on identical weights and draws.

Each helper below restates one formula of the release (`src/mfm/losses/losses.py`, `src/mfm/losses/utils.py`,
`src/mfm/models/base_model.py`, `src/mfm/utils/training.py`, `conf/config_train.yaml`) in plain torch; the tests
feed it the draws mfm_fast's trainer made for a step and compare the loss value and every parameter gradient of a
tiny MFM-DiT (MFM-T/2, reference ops, perturbed weights so that no output is zero)."""
import copy
import math

import pytest
import torch

from mfm_fast.losses import LossWeighting, draw
from mfm_fast.models.dit import MFMDiT
from mfm_fast.train import TrainConfig, _Trainer
from mfm_fast.train_images import guided_drift, image_defaults

B = 8
EVENT = (4, 8, 8)


def perturbed(seed: int) -> MFMDiT:
    torch.manual_seed(seed)
    model = MFMDiT("MFM-T/2", impl="torch")
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    return model


def bc(v):
    return v.view(-1, 1, 1, 1)


# ---------------------------------------------------------------------------------------------- the release, restated
def release_adaptive(pred, target, p, c, weighting=None):
    """utils.adaptive_loss: per-sample SUM of squares, w = 1/(sum + c)^p detached, mean of w·sum (/exp(u) + u).

    With the learned weighting the release writes `delta_sq / weighting.exp() + weighting` with delta_sq (B,) and
    weighting (B, 1, 1, 1), which broadcasts to a (B, 1, 1, B) outer product (every sample's u applied to every
    sample's residual); mfm_fast applies each sample's own u, the evident intent, restated here per sample."""
    sq = (pred - target.detach()).pow(2).sum(dim=(1, 2, 3))
    loss = sq * (1.0 / (sq + c) ** p).detach()
    if weighting is not None:
        u = weighting.reshape(-1)
        loss = loss / u.exp() + u
    return loss.mean()


def release_weighting(net: LossWeighting, t, t_cond, clamp=10.0):
    """base_model.LossWeightingNetwork.forward with net's parameters: MPFourier, MPConv (normalize: per output row
    eps + ‖w‖·sqrt(1/fan_in), then gain/sqrt(fan_in)), clamp to [clamp_min, clamp_max] = [-10, 10]."""
    def fourier(x):
        return (x.to(torch.float32).ger(net.freqs) + net.phases).cos() * math.sqrt(2)

    def mpconv(x, w):
        w = w.to(torch.float32)
        norm = torch.linalg.vector_norm(w, dim=[1], keepdim=True, dtype=torch.float32)
        norm = 1e-4 + norm * math.sqrt(norm.numel() / w.numel())
        w = (w / norm) * (1 / math.sqrt(w[0].numel()))
        return x @ w.t()
    combined = (mpconv(fourier(t), net.w_s) + mpconv(fourier(t_cond), net.w_t)) / math.sqrt(2.0)
    return torch.clamp(mpconv(combined, net.w_out).reshape(-1, 1, 1, 1), -clamp, clamp)


def release_guidance_pair(model, s, x, t_cond, x_cond, labels, cfg_scales, null):
    """losses.model_guidance_target: one batched call, [null labels at cfg 1; labels at cfg_scales]."""
    two = lambda a: torch.cat([a, a])  # noqa: E731
    v = model(two(s), two(s), two(x), two(t_cond), two(x_cond),
              y=torch.cat([torch.full_like(labels, null), labels]),
              cfg=torch.cat([torch.ones_like(cfg_scales), cfg_scales]))
    return v.chunk(2)


@torch.no_grad()
def release_posterior_velocity(s, Is, xt_cond, t_cond, labels, cfg_scales, teacher, omega, kind, null):
    """losses.extract_posterior_velocity (eps 1e-6): the merged observation, the teacher's guided drift there and
    the release's own arrangement of the GLASS conditional drift (no division by 1 − s)."""
    sb, t = bc(s), bc(t_cond)
    oms = 1 - sb
    denom = (t ** 2 * oms ** 2 + (1 - t) ** 2 * sb ** 2).clamp_min(1e-6)
    P = (1 - t) ** 2 / denom
    sqP = torch.sqrt(P)
    t_star = 1 / (1 + oms * sqP)
    x_star = t_star * oms ** 2 * t / denom * xt_cond + t_star * sb * P * Is
    N = s.shape[0]
    ts = t_star.view(N)
    v_u, v_mg = release_guidance_pair(teacher, ts, x_star, torch.zeros(N), torch.zeros_like(x_star), labels,
                                      torch.ones(N), null)
    v_c = v_mg * (1 - omega) + omega * v_u if kind == "dmf" else v_mg
    v_star = v_u + bc(cfg_scales) * (v_c - v_u)
    term2 = t_star * sqP * v_star
    diff = ((1 - t) ** 2 * (1 + sb) - t ** 2 * oms) / denom
    b_minus_1 = (diff - (P + sqP)) / (1 + oms * sqP)
    a = t_star * oms * t / denom
    return a * xt_cond + b_minus_1 * Is + term2


def release_loss(model, teacher, x1, labels, d, omega=0.6, kind="dmf", teacher_mode=True, weighting=None):
    """losses.get_consistency_loss_fn at the config_train.yaml defaults (teacher_mode: distill_fm + esd_teacher)
    or with data_fm + model guidance + "mf" (teacher_mode=False), on the draws `d` (mfm_fast's Draws)."""
    null = model.config.num_classes  # the release hard-codes label_dim = 1000 for ImageNet
    labels = torch.where(d.drop_label, torch.full_like(labels, null), labels)
    t_cond = d.times.t
    xt_cond = bc(1 - t_cond) * d.noise + bc(t_cond) * x1  # Linear SI: alpha = 1 − t, beta = t (pure noise at t = 0)
    s = d.times.s_diag
    x0 = d.noise_bar
    Is = bc(1 - s) * x0 + bc(s) * x1
    if teacher_mode:  # distill_fm
        fm_pred = model(s, s, Is, t_cond, xt_cond, y=labels, cfg=d.cfg)
        target = release_posterior_velocity(s, Is, xt_cond, t_cond, labels, d.cfg, teacher, omega, kind, null)
        diag = release_adaptive(fm_pred, target, 0.5, 0.01)
    else:  # data_fm with model guidance and the learned weighting
        with torch.no_grad():
            v_u, v_mg = release_guidance_pair(model, s, Is, t_cond, xt_cond, labels, d.cfg, null)
        fm_target = (x1 - x0) + bc(1 - 1 / d.cfg) * (v_mg - v_u)
        fm_pred = model(s, s, Is, t_cond, xt_cond, y=labels, cfg=d.cfg)
        diag = release_adaptive(fm_pred, fm_target, 0.5, 0.01,
                                None if weighting is None else release_weighting(weighting, s, t_cond))
    # off-diagonal: fresh noise, sorted (s, u), the same context and labels, its own cfg draw
    s2, u2 = d.times.s, d.times.u
    x0b = d.noise_cons
    Is2 = bc(1 - s2) * x0b + bc(s2) * x1
    if teacher_mode:
        vss = release_posterior_velocity(s2, Is2, xt_cond, t_cond, labels, d.cfg_cons, teacher, omega, kind, null)
    else:
        with torch.no_grad():
            v_u, v_mg = release_guidance_pair(model, s2, Is2, t_cond, xt_cond, labels, d.cfg_cons, null)
        vss = (x1 - x0b) + bc(1 - 1 / d.cfg_cons) * (v_mg - v_u)
    vsu, jvp = torch.func.jvp(lambda s_, u_, x_: model(s_, u_, x_, t_cond, xt_cond, y=labels, cfg=d.cfg_cons),
                              (s2, u2, Is2), (torch.ones_like(s2), torch.zeros_like(u2), vss))
    cons = release_adaptive(vsu, vss + bc(u2 - s2) * jvp, 1.0, 0.01)
    return diag + cons, diag, cons


# ---------------------------------------------------------------------------------------------- the tests
def data_sampler(seed=11):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(32, *EVENT, generator=g) * 0.8
    y = torch.randint(0, 10, (32,), generator=g)

    def sample(n, generator):
        idx = torch.randint(0, 32, (n,), generator=generator)
        return x[idx], y[idx]
    return sample


def telling_step(trainer) -> int:
    """A step whose draws have a dropped label, an empty context t = 0 and an informative one."""
    for k in range(200):
        _, _, d, _ = trainer.global_batch(k)
        if d.drop_label.any() and (~d.drop_label).any() and (d.times.t == 0).any() and (d.times.t > 0).any():
            return k
    raise AssertionError("no step with every kind of row")


def grads(model, loss):
    model.zero_grad(set_to_none=True)
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def compare(trainer, teacher_mode, omega=0.6, kind="dmf", teacher=None):
    k = telling_step(trainer)
    trainer.step = k
    x1, cond, d, _ = trainer.global_batch(k)
    loss, logs = trainer.loss()
    ours = grads(trainer.model, loss)
    ref, diag, cons = release_loss(trainer.model, teacher, x1, cond["y"], d, omega, kind, teacher_mode,
                                   getattr(trainer.model, "weighting_model", None))
    theirs = grads(trainer.model, ref)
    torch.testing.assert_close(loss, ref.detach(), rtol=2e-5, atol=1e-6)
    assert min(ref.item(), diag.item(), cons.item()) > 1e-4  # every term is live
    assert set(ours) == set(theirs)
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], rtol=2e-4, atol=2e-6, msg=name)
    assert any(float(g.abs().max()) > 0 for g in ours.values())
    return ours


def test_default_objective_equals_the_release():
    """ESD-teacher + distilled diagonal, adaptive (p, c) = (0.5, 0.01) and (1, 0.01) on per-sample sums, model
    guidance at w = 2.5 through the teacher's CFG (DMF rearrangement ω = 0.6), pure-noise context at t = 0, label
    dropout, both terms on every row."""
    student, teacher = perturbed(0), perturbed(1).eval().requires_grad_(False)
    cfg = image_defaults(batch=B, device="cpu", steps=10)
    trainer = _Trainer(student, data_sampler(), cfg, guided_drift(teacher, 0.6))
    _, _, d, _ = trainer.global_batch(0)
    assert d.cfg is not None and set(d.cfg.tolist()) <= {1.0, 2.5} and d.noise_cons is not None
    grad = compare(trainer, True, 0.6, "dmf", teacher)
    assert grad["guidance_embedder.embedding_table.weight"][1].abs().max() > 0  # the w = 2.5 row is trained


@pytest.mark.parametrize("kind,omega", [("dmf", 0.6), ("sit", 0.0)])
def test_teacher_target_equals_the_release(kind, omega):
    """The GLASS target of the guided teacher (DMF: ω = 0.6; SiT: no rearrangement) at rows with and without labels,
    guidance 1 and 2.5, t = 0 and t > 0, s up to 0.999."""
    from mfm_fast.losses import glass_target
    teacher = perturbed(1).eval().requires_grad_(False)
    g = torch.Generator().manual_seed(4)
    n = 8
    s = torch.cat([torch.rand(n - 1, generator=g), torch.tensor([0.999])])
    t = torch.where(torch.arange(n) % 3 == 0, torch.zeros(n), torch.rand(n, generator=g) ** 2)
    xbar, x = torch.randn(n, *EVENT, generator=g), torch.randn(n, *EVENT, generator=g)
    y = torch.where(torch.arange(n) % 4 == 1, torch.full((n,), 10), torch.randint(0, 10, (n,), generator=g))
    cfg = torch.where((torch.arange(n) % 2 == 0) & (y < 10), torch.full((n,), 2.5), torch.ones(n))
    ours = glass_target(guided_drift(teacher, omega), s, xbar, t, x, y=y, cfg=cfg)
    theirs = release_posterior_velocity(s, xbar, x, t, y, cfg, teacher, omega, kind, 10)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=2e-5)


def test_data_objective_with_guidance_and_learned_weighting_equals_the_release():
    """data_fm + model guidance (target x1 − x0 + (1 − 1/w)·(v(y, w) − v(∅, 1)), stop-gradient) with the learned
    loss weighting on the diagonal, and the MeanFlow ("mf") consistency with the same guidance term."""
    cfg = image_defaults(batch=B, device="cpu", steps=10, diagonal="data", consistency="meanflow",
                         loss_weighting=True)
    trainer = _Trainer(perturbed(2), data_sampler(), cfg, None)
    u = trainer.model.weighting_model(torch.rand(64), torch.rand(64)).detach()
    assert float(u.abs().min()) < float(u.abs().max()) and float(u.abs().max()) > 0.1  # the weighting matters
    grad = compare(trainer, False)
    assert grad["weighting_model.w_s"].abs().max() > 0  # the weighting network is trained along


def test_weighting_network_is_the_releases():
    net = LossWeighting(16, 10.0, generator=torch.Generator().manual_seed(0))
    s, t = torch.rand(64), torch.rand(64) ** 2
    u = net(s, t).detach()
    torch.testing.assert_close(u, release_weighting(net, s, t).view(-1))
    assert float(u.abs().max()) > 0.3  # its rows have unit norm: |u| stays well inside ±10 here
    c = float(u.abs().median())  # a clamp that bites on half of the rows
    clamped = LossWeighting(16, c, generator=torch.Generator().manual_seed(0))
    v = clamped(s, t).detach()
    assert float(v.abs().max()) == pytest.approx(c) and bool((v.abs() < c - 1e-3).any())
    torch.testing.assert_close(v, release_weighting(clamped, s, t, clamp=c).view(-1))


def test_time_label_and_guidance_draws_follow_the_release():
    """sample_t_cond (t = U^2 · Bernoulli(0.9)), sample_s_u (sorted uniform pair), the diagonal's s ~ U,
    class dropout 0.2 and generate_cfg_values (a weight of ws, 1 with base_prob, 1 where dropped), compared in
    distribution with the release's formulas on 200,000 rows."""
    n = 200_000
    d = draw(n, (1,), torch.Generator().manual_seed(0), t_zero_prob=0.1, p_uncond=0.2, t_power=2.0, paired=True,
             guidance_ws=(2.5, 4.0), guidance_base_prob=0.3)
    g = torch.Generator().manual_seed(1)
    t_rel = torch.rand(n, generator=g) ** 2.0 * 1.0 * torch.bernoulli(torch.full((n,), 0.9), generator=g)
    pair = torch.rand(n, 2, generator=g)
    s_rel, u_rel = pair.min(1).values, pair.max(1).values
    s_diag_rel = torch.rand(n, generator=g)
    drop_rel = torch.bernoulli(torch.full((n,), 0.2), generator=g).bool()
    ws = torch.tensor([2.5, 4.0])
    w = ws[torch.randint(2, (n,), generator=g)]
    w = torch.where(torch.bernoulli(torch.full((n,), 0.3), generator=g).bool(), torch.ones_like(w), w)
    cfg_rel = torch.where(drop_rel, torch.ones_like(w), w)
    q = torch.linspace(0.05, 0.95, 19)
    assert abs(float((d.times.t == 0).float().mean()) - float((t_rel == 0).float().mean())) < 0.005
    for ours, theirs in ((d.times.t[d.times.t > 0], t_rel[t_rel > 0]), (d.times.s, s_rel), (d.times.u, u_rel),
                         (d.times.s_diag, s_diag_rel)):
        torch.testing.assert_close(torch.quantile(ours, q), torch.quantile(theirs, q), atol=6e-3, rtol=0)
    assert abs(float(d.drop_label.float().mean()) - float(drop_rel.float().mean())) < 0.005
    for ours in (d.cfg, d.cfg_cons):
        assert torch.all(ours[d.drop_label] == 1)
        for value in (1.0, 2.5, 4.0):
            assert abs(float((ours[~d.drop_label] == value).float().mean())
                       - float((cfg_rel[~drop_rel] == value).float().mean())) < 0.006
    assert not torch.equal(d.cfg, d.cfg_cons)  # two separate draws, as the release makes them


def test_learning_rate_and_ema_schedules_are_the_releases():
    """configure_optimizers: RAdam with SequentialLR(LinearLR(0.1 -> 1 over 2000 steps), ConstantLR), stepped per
    optimizer step; EMAWeightAveraging: an AveragedModel of decay 0.9999 updated from step index 100 on (its first
    update copies the weights)."""
    cfg = image_defaults()
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.RAdam([p], lr=cfg.lr)
    warm = torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.1, end_factor=1.0, total_iters=2000)
    sched = torch.optim.lr_scheduler.SequentialLR(
        opt, [warm, torch.optim.lr_scheduler.ConstantLR(opt, factor=1.0, total_iters=float("inf"))], [2000])
    for k in range(2300):
        assert cfg.lr_at(k) == pytest.approx(opt.param_groups[0]["lr"], rel=1e-6), k
        opt.step()
        sched.step()
    assert isinstance(opt, torch.optim.RAdam) and cfg.optimizer == "radam" and cfg.grad_clip == 1.5
    from torch.optim.swa_utils import AveragedModel, get_ema_avg_fn
    torch.manual_seed(0)
    net = torch.nn.Linear(3, 3).double()
    avg = AveragedModel(net, avg_fn=get_ema_avg_fn(0.9999))
    ours = copy.deepcopy(net)
    for step_idx in range(300):
        with torch.no_grad():
            for q in net.parameters():
                q.add_(torch.randn_like(q))
        if step_idx >= 100:  # the release's should_update
            avg.update_parameters(net)
        for e, q in zip(ours.parameters(), net.parameters()):  # runloop._update_ema
            e.data.lerp_(q.data, 1 - cfg.ema_decay_at(step_idx))
        if step_idx >= 100:
            for e, a in zip(ours.parameters(), avg.module.parameters()):
                torch.testing.assert_close(e, a, rtol=1e-12, atol=1e-12)
    assert TrainConfig().ema_decay_at(5) == pytest.approx(6 / 15)  # the GMM recipes keep their warm-up
