"""PEFT modules (peft library) on the tiny VLM: training reach, generation, save/load, errors."""
import copy
import types

import pytest
import torch
from torch import nn

from workbench.config import PeftSpec
from workbench.errors import ConfigError, UnknownComponentError
from workbench.model import VisionLanguageModel, format_parameter_table
from workbench.peft_modules import (attach_peft, base_llm, is_peft_model, peft_method, peft_parameters,
                                    virtual_tokens)

Q = [{"role": "user", "content": "<image>\nwhat color is the shape?"}]
QA = Q + [{"role": "assistant", "content": "red"}]
LONG = [{"role": "user", "content": "<image>\nis there a circle in the image ? the quick brown fox"},
        {"role": "assistant", "content": "yes"}]
METHODS = ["lora", "dora", "ia3", "prompt_tuning", "prefix_tuning", "adaption_prompt"]


def build(tiny_config, method: str, **spec) -> VisionLanguageModel:
    config = copy.deepcopy(tiny_config)
    config.peft = PeftSpec(method=method, r=4, alpha=8, num_virtual_tokens=3, **spec)
    torch.manual_seed(0)
    return VisionLanguageModel.from_config(config)


def reload(path) -> VisionLanguageModel:
    torch.manual_seed(0)  # the tiny encoder is random (a real one is loaded from its weights): rebuild it alike
    return VisionLanguageModel.from_pretrained(path)


def perturb_adapter(model: VisionLanguageModel) -> None:
    """Move every adapter tensor off its initialisation (LoRA's B and the adaption gate start at zero)."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in peft_parameters(model.llm):
            p.add_(0.2 * torch.randn(p.shape, generator=generator).to(p))


@pytest.mark.parametrize("method", METHODS)
def test_method_trains_generates_and_round_trips(method, tiny_config, example_image, tmp_path):
    model = build(tiny_config, method)
    assert is_peft_model(model.llm) and peft_method(model.llm) == method
    # the transformers API the VLM relies on still answers through the wrapper
    assert model.llm.get_input_embeddings() is base_llm(model.llm).get_input_embeddings()
    assert model.llm.config.model_type == "llama" and model.llm.generation_config.eos_token_id is not None

    # parameter report: a separate peft row; only adapter + integrator train; the adapter is small
    rows = {r["component"]: r for r in model.parameter_report()}
    adapters = peft_parameters(model.llm)
    assert adapters and rows["peft"]["total"] == rows["peft"]["trainable"] == sum(p.numel() for p in adapters)
    assert rows["llm"]["trainable"] == rows["encoder"]["trainable"] == 0
    assert rows["total"]["total"] == sum(p.numel() for p in model.parameters())
    assert rows["total"]["trainable"] == rows["integrator"]["total"] + rows["peft"]["total"]
    assert rows["peft"]["total"] < 0.1 * rows["llm"]["total"]
    assert "peft" in format_parameter_table(model.parameter_report())

    # training step: finite loss, gradients reach the adapter and the integrator only
    model.train()
    assert model.llm.training  # adapters train: their dropout is live
    batch = model.prepare_batch([QA, LONG], [[example_image], [example_image]])
    out = model(**batch)
    assert torch.isfinite(out.loss)
    seq = batch["input_ids"].shape[1] - 1 + model.num_visual_tokens
    assert out.logits.shape[:2] == (2, seq)  # prompt tuning's virtual-token logits are dropped
    out.loss.backward()
    assert all(p.grad is not None for p in adapters)
    assert any(p.grad.abs().sum() > 0 for p in adapters)
    assert all(p.grad is not None for p in model.integrator.parameters())
    assert all(p.grad is None for p in model._llm_own_parameters())
    assert all(p.grad is None for p in model.encoder.parameters())

    # a trained adapter changes the output; padding does not change a sample (masks extended correctly)
    model.eval()
    single = model.prepare_batch([QA], [[example_image]])
    with torch.no_grad():
        fresh = model(**single).logits
        perturb_adapter(model)
        before = model(**single).logits
        both = model(**batch).logits
    assert not torch.allclose(fresh, before, atol=1e-4)
    assert torch.allclose(before[0], both[0, : before.shape[1]], atol=1e-5)

    # generation (through inputs_embeds): single and left-padded batch agree
    text = model.generate(Q, [example_image], max_new_tokens=5)
    pair = model.generate([Q, LONG[:1]], [[example_image], [example_image]], max_new_tokens=5)
    assert isinstance(text, str) and text and pair[0] == text

    # save → from_pretrained: the adapter comes back (safetensors under adapter/), logits identical
    path = model.save_pretrained(tmp_path / "m")
    assert (path / "adapter" / "adapter_model.safetensors").is_file()
    assert (path / "adapter" / "adapter_config.json").is_file()
    assert not (path / "llm.safetensors").exists()  # the base stayed frozen: only referenced
    loaded = reload(path)
    loaded.eval()
    with torch.no_grad():
        after = loaded(**single).logits
    assert torch.allclose(before, after, atol=1e-6)
    assert loaded.generate(Q, [example_image], max_new_tokens=5) == text
    assert {r["component"]: r for r in loaded.parameter_report()}["peft"]["trainable"] == rows["peft"]["total"]


def test_lora_with_unfrozen_llm_trains_base_and_adapter(tiny_config, example_image, tmp_path):
    model = build(tiny_config, "lora")
    model.set_trainable(llm=True)
    rows = {r["component"]: r for r in model.parameter_report()}
    assert rows["llm"]["trainable"] == rows["llm"]["total"] and rows["peft"]["trainable"] == rows["peft"]["total"]
    model.train()
    model(**model.prepare_batch([QA], [[example_image]])).loss.backward()
    assert all(p.grad is not None for p in peft_parameters(model.llm))
    assert any(p.grad is not None for p in model._llm_own_parameters())
    with torch.no_grad():
        base_llm(model.llm).get_input_embeddings().weight.add_(0.5)
    perturb_adapter(model)
    model.eval()
    batch = model.prepare_batch([QA], [[example_image]])
    with torch.no_grad():
        before = model(**batch).logits
    path = model.save_pretrained(tmp_path / "full")
    assert (path / "llm.safetensors").is_file() and (path / "adapter").is_dir()
    loaded = reload(path)
    assert not loaded.config.llm.frozen
    with torch.no_grad():
        assert torch.allclose(before, loaded(**batch).logits, atol=1e-6)


def test_adapters_can_be_frozen_and_checkpoints_restore_them(tiny_config, example_image, tmp_path):
    model = build(tiny_config, "lora")
    model.set_trainable(peft=False)
    assert {r["component"]: r for r in model.parameter_report()}["peft"]["trainable"] == 0
    model.train()
    assert not model.llm.training  # nothing in the LLM trains: it stays in eval
    model.set_trainable(peft=True)
    perturb_adapter(model)
    path = model.save_pretrained(tmp_path / "ckpt")
    fresh = build(tiny_config, "lora")
    fresh.load_trained_parts(path)  # what a trainer resume does
    assert all(torch.equal(a, b) for a, b in zip(peft_parameters(model.llm), peft_parameters(fresh.llm)))

    other = build(tiny_config, "ia3")
    with pytest.raises(ConfigError, match="lora adapter.*ia3"):
        other.load_trained_parts(path)


def test_unknown_method_and_option_are_refused(tiny_config):
    with pytest.raises(UnknownComponentError, match="Unknown PEFT method 'lorax'. Valid methods: none, lora, dora"):
        build(tiny_config, "lorax")
    with pytest.raises(ConfigError, match=r"Unknown peft option 'rank'.*Valid options: .*lora_alpha"):
        build(tiny_config, "lora", options={"rank": 4})
    with pytest.raises(ConfigError, match="prefix_projection is not supported"):
        build(tiny_config, "prefix_tuning", options={"prefix_projection": True})
    with pytest.raises(ConfigError, match="no PEFT modules"):
        build(tiny_config, "none").set_trainable(peft=True)


def test_qlora_needs_cuda_and_bitsandbytes(tiny_config):
    import importlib.util

    if torch.cuda.is_available() and importlib.util.find_spec("bitsandbytes") is not None:
        pytest.skip("this machine can run QLoRA")
    with pytest.raises(ConfigError, match=r"QLoRA .*needs CUDA \+ bitsandbytes"):
        build(tiny_config, "lora", options={"quantize": "4bit"})


def test_architecture_checks():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    qwen = Qwen2ForCausalLM(Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=1))
    with pytest.raises(ConfigError, match="adaption_prompt .*supports the llama"):
        attach_peft(qwen, PeftSpec(method="adaption_prompt"))
    wrapped = attach_peft(qwen, PeftSpec(method="lora"))  # llama-like defaults: every projection
    targeted = {n.split(".lora_A")[0].rsplit(".", 1)[-1] for n, _ in wrapped.named_parameters() if "lora_A" in n}
    assert targeted == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}

    class Mystery(nn.Module):
        def __init__(self):
            super().__init__()
            self.config = types.SimpleNamespace(model_type="mystery")
            self.mixer = nn.Linear(4, 4)

    with pytest.raises(ConfigError, match="No default lora target modules for the 'mystery' .*: mixer"):
        attach_peft(Mystery(), PeftSpec(method="lora"))
    assert attach_peft(qwen, PeftSpec(method="none")) is qwen
    assert virtual_tokens(qwen) == 0 and peft_parameters(qwen) == []
