"""Answer balancing within question templates: weights, the report, and the trainer's weighted epochs."""
import pytest
import torch

from workbench.config import DataSpec, RunConfig
from workbench.data.balance import answer_groups, balance_report, balance_weights
from workbench.data.samples import Sample
from workbench.errors import ConfigError
from workbench.training.trainer import _epoch_order


def _vqa(question, answer):
    return Sample([{"role": "user", "content": f"<image>\n{question}"}, {"role": "assistant", "content": answer}],
                  ["x.png"])


def _biased():
    """'is there a COLOUR shape?' answered no 9 times in 10; one colour question; one long caption."""
    rows = [_vqa(f"is there a {c} shape?", "no") for c in ("red", "blue", "green") * 3] + \
           [_vqa("is there a red shape?", "yes"), _vqa("what color is the shape?", "red"),
            _vqa("what color is the shape?", "blue"), _vqa("what color is the shape?", "green"),
            _vqa("describe the image", "a small red circle drawn on a white background")]
    return rows


def test_templates_mask_the_answer_words_and_leave_free_form_answers_alone():
    groups = answer_groups(_biased())
    assert groups[0] == ("is there a _ shape", "no") == groups[1]
    assert groups[9] == ("is there a _ shape", "yes")
    assert groups[10] == ("what color is the shape", "red")
    assert groups[-1] is None  # a caption is not part of any template


def test_weights_balance_answers_within_a_template():
    samples = _biased()
    weights = balance_weights(samples, 1.0)
    assert weights.shape == (len(samples),) and torch.isclose(weights.mean(), torch.tensor(1.0, dtype=weights.dtype))
    groups = answer_groups(samples)
    mass = {}
    for g, w in zip(groups, weights.tolist()):
        if g and g[0] == "is there a _ shape":
            mass[g[1]] = mass.get(g[1], 0.0) + w
    assert mass["yes"] == pytest.approx(mass["no"])  # one "yes" weighs as much as nine "no"
    assert torch.allclose(balance_weights(samples, 0.0), torch.ones(len(samples), dtype=torch.float64))
    half = balance_weights(samples, 0.5)
    assert 1 < half[9] / half[0] < weights[9] / weights[0]  # a partial strength tempers the bias
    report = balance_report(samples, weights)
    assert report["text_prior_before"] > report["text_prior_after"]
    with pytest.raises(ValueError, match="between 0 and 1"):
        balance_weights(samples, 1.5)


def test_weighted_epochs_follow_the_weights_and_replay_with_the_seed():
    weights = torch.tensor([1.0, 1.0, 8.0], dtype=torch.float64)
    order = _epoch_order(3, weights, seed=3)
    assert order.shape == (3,) and torch.equal(order, _epoch_order(3, weights, seed=3))
    draws = torch.cat([_epoch_order(3, weights, seed=s) for s in range(300)])
    assert (draws == 2).float().mean() > 0.7
    plain = _epoch_order(5, None, seed=0)
    assert sorted(plain.tolist()) == list(range(5))


def test_balance_is_checked_in_the_run_config():
    with pytest.raises(ConfigError, match="data.balance"):
        RunConfig(data=DataSpec(balance=2.0)).validate()
