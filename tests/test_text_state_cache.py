"""The text-state cache: which bottom layers qualify, exactly the same loss and gradients, and the trainer's
check, hit rate and refusal paths."""
import copy

import pytest
import torch

from conftest import train_tiny
from workbench.config import IntegratorSpec, PeftSpec
from workbench.data.samples import Sample, SampleDataset
from workbench.model import VisionLanguageModel
from workbench.training.text_state_cache import TextStateCache, frozen_text_layers

QA = [{"role": "user", "content": "<image>\nwhat color is the shape?"}, {"role": "assistant", "content": "red"}]
QB = [{"role": "user", "content": "<image>\nis there a circle in the image?"}, {"role": "assistant", "content": "yes"}]


def _config(tiny_config, integrator="llama_adapter", top_lora=True, **options):
    config = copy.deepcopy(tiny_config)
    config.integrator = IntegratorSpec(name=integrator, options={"num_layers": 1, **options} if
                                       integrator == "llama_adapter" else options)
    config.peft = PeftSpec(method="lora", r=4, alpha=8, dropout=0.0,
                           options={"layers_to_transform": [1]} if top_lora else {})
    return config


def _model(config):
    torch.manual_seed(0)
    return VisionLanguageModel.from_config(config)


def test_the_cut_is_the_lowest_layer_that_trains_or_sees_the_image(tiny_config):
    assert frozen_text_layers(_model(_config(tiny_config)))[0] == 1
    cut, why = frozen_text_layers(_model(_config(tiny_config, top_lora=False)))
    assert cut == 0 and "layer 0 trains" in why
    cut, why = frozen_text_layers(_model(_config(tiny_config, integrator="mlp")))
    assert cut == 0 and "visual tokens" in why
    cut, why = frozen_text_layers(_model(_config(tiny_config, media_marker=True)))
    assert cut == 0 and "visual tokens" in why
    model = _model(_config(tiny_config))
    model.integrator.detach()
    layers = model.llm.base_model.model.model.layers
    handle = layers[0].mlp.register_forward_hook(lambda *a: None)
    try:
        cut, why = frozen_text_layers(model)
        assert cut == 0 and "hooked" in why
    finally:
        handle.remove()


def test_cached_states_give_the_same_loss_and_gradients(tiny_config, example_image):
    model = _model(_config(tiny_config)).train()
    for p in model.integrator.parameters():  # off the zero init, so the image matters
        if not p.any():
            torch.nn.init.normal_(p, std=0.3)
    batch = model.prepare_batch([QA, QB], [[example_image], [example_image]])
    cache = TextStateCache(model, frozen_text_layers(model)[0])
    plain = model(**batch, answer_logits_only=True)
    plain.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    for _ in range(2):  # a miss, then a hit
        model.zero_grad()
        cached = model(**batch, answer_logits_only=True, text_states=cache)
        cached.loss.backward()
        assert torch.allclose(cached.loss, plain.loss, atol=1e-6)
        for n, p in model.named_parameters():
            if p.requires_grad:
                assert torch.allclose(p.grad, grads[n], atol=1e-6), n
    assert cache.summary()["entries"] == 2 and cache.hits == 2 and cache.misses == 2
    assert len(base_layers(model)) == 2  # the decoder has all its layers back


def base_layers(model):
    return model.llm.base_model.model.model.layers


def test_the_cache_respects_its_memory_cap(tiny_config, example_image):
    model = _model(_config(tiny_config))
    cache = TextStateCache(model, 1, max_mb=0.0)
    batch = model.prepare_batch([QA], [[example_image]])
    with torch.no_grad():
        model(**batch, answer_logits_only=True, text_states=cache)
    assert cache.summary()["entries"] == 0 and cache.misses == 1


def test_trainer_uses_the_cache_when_it_qualifies_and_says_why_not(tiny_config, example_image, tmp_path):
    data = SampleDataset([Sample(QA, [example_image]), Sample(QB, [example_image])] * 4)

    def train(config, name, **training):
        return [r for r in train_tiny(config, tmp_path / name, data, epochs=3, **training)
                if r["kind"] == "text_state_cache"]

    used = train(_config(tiny_config), "used")
    assert used[0]["cut"] == 1 and used[0]["check_diff"] == pytest.approx(0.0, abs=1e-6)
    assert used[-1]["entries"] == 2 and used[-1]["hit_rate"] > 0.5
    refused = train(_config(tiny_config, top_lora=False), "refused")
    assert refused[0]["cut"] == 0 and "layer 0 trains" in refused[0]["reason"]
    assert train(_config(tiny_config), "off", cache_text_states=False) == []
