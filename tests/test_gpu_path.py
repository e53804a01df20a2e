"""The GPU path (issue 19) on a CPU-only machine: torch.cuda queries mocked, 7B models on the meta device,
`from_pretrained` patched, real processes for the GPU lock."""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from workbench.config import LLMSpec, PeftSpec
from workbench.errors import ConfigError

GIB = 2**30
REPO = Path(__file__).resolve().parents[1]


class FakeCuda:
    """What the code under test asks torch.cuda, answered as a machine with `count` GPUs would answer."""

    def __init__(self, monkeypatch, count=1, capability=(9, 0), free=140 * GIB, total=140 * GIB, reserved=0):
        self.calls: list[tuple] = []
        self.capability, self.free, self.total, self.reserved = capability, free, total, reserved
        self.current = 0
        cuda = torch.cuda
        monkeypatch.setattr(cuda, "is_available", lambda: True)
        monkeypatch.setattr(cuda, "device_count", lambda: count)
        monkeypatch.setattr(cuda, "current_device", lambda: self.current)
        monkeypatch.setattr(cuda, "get_device_capability", lambda device=None: self.capability)
        monkeypatch.setattr(cuda, "is_bf16_supported", lambda including_emulation=True: True)  # emulation says yes
        monkeypatch.setattr(cuda, "mem_get_info", lambda device=None: (self.free, self.total))
        monkeypatch.setattr(cuda, "memory_reserved", lambda device=None: self.reserved)
        monkeypatch.setattr(cuda, "is_initialized", lambda: True)
        monkeypatch.setattr(cuda, "empty_cache", lambda: self.calls.append(("empty_cache",)))
        monkeypatch.setattr(cuda, "set_device", lambda device: self.calls.append(("set_device", torch.device(device))))


def _no_launcher(monkeypatch):
    for key in ("WORLD_SIZE", "LOCAL_RANK", "RANK", "LOCAL_WORLD_SIZE", "TORCHELASTIC_RUN_ID"):
        monkeypatch.delenv(key, raising=False)


def _torchrun(monkeypatch, local_rank, world=2):
    monkeypatch.setenv("WORLD_SIZE", str(world))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(world))
    monkeypatch.setenv("LOCAL_RANK", str(local_rank))
    monkeypatch.setenv("RANK", str(local_rank))


# ---------------------------------------------------------------------------------------------- 1. the GPU lock

_RANK = """
import os, sys, time
from pathlib import Path
from workbench.worker import device_slot
root, rank, world = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
with device_slot(root, "gpu"):
    (root / f"entered-{os.environ.get('MASTER_PORT')}-{rank}").write_text("")
    # as init_process_group does: wait for every rank of this run to arrive
    deadline = time.time() + float(sys.argv[4])
    while len(list(root.glob(f"entered-{os.environ.get('MASTER_PORT')}-*"))) < int(world):
        if time.time() > deadline:
            sys.exit(3)
        time.sleep(0.05)
"""


def _rank(root: Path, rank: int, port: int, world: int = 2, wait: float = 20.0) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "WORLD_SIZE": str(world), "LOCAL_WORLD_SIZE": str(world),
           "RANK": str(rank), "LOCAL_RANK": str(rank), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    if world == 1:
        for key in ("WORLD_SIZE", "LOCAL_WORLD_SIZE", "RANK", "LOCAL_RANK"):
            env.pop(key)
    return subprocess.Popen([sys.executable, "-c", _RANK, str(root), str(rank), str(world), str(wait)], env=env)


def test_ranks_of_one_run_share_the_gpu_slot_instead_of_deadlocking(tmp_path):
    procs = [_rank(tmp_path, rank, 29501, wait=10) for rank in (0, 1)]
    codes = [p.wait(timeout=60) for p in procs]
    assert codes == [0, 0]  # before: rank 1 waited on the lock rank 0 held while rank 0 waited for rank 1
    assert not (tmp_path / "gpu.owner").exists()  # the slot is left clean for the next run


def test_a_queued_runs_ranks_wait_while_another_run_holds_the_gpu(tmp_path, monkeypatch):
    from workbench.worker import device_slot

    _no_launcher(monkeypatch)
    with device_slot(tmp_path, "gpu"):  # another (single-process) run trains
        waiting = [_rank(tmp_path, 1, 29502, wait=60), _rank(tmp_path, 0, 29502, wait=60)]
        time.sleep(2.0)
        assert [p.poll() for p in waiting] == [None, None]
        assert not list(tmp_path.glob("entered-*"))  # rank 1 does not load a model onto the busy GPU
    assert [p.wait(timeout=60) for p in waiting] == [0, 0]


def test_a_stale_owner_file_does_not_let_a_rank_through(tmp_path, monkeypatch):
    from workbench.worker import _held_by

    (tmp_path / "gpu.owner").write_text("|127.0.0.1|29503")  # left by a holder killed with -9
    assert not _held_by(tmp_path / "gpu.lock", tmp_path / "gpu.owner", "|127.0.0.1|29503")


def test_runs_that_use_cuda_queue_for_the_gpu_not_the_cpu(monkeypatch, tiny_config):
    from workbench.config import RunConfig
    from workbench.worker import needs_gpu

    run = RunConfig(model=copy.deepcopy(tiny_config))
    FakeCuda(monkeypatch)
    run.model.llm.device = "auto"
    assert needs_gpu(run)
    run.model.llm.device = "cpu"
    assert not needs_gpu(run)


# ---------------------------------------------------------------------------------------------- 7. devices

def test_each_rank_builds_on_its_own_gpu(monkeypatch):
    from workbench.llm import resolve_device, use_device

    cuda = FakeCuda(monkeypatch, count=2)
    _no_launcher(monkeypatch)
    assert resolve_device("auto") == torch.device("cuda", 0)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)  # explicit index kept
    with pytest.raises(ConfigError, match="has 2 GPU"):
        resolve_device("cuda:2")
    _torchrun(monkeypatch, 1)
    assert resolve_device("auto") == torch.device("cuda", 1)  # before: "cuda", i.e. cuda:0 for every rank
    assert resolve_device("cuda") == torch.device("cuda", 1)
    with pytest.raises(ConfigError, match="multi-process run"):
        resolve_device("cuda:0")  # both ranks on one GPU: refused, not silently used
    use_device(torch.device("cuda", 1))
    assert cuda.calls[-1] == ("set_device", torch.device("cuda", 1))


def test_the_model_is_built_on_the_ranks_device(monkeypatch, tiny_config):
    from workbench import model as model_module
    from workbench.model import VisionLanguageModel

    FakeCuda(monkeypatch, count=2)
    _torchrun(monkeypatch, 1)
    seen = {}

    def fake_load_llm(spec, device, peft=None):
        seen["device"] = device
        raise KeyboardInterrupt  # far enough: the LLM would be loaded onto `device`

    monkeypatch.setattr(model_module, "load_llm", fake_load_llm)
    config = copy.deepcopy(tiny_config)
    config.llm.device = "auto"
    with pytest.raises(KeyboardInterrupt):
        VisionLanguageModel.from_config(config)
    assert seen["device"] == torch.device("cuda", 1)


# ---------------------------------------------------------------------------------------------- 10b. bf16

def test_bf16_only_where_the_gpu_computes_it_natively(monkeypatch):
    from workbench.llm import autocast, cuda_has_native_bf16, resolve_dtype, training_precision

    cuda = FakeCuda(monkeypatch, capability=(7, 5))  # a T4: is_bf16_supported() says yes through emulation
    dev = torch.device("cuda", 0)
    assert torch.cuda.is_bf16_supported() and not cuda_has_native_bf16(dev)
    assert resolve_dtype("auto", dev) == torch.float16  # before: bfloat16
    assert training_precision("auto", dev) == "no"
    assert isinstance(autocast(dev, "auto"), type(__import__("contextlib").nullcontext()))
    cuda.capability = (8, 0)
    assert cuda_has_native_bf16(dev) and resolve_dtype("auto", dev) == torch.bfloat16
    assert training_precision("auto", dev) == "bf16" and training_precision("fp32", dev) == "no"


# ---------------------------------------------------------------------------------------------- 2. QLoRA

def _fake_quantized_from_pretrained(monkeypatch, tiny_llm_dir, seen):
    """from_pretrained that records its arguments and returns the tiny Llama marked as bitsandbytes-loaded."""
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    def fake(source, **kwargs):
        seen.update(kwargs)
        model = LlamaForCausalLM.from_pretrained(tiny_llm_dir, dtype=kwargs["dtype"])
        model.hf_quantizer = object()
        model.is_loaded_in_4bit = True
        return model

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", fake)
    _bitsandbytes_installed(monkeypatch)


def _bitsandbytes_installed(monkeypatch):
    """check_peft_spec sees bitsandbytes (peft itself must not, or it would import it)."""
    import importlib.util
    from types import SimpleNamespace

    from workbench import peft_modules

    real = importlib.util.find_spec
    finder = SimpleNamespace(find_spec=lambda name, *a: object() if name == "bitsandbytes" else real(name, *a))
    monkeypatch.setattr(peft_modules, "importlib", SimpleNamespace(util=finder))


def test_qlora_loads_the_llm_quantized_onto_its_gpu(monkeypatch, tiny_llm_dir):
    from workbench.llm import load_llm
    from workbench.peft_modules import attach_peft, peft_parameters

    FakeCuda(monkeypatch, count=2)
    seen: dict = {}
    _fake_quantized_from_pretrained(monkeypatch, tiny_llm_dir, seen)
    peft = PeftSpec(method="lora", options={"quantize": "4bit"})
    llm, _ = load_llm(LLMSpec(name=str(tiny_llm_dir)), torch.device("cuda", 1), peft=peft)  # no .to(cuda): CPU here
    q = seen["quantization_config"]  # before: never passed
    assert q.load_in_4bit and q.bnb_4bit_quant_type == "nf4" and q.bnb_4bit_compute_dtype == torch.bfloat16
    assert seen["device_map"] == {"": 1}
    wrapped = attach_peft(llm, peft)  # before: "QLoRA needs the LLM loaded quantized"
    base = wrapped.get_base_model()
    assert base.lm_head.weight.dtype == torch.float32  # prepare_model_for_kbit_training: head and norms in fp32
    assert all(m.weight.dtype == torch.float32 for n, m in base.named_modules() if n.endswith("norm"))
    adapters = {id(p) for p in peft_parameters(wrapped)}
    assert adapters and all(p.requires_grad == (id(p) in adapters) for p in wrapped.parameters())
    with pytest.raises(ConfigError, match="llm.frozen: true"):
        load_llm(LLMSpec(name=str(tiny_llm_dir), frozen=False), torch.device("cuda", 1), peft=peft)


def test_the_model_hands_the_peft_spec_to_the_loader(monkeypatch, tiny_config):
    from workbench import model as model_module
    from workbench.llm import load_llm
    from workbench.model import VisionLanguageModel

    FakeCuda(monkeypatch)
    _bitsandbytes_installed(monkeypatch)
    seen = {}

    def loader(spec, device, peft=None):  # stands in for the quantized load: records what it was asked
        seen["peft"] = peft
        llm, tok = load_llm(spec, device)
        llm.hf_quantizer = object()
        return llm, tok

    monkeypatch.setattr(model_module, "load_llm", loader)
    config = copy.deepcopy(tiny_config)
    config.peft = PeftSpec(method="lora", options={"quantize": "4bit"})
    model = VisionLanguageModel.from_config(config)
    assert seen["peft"] is config.peft or seen["peft"] == config.peft
    assert model.llm.get_base_model().lm_head.weight.dtype == torch.float32
    with pytest.raises(ConfigError, match="cannot train"):
        model.set_trainable(llm=True)


# ---------------------------------------------------------------------------------------------- 3. fp32 masters

def _changed_fraction(model, step_dtype_upcast: bool, example_image) -> float:
    model.set_trainable(integrator=True, llm=True)
    if step_dtype_upcast:
        model.upcast_trainable_()
    weight = model.llm.model.layers[0].self_attn.q_proj.weight
    before = weight.detach().float().clone()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-5, weight_decay=0.0)
    batch = model.prepare_batch([[{"role": "user", "content": "<image>\nwhat color is the shape?"},
                                  {"role": "assistant", "content": "red"}]], [[example_image]])
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(**batch).loss
    loss.backward()
    optimizer.step()
    return (weight.detach().float() != before).float().mean().item()


def test_full_fine_tuning_in_bf16_keeps_its_updates(tiny_config, example_image):
    from workbench.model import VisionLanguageModel

    config = copy.deepcopy(tiny_config)
    config.llm.dtype = "bfloat16"
    torch.manual_seed(0)
    model = VisionLanguageModel.from_config(config)
    assert model.llm.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
    changed = _changed_fraction(model, True, example_image)
    assert {p.dtype for p in model.llm.parameters()} == {torch.float32}  # trained: fp32 masters
    assert {p.dtype for p in model.encoder.parameters()} == {torch.bfloat16}  # frozen: as loaded
    assert changed > 0.9
    torch.manual_seed(0)
    pure = _changed_fraction(VisionLanguageModel.from_config(copy.deepcopy(config)), False, example_image)
    assert pure < 0.5  # the failure being fixed: most bf16 updates round away


# ---------------------------------------------------------------------------------------------- 8. memory

@pytest.fixture(scope="module")
def llama7b_dir(tmp_path_factory):
    """A Llama-2-7B-shaped config and a tiny tokenizer: enough to build the architecture on meta."""
    from transformers import LlamaConfig

    from conftest import make_tokenizer

    path = tmp_path_factory.mktemp("llama7b")
    LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
                tie_word_embeddings=False).save_pretrained(path)
    make_tokenizer().save_pretrained(path)
    return path


def _model_7b(tiny_config, llama7b_dir, peft="lora"):
    from workbench.model import VisionLanguageModel

    config = copy.deepcopy(tiny_config)
    config.llm = LLMSpec(name=str(llama7b_dir), device="auto")
    config.max_length = 4096
    if peft != "none":
        config.peft = PeftSpec(method=peft, r=8)
    return VisionLanguageModel.from_config(config, device="meta")


def test_a_7b_instruct_stage_at_batch_16_fits_a_141gb_gpu(monkeypatch, tiny_config, llama7b_dir):
    from workbench.training.memory import estimate_training_memory, recommend_gradient_checkpointing

    FakeCuda(monkeypatch)  # an H200: about 140 GiB, nothing used yet
    model = _model_7b(tiny_config, llama7b_dir)
    assert model.device.type == "meta" and model.llm.get_base_model().lm_head.weight.dtype == torch.bfloat16
    args = dict(batch_size=16, seq_len=768, precision="bf16", answer_len=32, gradient_checkpointing="auto")

    model.set_trainable(integrator=True, llm=False, peft=True)  # instruct stage with LoRA
    lora = estimate_training_memory(model, **args)
    assert lora.fits and not lora.gradient_checkpointing, lora.explain()
    assert 55 * GIB < lora.total < 90 * GIB, lora.explain()  # before: ~118 GiB estimated, refused
    assert lora.device == "cuda:0" and lora.available == 140 * GIB

    model.set_trainable(integrator=True, llm=True, peft=False)  # instruct stage, full LLM (fp32 masters)
    full = estimate_training_memory(model, **args)
    assert full.fits and full.gradient_checkpointing and "without it" in full.advice, full.explain()
    assert full.weights > 6.7e9 * 4 and full.gradients > 6.7e9 * 4 and full.optimizer > 6.7e9 * 8
    assert full.total < 0.9 * 140 * GIB
    assert recommend_gradient_checkpointing(model, 16, 768, "bf16", answer_len=32)
    model.set_trainable(llm=False, peft=True)
    assert not recommend_gradient_checkpointing(model, 16, 768, "bf16", answer_len=32)


def test_a_run_that_cannot_fit_is_refused_with_what_to_change(monkeypatch, tiny_config, llama7b_dir):
    from workbench.training.memory import estimate_training_memory

    FakeCuda(monkeypatch, free=79 * GIB, total=80 * GIB)  # an 80 GB GPU
    model = _model_7b(tiny_config, llama7b_dir)
    model.set_trainable(integrator=True, llm=True, peft=False)
    estimate = estimate_training_memory(model, 16, 768, "bf16", answer_len=32, gradient_checkpointing="auto")
    assert not estimate.fits and estimate.total > 100 * GIB
    assert "training.batch_size" in estimate.advice and "PEFT" in estimate.advice


def test_loaded_weights_are_not_counted_twice(monkeypatch, tiny_model):
    from workbench.training import memory

    FakeCuda(monkeypatch, free=100 * GIB, total=140 * GIB, reserved=40 * GIB)
    monkeypatch.setattr(memory, "_same_device", lambda a, b: True)  # as if the model were on cuda:0
    estimate = memory.estimate_training_memory(tiny_model, 4, 64, device="cuda:0")
    assert estimate.available == 140 * GIB  # free + what this process already holds for the model
    monkeypatch.setattr(memory, "_same_device", lambda a, b: False)  # another process's view (app, describe)
    assert memory.estimate_training_memory(tiny_model, 4, 64, device="cuda:0").available == 100 * GIB


def test_the_answer_only_head_is_costed_at_answer_positions(tiny_model):
    from workbench.training.memory import estimate_training_memory, training_lengths

    class S:
        images = ["x"]
        messages = [{"role": "user", "content": "<image>\nwhat color is the shape?"},
                    {"role": "assistant", "content": "red"}]

    seq_len, answer_len = training_lengths(tiny_model, [S(), S()])
    assert 0 < answer_len < seq_len
    full = estimate_training_memory(tiny_model, 8, seq_len)
    head = estimate_training_memory(tiny_model, 8, seq_len, answer_len=answer_len)
    assert head.logits * seq_len == full.logits * answer_len


def test_gradient_checkpointing_recomputes_layers_even_of_a_frozen_llm(tiny_model, example_image):
    model = tiny_model
    batch = model.prepare_batch([[{"role": "user", "content": "<image>\nwhat color?"},
                                  {"role": "assistant", "content": "red"}]], [[example_image]])
    attention = model.llm.model.layers[0].self_attn
    calls = []
    forward = attention.forward  # counted by wrapping, not by a hook (a hook inside a layer blocks checkpointing)
    attention.forward = lambda *a, **k: calls.append(1) or forward(*a, **k)
    model.train()
    torch.manual_seed(0)
    model(**batch).loss.backward()
    plain = [p.grad.clone() for p in model.integrator.parameters()]
    model.zero_grad()
    assert len(calls) == 1
    model.enable_gradient_checkpointing()
    model.train()  # the frozen LLM is in eval mode; its decoder layers must still checkpoint
    assert not attention.training and model.llm.model.layers[0].training
    calls.clear()
    model(**batch).loss.backward()
    assert len(calls) == 2  # recomputed in the backward pass
    for a, p in zip(plain, model.integrator.parameters()):
        torch.testing.assert_close(a, p.grad, rtol=1e-4, atol=1e-6)
    from workbench.model import is_checkpointing

    assert is_checkpointing(model.llm)
    model.enable_gradient_checkpointing(False)
    assert not is_checkpointing(model.llm)


@pytest.mark.parametrize("integrator, safe", [("gated_xattn", True), ("llama_adapter", False)])
def test_gradient_checkpointing_only_where_recomputing_a_layer_is_exact(tiny_config, example_image, integrator, safe):
    from workbench.config import IntegratorSpec
    from workbench.model import VisionLanguageModel
    from workbench.training.memory import can_checkpoint, estimate_training_memory

    config = copy.deepcopy(tiny_config)
    config.integrator = IntegratorSpec(name=integrator)
    model = VisionLanguageModel.from_config(config)
    assert can_checkpoint(model)[0] is safe
    if not safe:  # its hooks inside the layers keep per-call state: recomputation would fail or differ
        with pytest.raises(ConfigError, match="hooks into modules inside the LLM"):
            model.enable_gradient_checkpointing()
        tight = estimate_training_memory(model, 4, 64, gradient_checkpointing="auto")
        assert not tight.gradient_checkpointing
        return
    batch = model.prepare_batch([[{"role": "user", "content": "<image>\nwhat color?"},
                                  {"role": "assistant", "content": "red"}]], [[example_image]])
    model.train()
    model(**batch).loss.backward()
    plain = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    model.enable_gradient_checkpointing().train()
    model(**batch).loss.backward()
    for n, p in model.named_parameters():
        if n in plain:
            torch.testing.assert_close(p.grad, plain[n], rtol=1e-4, atol=1e-6)


def test_gradient_checkpointing_setting_round_trips(tmp_path):
    from workbench.config import RunConfig, TrainingSpec, load_run_config, save_run_config

    assert TrainingSpec().gradient_checkpointing == "auto"
    for value in (True, False, "auto"):
        save_run_config(RunConfig(training=TrainingSpec(gradient_checkpointing=value)), tmp_path / "r.yaml")
        assert load_run_config(tmp_path / "r.yaml").training.gradient_checkpointing == value
    (tmp_path / "bad.yaml").write_text("training:\n  gradient_checkpointing: sometimes\n")
    with pytest.raises(ConfigError, match="gradient_checkpointing must be auto, true or false"):
        load_run_config(tmp_path / "bad.yaml")


# ---------------------------------------------------------------------------------------------- 9. memory back

def test_release_gpu_memory_empties_the_cuda_cache(monkeypatch):
    from workbench.llm import release_gpu_memory

    cuda = FakeCuda(monkeypatch)
    release_gpu_memory()
    assert cuda.calls == [("empty_cache",)]


def test_front_ends_take_a_stated_share_of_each_gpu(monkeypatch):
    from workbench.errors import ConfigError
    from workbench.llm import INTERACTIVE_GPU_SHARE, limit_gpu_share

    cuda = FakeCuda(monkeypatch, count=2)
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction",
                        lambda share, device=None: cuda.calls.append(("share", share, device)))
    monkeypatch.delenv("WORKBENCH_GPU_SHARE", raising=False)
    assert limit_gpu_share() == INTERACTIVE_GPU_SHARE
    assert cuda.calls == [("share", INTERACTIVE_GPU_SHARE, 0), ("share", INTERACTIVE_GPU_SHARE, 1)]
    monkeypatch.setenv("WORKBENCH_GPU_SHARE", "0.5")
    assert limit_gpu_share() == 0.5
    with pytest.raises(ConfigError, match="GPU share"):
        limit_gpu_share(1.5)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert limit_gpu_share() is None  # nothing to share on a CPU


def test_model_cache_gives_the_old_model_back(monkeypatch, tiny_model, tmp_path):
    import weakref

    from workbench.frontend import ModelCache

    tiny_model.save_pretrained(tmp_path / "a")
    tiny_model.save_pretrained(tmp_path / "b")
    cache = ModelCache(memory_budget=1)  # room for one model: loading another drops the least recently used
    first = weakref.ref(cache.get(str(tmp_path / "a")))
    cuda = FakeCuda(monkeypatch)
    cache.get(str(tmp_path / "b"))
    assert first() is None and ("empty_cache",) in cuda.calls


def test_describing_a_config_loads_no_weights(monkeypatch, tiny_config):
    from workbench import frontend

    FakeCuda(monkeypatch)
    config = copy.deepcopy(tiny_config)
    config.llm.device = "auto"
    info = frontend.describe_config(config, batch_size=4)
    assert info["device"] == "cuda:0" and info["dtype"] == "torch.bfloat16"  # as it would train on the GPU
    assert info["memory"]["available"] == 140 * GIB and info["parameters"][-1]["total"] > 0


# ---------------------------------------------------------------------------------------------- 10. OOM, cache

def test_out_of_memory_becomes_one_line_of_advice():
    from workbench.config import RunConfig, StageSpec, TrainingSpec
    from workbench.training.oom import oom_reason

    error = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of "
                                   "79.1 GiB of which 1.2 GiB is free.\nIncluding non-PyTorch memory ...")
    run = RunConfig(stages=[StageSpec(llm="full")], training=TrainingSpec(batch_size=16))
    reason = oom_reason(error, run)
    assert "\n" not in reason and len(reason) <= 300
    assert reason.startswith("Out of GPU memory (tried to allocate 2.00 GiB)")
    for advice in ("batch_size (now 16", "gradient_checkpointing: true", "PEFT", "smaller LLM"):
        assert advice in reason
    assert oom_reason(ValueError("no")) is None
    wrapped = RuntimeError("step failed")
    wrapped.__cause__ = error
    assert oom_reason(wrapped).startswith("Out of GPU memory")


def test_a_run_that_runs_out_of_gpu_memory_fails_with_advice(tiny_config, tmp_path, example_image, monkeypatch):
    import signal

    from workbench import worker
    from workbench.config import DataSpec, RunConfig, StageSpec, TrainingSpec, save_run_config
    from workbench.model import VisionLanguageModel

    from conftest import image_beside

    rows = [{"id": str(i), "image": image_beside(tmp_path),
             "conversations": [{"from": "human", "value": "<image>\nwhat color is the shape?"},
                               {"from": "gpt", "value": "red"}]} for i in range(4)]
    (tmp_path / "data.json").write_text(json.dumps(rows))
    run = RunConfig(name="oom", model=copy.deepcopy(tiny_config), stages=[StageSpec(name="align", max_steps=1)],
                    data=DataSpec(kind="llava", options={"json_path": str(tmp_path / "data.json")}),
                    training=TrainingSpec(batch_size=2, cache_features=False, cache_text_states=False))
    run_dir = tmp_path / "runs" / "oom"
    run_dir.mkdir(parents=True)
    save_run_config(run, run_dir / "run.yaml")

    def forward(self, *a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB. GPU 0 ...\nmore")

    monkeypatch.setattr(VisionLanguageModel, "forward", forward)
    previous = signal.getsignal(signal.SIGTERM)
    try:
        assert worker.main([str(run_dir)], on_log=lambda row: None) == 1
    finally:
        signal.signal(signal.SIGTERM, previous)
    record = json.loads((run_dir / "exit.json").read_text())
    assert record["status"] == "failed"
    assert record["reason"].startswith("Out of GPU memory (tried to allocate 20.00 MiB)")
    assert "training.batch_size (now 2" in record["reason"]  # before: "OutOfMemoryError: CUDA out of memory. …"


class _Bf16Encoder:
    """Stands in for a frozen bf16 encoder whose activations exceed fp16's range."""

    def fingerprint(self):
        return "bf16-encoder"

    def preprocess(self, images):
        return torch.zeros(len(images), 1)

    def __call__(self, pixels):
        feats = torch.ones(pixels.shape[0], 4, 8, dtype=torch.bfloat16)
        feats[:, 0, 0] = 1e5
        return feats


def test_bf16_features_are_cached_without_overflow(tmp_path):
    from PIL import Image

    from workbench.training.feature_cache import FeatureCache

    image = Image.new("RGB", (8, 8), "red")
    expected = _Bf16Encoder()(torch.zeros(1, 1))[0]
    got = FeatureCache(_Bf16Encoder(), root=tmp_path).get([image])[0]
    assert torch.isfinite(got).all() and torch.equal(got.float(), expected.float())  # before: inf (as fp16)
    again = FeatureCache(_Bf16Encoder(), root=tmp_path).get([image])[0]  # from disk
    assert torch.equal(again.float(), expected.float())
    forced = FeatureCache(_Bf16Encoder(), root=tmp_path / "f16", dtype=torch.float16).get([image])[0]
    assert torch.isfinite(forced).all()  # asked for fp16, but not where it would overflow


def test_training_attention_uses_the_math_kernel_only_for_short_cpu_passes_with_gradients():
    from workbench.llm import SHORT_SEQUENCE, training_attention

    def kernels():
        return torch.backends.cuda.flash_sdp_enabled(), torch.backends.cuda.math_sdp_enabled()

    default = kernels()
    with training_attention("cpu", SHORT_SEQUENCE):
        assert kernels() == (False, True)  # the math kernel only
    assert kernels() == default  # restored on the way out
    for device, length in (("cpu", SHORT_SEQUENCE + 1), ("cuda", 16), ("meta", 16)):
        with training_attention(device, length):
            assert kernels() == default
    with torch.no_grad(), training_attention("cpu", 16):
        assert kernels() == default  # inference keeps sdpa's choice
