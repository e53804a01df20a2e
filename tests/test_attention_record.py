"""The typed attention record: what each integrator family fills while `record_attention` is on, by field."""
import copy
import typing

import pytest
import torch

from workbench.config import IntegratorSpec
from workbench.integrators.base import AttentionRecord
from workbench.model import VisionLanguageModel

QA = [{"role": "user", "content": "<image>\nwhat color is the shape?"}, {"role": "assistant", "content": "red"}]

FILLED = {  # tiny Llama with 2 layers: what each family records, field → keys
    ("mlp", ()): {},
    ("qformer", (("num_queries", 3),)): {"latent_to_image": [0, 2], "latent_self": [0, 1, 2, 3]},
    ("resampler", (("num_latents", 3),)): {"latent_to_image": [0, 1], "image_share": [0, 1]},
    ("gated_xattn", (("every", 1),)): {"latent_to_image": [0], "text_to_latent": [0, 1], "gates": [0, 1]},
    ("lavin_mma", ()): {"routes": [(0, "attn"), (0, "mlp"), (1, "attn"), (1, "mlp")]},
    ("llama_adapter", ()): {"text_to_prompt": [0, 1], "gates": [0, 1], "visual_prompts": [0, 1]},
}


def test_the_record_has_typed_fields_and_starts_empty():
    hints = typing.get_type_hints(AttentionRecord)
    assert set(hints) == {"latent_to_image", "latent_self", "image_share", "text_to_latent", "text_to_prompt",
                          "gates", "routes", "visual_prompts"}
    assert all(typing.get_origin(h) is dict and typing.get_args(h)[1] is torch.Tensor for h in hints.values())
    empty = AttentionRecord()
    assert not empty and empty.filled() == {}
    empty.gates[3] = torch.zeros(())
    assert empty and empty.filled() == {"gates": [3]}


@pytest.mark.parametrize("name, options", list(FILLED))
def test_each_family_fills_its_fields(name, options, tiny_config, example_image):
    config = copy.deepcopy(tiny_config)
    config.integrator = IntegratorSpec(name=name, options=dict(options))
    torch.manual_seed(0)
    model = VisionLanguageModel.from_config(config).eval()
    batch = model.prepare_batch([QA], [[example_image]])
    with torch.no_grad():
        model(**batch)
    assert not model.integrator.last_attention  # nothing is recorded unless asked
    model.integrator.record_attention = True
    with torch.no_grad():
        model(**batch)
    record = model.integrator.last_attention
    assert isinstance(record, AttentionRecord)
    assert record.filled() == FILLED[name, options]
    for field in record.filled():
        assert all(isinstance(t, torch.Tensor) and not t.requires_grad for t in getattr(record, field).values())
