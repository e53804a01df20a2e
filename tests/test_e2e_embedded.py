"""End-to-end on the real embedded models (MobileNetV2 + MLP + SmolLM2-135M), offline. Marked e2e."""
import subprocess
import sys
import time

import pytest
import torch

from workbench.config import ModelConfig
from workbench.model import VisionLanguageModel

pytestmark = pytest.mark.e2e
QA = [{"role": "user", "content": "<image>\nwhat color is the shape?"}, {"role": "assistant", "content": "red"}]


@pytest.fixture(scope="module")
def default_model():
    torch.manual_seed(0)
    return VisionLanguageModel.from_config(ModelConfig(), device="cpu")


def test_default_composition(default_model):
    assert default_model.encoder.grid == (7, 7) and default_model.num_visual_tokens == 49
    rows = {r["component"]: r for r in default_model.parameter_report()}
    assert 134_000_000 < rows["llm"]["total"] < 135_000_000
    assert rows["total"]["trainable"] == rows["integrator"]["total"]


def test_one_training_step_updates_only_the_integrator(default_model, example_image):
    model = default_model
    model.train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    batch = model.prepare_batch([QA, QA], [[example_image], [example_image]])
    loss = model(**batch).loss
    assert torch.isfinite(loss)
    loss.backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None}
    assert grads and all(n.startswith("integrator.") for n in grads)
    optimizer.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert changed == grads
    model.eval()


def test_generates_an_answer(default_model, example_image):
    answer = default_model.generate([QA[0]], [example_image], max_new_tokens=16)
    assert isinstance(answer, str) and len(answer.split()) >= 2


def test_text_only_chat_is_fluent(default_model):
    answer = default_model.generate([{"role": "user", "content": "What is the capital of France?"}], [], max_new_tokens=12)
    assert "Paris" in answer


def test_cli_chat_streams_offline(example_image):
    start = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "workbench.cli", "chat", "--image", str(example_image), "--max-new-tokens", "12",
         "what color is the shape?"],
        capture_output=True, text=True, timeout=300, env={**__import__("os").environ, "WORKBENCH_OFFLINE": "1"},
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()
    assert time.monotonic() - start < 120


def test_gguf_file_loads_directly():
    """The GGUF path itself (not the cached conversion) stays a working LLM source."""
    from workbench.assets import asset_path
    from workbench.config import LLMSpec
    from workbench.llm import load_llm

    model, tokenizer = load_llm(LLMSpec(name=str(asset_path("smollm2-135m-instruct")), device="cpu"))
    assert model.config.hidden_size == 576 and tokenizer.chat_template
