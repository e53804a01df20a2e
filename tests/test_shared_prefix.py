"""The shared prefix: a batch's common leading tokens run once per step with exactly the loss and gradients of
the ordinary forward (visual tokens at the embeddings or above them, with or without the text-state cache,
sdpa or eager attention), only where that holds, and the trainer's check and log."""
import copy

import pytest
import torch

from conftest import train_tiny
from workbench.config import IntegratorSpec, PeftSpec
from workbench.data.prompting import IMAGE_TOKEN_INDEX
from workbench.data.samples import Sample, SampleDataset
from workbench.llm import set_attention_implementation, training_precision
from workbench.model import VisionLanguageModel
from workbench.peft_modules import base_llm
from workbench.shared_prefix import rest_attention_mask, shared_prefix_length, why_not_by_setting, why_not_shared
from workbench.training.text_state_cache import TextStateCache, frozen_text_layers

QA = [{"role": "user", "content": "<image>\nwhat color is the shape?"}, {"role": "assistant", "content": "red"}]
QB = [{"role": "user", "content": "<image>\nis there a circle in the image?"}, {"role": "assistant", "content": "yes"}]
QC = [{"role": "user", "content": "the quick <image> fox"}, {"role": "assistant", "content": "brown dog"}]


def _model(tiny_config, integrator="mlp", entry=1, lora_dropout=0.0, **options):
    config = copy.deepcopy(tiny_config)
    config.integrator = IntegratorSpec(name=integrator, options=options)
    config.visual_entry_layer = entry
    config.system_prompt = "hello world, the quick brown fox"  # the rows' common start, with the chat template
    config.peft = PeftSpec(method="lora", r=4, alpha=8, dropout=lora_dropout,
                           options={"layers_to_transform": [1]} if entry else {})
    torch.manual_seed(0)
    model = VisionLanguageModel.from_config(config).train()
    for p in model.parameters():  # off the zero inits, so the image and LoRA both matter
        if p.requires_grad and not p.any():
            torch.nn.init.normal_(p, std=0.3)
    return model


def _loss_and_grads(model, batch, **kwargs):
    model.zero_grad()
    out = model(**batch, answer_logits_only=True, **kwargs)
    out.loss.backward()
    return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("entry, cached, kernel", [(0, False, "sdpa"), (1, False, "sdpa"), (1, True, "sdpa"),
                                                   (1, True, "eager")])
def test_a_shared_prefix_gives_the_same_loss_and_gradients(tiny_config, example_image, entry, cached, kernel):
    model = _model(tiny_config, entry=entry)
    set_attention_implementation(base_llm(model.llm), kernel)
    batch = model.prepare_batch([QA, QB, QC], [[example_image]] * 3)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    prefix = shared_prefix_length(ids, mask, limit=ids.shape[1])
    assert prefix >= 4 and (ids[:, :prefix] == ids[:1, :prefix]).all()  # the system prompt and chat template
    cache = TextStateCache(model, frozen_text_layers(model)[0]) if cached else None
    plain, plain_grads = _loss_and_grads(model, batch, text_states=cache)
    shared, shared_grads = _loss_and_grads(model, batch, text_states=cache, share_prefix=True)
    assert torch.allclose(shared, plain, atol=1e-5)
    for name, grad in plain_grads.items():
        assert torch.allclose(shared_grads[name], grad, atol=1e-5), name
    assert any(g.abs().sum() > 0 for n, g in shared_grads.items() if "lora" in n)
    assert len(base_llm(model.llm).model.layers) == 2  # the decoder has all its layers back


def test_the_prefix_stops_at_an_image_a_difference_the_limit_and_one_token_short_of_the_shortest_row():
    mask = torch.ones(2, 10, dtype=torch.long)
    ids = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8, 9, 10], [1, 2, 3, 4, 5, 6, 0, 0, 0, 0]])
    assert shared_prefix_length(ids, mask, limit=10) == 6
    assert shared_prefix_length(ids, mask, limit=5) == 5
    image = ids.clone()
    image[:, 5] = IMAGE_TOKEN_INDEX
    assert shared_prefix_length(image, mask, limit=10) == 5
    same = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 0, 0, 0]] * 2)
    short = mask.clone()
    short[:, 7:] = 0
    assert shared_prefix_length(same, short, limit=10) == 6  # each row keeps a token of its own
    assert shared_prefix_length(ids, mask, limit=3) == 0  # too short to pay
    assert shared_prefix_length(ids[:1], mask[:1], limit=10) == 0  # a batch of one has nothing to share


def test_the_rest_of_a_row_sees_the_prefix_and_its_own_earlier_tokens_never_padding():
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    allowed = rest_attention_mask(mask, 2, torch.float32, "sdpa")
    assert allowed.shape == (2, 1, 3, 5) and allowed.dtype == torch.bool
    assert allowed[0, 0].tolist() == [[True, True, True, False, False], [True, True, True, True, False],
                                      [True, True, True, True, True]]
    assert not allowed[1, 0, :, 3:].any()
    additive = rest_attention_mask(mask, 2, torch.float32, "eager")
    assert ((additive == 0) == allowed).all() and additive.min() == torch.finfo(torch.float32).min


def test_it_is_refused_where_it_would_not_be_the_same_computation(tiny_config):
    assert why_not_shared(_model(tiny_config)) is None
    assert "inside its layers" in why_not_shared(_model(tiny_config, integrator="llama_adapter", num_layers=1))
    assert "dropout" in why_not_shared(_model(tiny_config, lora_dropout=0.1))
    model = _model(tiny_config)
    model.gradient_checkpointing = True
    assert "checkpointing" in why_not_shared(model)
    model = _model(tiny_config)
    base_llm(model.llm).config._attn_implementation = "flash_attention_2"
    assert "flash_attention_2" in why_not_shared(model)


def test_trainer_shares_the_prefix_when_it_qualifies_and_says_why_not(tiny_config, example_image, tmp_path):
    data = SampleDataset([Sample(QA, [example_image]), Sample(QB, [example_image])] * 4)

    def train(config, name, **training):
        rows = train_tiny(config, tmp_path / name, data, epochs=2, **training)
        assert [r for r in rows if r["kind"] == "train"]
        return [r for r in rows if r["kind"] == "shared_prefix"]

    # the precision stays auto: accelerate fixes one mixed precision per process
    used = train(_config_of(tiny_config), "used", share_prefix=True)
    assert used[0]["used"] is True and abs(used[0]["check_diff"]) < 0.05
    refused = train(_config_of(tiny_config, integrator="llama_adapter", num_layers=1), "refused", share_prefix=True)
    assert refused[0]["used"] is False and "inside its layers" in refused[0]["reason"]
    auto = train(_config_of(tiny_config), "auto")
    expected = why_not_by_setting("auto", training_precision("auto", "cpu"))
    assert auto[0]["used"] is (expected is None) and auto[0].get("reason") == expected
    assert train(_config_of(tiny_config), "off", share_prefix=False) == []


def _config_of(tiny_config, integrator="mlp", **options):
    return _model(tiny_config, integrator=integrator, **options).config


def test_auto_shares_in_fp32_only_and_true_forces_it():
    assert why_not_by_setting("auto", "no") is None
    assert "autocast" in why_not_by_setting("auto", "bf16") and "autocast" in why_not_by_setting("auto", "fp16")
    assert why_not_by_setting(True, "bf16") is None
    assert why_not_by_setting(False, "no") is not None
