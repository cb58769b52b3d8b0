"""Rewards: built-ins against closed forms, and the validating wrapper's errors (shape, dtype, NaN/inf)."""
import math

import pytest
import torch
import torch.nn as nn

from mfm_fast.rewards import ClassifierReward, DecodeThenScore, LinearInverseReward, as_reward


def test_linear_inverse_reward_closed_form_and_paper():
    A = torch.randn(3, 5, dtype=torch.float64)
    y = torch.randn(3, dtype=torch.float64)
    r = LinearInverseReward(A, y, 0.3)
    x = torch.randn(7, 5, dtype=torch.float64)
    expected = torch.stack([-((y - A @ xi) ** 2).sum() / (2 * 0.09) for xi in x])
    torch.testing.assert_close(r(x), expected, rtol=1e-12, atol=1e-12)
    assert r(x.float()).dtype == torch.float32

    p = LinearInverseReward.paper()
    assert p.A.tolist() == [[1.2, -0.8]] and p.y.tolist() == [-1.0] and p.sigma == 0.2
    x = torch.tensor([[0.5, 2.0]])
    assert p(x).item() == pytest.approx(-(-1.0 - (1.2 * 0.5 - 0.8 * 2.0)) ** 2 / (2 * 0.04))


def test_linear_inverse_reward_rejects_bad_arguments():
    with pytest.raises(ValueError, match="y has 2 entries"):
        LinearInverseReward(torch.randn(1, 2), torch.randn(2), 0.2)
    with pytest.raises(ValueError, match="sigma"):
        LinearInverseReward(torch.randn(1, 2), torch.randn(1), 0.0)
    with pytest.raises(ValueError, match="3 features"):
        LinearInverseReward(torch.randn(1, 2), torch.randn(1), 0.2)(torch.randn(4, 3))


def test_classifier_reward_is_log_weighted_probability():
    torch.manual_seed(1)
    clf = nn.Linear(4, 10)
    w = [0, 1, 0, 1, 0, 2, 0, 2, 0, 4]
    r = ClassifierReward(clf, w)
    x = torch.randn(6, 4)
    p = torch.softmax(clf(x), dim=-1)
    wn = torch.tensor(w, dtype=torch.float32) / sum(w)
    torch.testing.assert_close(r(x), torch.log(p @ wn))
    # gradients stay finite despite the zero weights (log 0 = −inf enters the log-sum-exp)
    xg = x.clone().requires_grad_(True)
    r(xg).sum().backward()
    assert torch.isfinite(xg.grad).all() and xg.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="non-negative"):
        ClassifierReward(clf, [-1.0] + [1.0] * 9)
    with pytest.raises(ValueError, match=r"logits of shape \(6, 3\)"):
        ClassifierReward(clf, [1.0, 1.0, 1.0])(x)


def test_decode_then_score_composes():
    decoder = nn.Linear(3, 2).double()
    inner = LinearInverseReward([[1.0, 2.0]], [0.5], 1.0)
    r = DecodeThenScore(decoder, inner)
    z = torch.randn(5, 3, dtype=torch.float64)
    torch.testing.assert_close(r(z), inner(decoder(z)))
    assert r.name == "decode_then_linear_inverse"


def test_as_reward_errors_name_the_reward_and_count_bad_entries():
    x = torch.randn(5, 2)

    def nan_reward(x):
        r = x.sum(-1)
        r[1] = float("nan")
        r[3] = float("inf")
        return r

    with pytest.raises(ValueError, match=r"'nan_reward' returned 2 non-finite value\(s\)"):
        as_reward(nan_reward)(x)
    with pytest.raises(ValueError, match=r"'wide' must return shape \(5,\).*\(5, 2\)"):
        as_reward(lambda x: x, name="wide")(x)
    with pytest.raises(TypeError, match="'ints' must return a floating-point"):
        as_reward(lambda x: torch.ones(x.shape[0], dtype=torch.long), name="ints")(x)
    with pytest.raises(TypeError, match="'listy' must return a tensor"):
        as_reward(lambda x: [0.0] * x.shape[0], name="listy")(x)
    with pytest.raises(TypeError, match="callable"):
        as_reward(3.0)


def test_as_reward_passes_values_and_attributes_through():
    inner = LinearInverseReward.paper()
    checked = as_reward(inner)
    x = torch.randn(4, 2)
    torch.testing.assert_close(checked(x), inner(x))
    assert checked.sigma == 0.2 and checked.name == "paper_linear_inverse"
    assert as_reward(checked).fn is inner  # no double wrapping
    assert math.isfinite(checked(x).sum().item())
