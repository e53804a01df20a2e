"""Frozen linear weights held in the autocast dtype: the same loss and gradients as autocast casting them at
every call, only frozen linear weights (not trained ones, not a tied embedding), the loaded values back after
the stage and around a save, and the trainer's use and log."""
import copy

import pytest
import torch

from workbench.config import PeftSpec
from workbench.data.samples import Sample, SampleDataset
from workbench.llm import training_precision
from workbench.model import VisionLanguageModel
from workbench.training.frozen_casts import FrozenLinearCasts

QA = [{"role": "user", "content": "<image>\nwhat color is the shape?"}, {"role": "assistant", "content": "red"}]
QB = [{"role": "user", "content": "<image>\nis there a circle in the image?"}, {"role": "assistant", "content": "yes"}]


def _model(tiny_config):
    config = copy.deepcopy(tiny_config)
    config.peft = PeftSpec(method="lora", r=4, alpha=8, dropout=0.0)
    torch.manual_seed(0)
    model = VisionLanguageModel.from_config(config).set_trainable(integrator=True, llm=False, peft=True).train()
    for p in model.parameters():  # off LoRA's zero init, so its gradients flow both ways
        if p.requires_grad and not p.any():
            torch.nn.init.normal_(p, std=0.3)
    return model


def _loss_and_grads(model, batch):
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(**batch, answer_logits_only=True).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_cast_frozen_weights_give_autocasts_loss_and_gradients(tiny_config, example_image):
    model = _model(tiny_config)
    batch = model.prepare_batch([QA, QB], [[example_image]] * 2)
    plain, plain_grads = _loss_and_grads(model, batch)
    casts = FrozenLinearCasts(model.llm, torch.bfloat16)
    assert casts.count > 0
    cast, cast_grads = _loss_and_grads(model, batch)
    assert torch.equal(cast, plain)
    for name, grad in plain_grads.items():
        assert torch.equal(cast_grads[name], grad), name
    casts.restore()


def test_only_frozen_linear_weights_are_cast_and_restored_exactly(tiny_config):
    model = _model(tiny_config)
    before = {n: p.detach().clone() for n, p in model.llm.named_parameters()}
    casts = FrozenLinearCasts(model.llm, torch.bfloat16)
    dtypes = {n: p.dtype for n, p in model.llm.named_parameters()}
    for name, p in model.llm.named_parameters():
        frozen_linear = not p.requires_grad and ("proj" in name or "lm_head" in name) and "lora" not in name
        assert dtypes[name] == (torch.bfloat16 if frozen_linear else torch.float32), name
    assert any(dtypes[n] == torch.bfloat16 for n in dtypes if "q_proj" in n)
    with casts.restored():  # what a save writes: the loaded values
        assert all(torch.equal(p, before[n]) for n, p in model.llm.named_parameters())
    assert {n: p.dtype for n, p in model.llm.named_parameters()} == dtypes
    casts.restore()
    casts.restore()  # idempotent
    for name, p in model.llm.named_parameters():
        assert p.dtype == torch.float32 and torch.equal(p, before[name]), name


def test_values_bf16_holds_are_restored_without_a_copy(tiny_config):
    model = _model(tiny_config)
    with torch.no_grad():
        for p in model.llm.parameters():
            if not p.requires_grad:
                p.copy_(p.to(torch.bfloat16).float())  # as a bf16 checkpoint loaded in fp32
    before = {n: p.detach().clone() for n, p in model.llm.named_parameters()}
    casts = FrozenLinearCasts(model.llm, torch.bfloat16)
    assert casts.count > 0 and not casts.kept
    casts.restore()
    assert all(p.dtype == torch.float32 and torch.equal(p, before[n]) for n, p in model.llm.named_parameters())


def test_a_tied_output_layer_keeps_its_embedding_in_fp32():
    from transformers import LlamaConfig, LlamaForCausalLM

    llm = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                       num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True))
    llm.requires_grad_(False)
    assert llm.lm_head.weight is llm.model.embed_tokens.weight
    casts = FrozenLinearCasts(llm, torch.bfloat16)
    assert llm.model.embed_tokens.weight.dtype == torch.float32
    assert llm.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
    casts.restore()
    assert all(p.dtype == torch.float32 for p in llm.parameters())


def test_no_casts_without_mixed_precision(tiny_config):
    assert FrozenLinearCasts.for_precision(_model(tiny_config).llm, "no") is None


def test_the_trainer_casts_for_a_stage_and_leaves_the_weights_as_loaded(tiny_config, tmp_path, example_image):
    config = copy.deepcopy(tiny_config)
    config.peft = PeftSpec(method="lora", r=4, alpha=8)
    data = SampleDataset([Sample(messages=m, images=[str(example_image)]) for m in (QA, QB) * 4])
    torch.manual_seed(0)
    model = VisionLanguageModel.from_config(config)
    frozen = {n: p.detach().clone() for n, p in model.llm.named_parameters() if "lora" not in n}
    # the precision stays auto: accelerate fixes one mixed precision per process
    from workbench.config import RunConfig, StageSpec, TrainingSpec
    from workbench.training.metrics import read_metrics
    from workbench.training.trainer import Trainer

    run = RunConfig(model=config, stages=[StageSpec(name="adapt", llm="peft", lr=1e-2, lr_llm=1e-2, epochs=1)],
                    training=TrainingSpec(batch_size=4, log_every=1, cache_features=False, save_every=1))
    Trainer(run, tmp_path, model=model, datasets={"adapt": data}).train()
    stage = next(r for r in read_metrics(tmp_path / "metrics.jsonl") if r["kind"] == "stage")
    mixed = training_precision("auto", "cpu") in ("bf16", "fp16")
    assert (stage["frozen_casts"] > 0) == mixed
    for name, p in model.llm.named_parameters():
        if "lora" not in name:
            assert p.dtype == torch.float32 and torch.equal(p, frozen[name]), name
    assert (tmp_path / "model" / "adapter").is_dir()


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_for_precision_picks_the_autocast_dtype(tiny_config, precision):
    casts = FrozenLinearCasts.for_precision(_model(tiny_config).llm, precision)
    assert casts.dtype == {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    casts.restore()
