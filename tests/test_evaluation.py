"""Metrics with known answers: BLEU-4, CIDEr-D, multiple choice, and caption evaluation on a tiny model."""
import math

import pytest

from workbench.caption_metrics import bleu4, cider_d
from workbench.evaluation import evaluate_captions, multiple_choice_accuracy


def test_bleu4_known_values():
    assert bleu4(["a red circle on a white background"], [["a red circle on a white background"]]) == pytest.approx(1.0)
    assert bleu4(["blue square"], [["a red circle on a white background"]]) == 0.0
    # 7/8 unigrams (one 'the' clipped), 5/7 bigrams, 3/6 trigrams, 2/5 4-grams; longer than the reference: no penalty
    pred, ref = "the red circle is on the white paper", "the red circle is on white paper"
    expected = math.exp((math.log(7 / 8) + math.log(5 / 7) + math.log(3 / 6) + math.log(2 / 5)) / 4)
    assert bleu4([pred], [[ref]]) == pytest.approx(expected)


def test_brevity_penalty_and_multiple_references():
    short = bleu4(["a red circle on"], [["a red circle on a white background"]])
    assert short == pytest.approx(math.exp(1 - 7 / 4))
    assert bleu4(["a red circle on"], [["nothing alike", "a red circle on"]]) == pytest.approx(1.0)


def test_cider_orders_captions_sensibly():
    refs = [["a red circle"], ["a blue triangle"], ["a green rectangle"]]
    perfect = cider_d(["a red circle", "a blue triangle", "a green rectangle"], refs)
    partial = cider_d(["a red triangle", "a blue circle", "a green circle"], refs)
    wrong = cider_d(["the sky", "some water", "an apple"], refs)
    assert perfect > partial > wrong == 0.0
    # identical 1-, 2- and 3-gram vectors give cosine 1; three-word captions have no 4-grams
    assert perfect == pytest.approx(10.0 * (1 + 1 + 1 + 0) / 4, rel=1e-6)


def test_multiple_choice_by_letter_or_text():
    choices = [["circle", "triangle", "rectangle"]] * 3
    assert multiple_choice_accuracy(["B", "triangle.", "circle"], choices, ["triangle"] * 3) == pytest.approx(2 / 3)


def test_caption_evaluation_runs_on_a_model(tiny_model, example_image):
    from workbench.data.samples import Sample, SampleDataset

    data = SampleDataset([Sample([{"role": "user", "content": "<image>\ndescribe the image ."},
                                  {"role": "assistant", "content": "a red circle"}], [example_image],
                                 {"caption": "a red circle"})] * 3)
    result = evaluate_captions(tiny_model, data, batch_size=2, max_new_tokens=4)
    assert result["count"] == 3 and 0.0 <= result["bleu4"] <= 1.0 and result["cider"] >= 0.0
    assert result["examples"][0]["references"] == ["a red circle"]
