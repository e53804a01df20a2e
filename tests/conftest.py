"""Shared fixtures: tiny models built inside the tests (no hub, no embedded weights needed)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WORKBENCH_OFFLINE", "1")  # the test machines have no hub; never wait on it

REPO = Path(__file__).resolve().parents[1]
EXAMPLE_IMAGE = REPO / "examples" / "images" / "red_circle.png"

CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
_CORPUS = [
    "what color is the shape ? the shape is red . is there a circle in the image ? yes no",
    "describe the image . a blue triangle on a white background . a green rectangle",
    "user assistant system hello world the quick brown fox jumps over the lazy dog",
]


def make_tokenizer(chat_template: str | None = CHATML):
    """A small byte-level BPE tokenizer with ChatML specials, trained in milliseconds."""
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_CORPUS, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>", unk_token="<|endoftext|>")
    if chat_template:
        fast.chat_template = chat_template
    return fast


def make_tiny_llm_dir(path: Path, chat_template: str | None = CHATML, seed: int = 0) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = make_tokenizer(chat_template)
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    blank = [i for i in range(len(tokenizer)) if not tokenizer.decode([i], skip_special_tokens=True).strip()]
    with torch.no_grad():  # specials and blanks get logit 0 while others spread around it: greedy output is visible
        model.lm_head.weight[blank] = 0
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_llm_dir(tmp_path_factory) -> Path:
    return make_tiny_llm_dir(tmp_path_factory.mktemp("tiny-llm"))


@pytest.fixture(scope="session")
def tiny_config(tiny_llm_dir):
    """Random tiny MobileNetV3 at 64 px (2×2 grid) + MLP + tiny Llama: builds in well under a second."""
    from workbench.config import EncoderSpec, IntegratorSpec, LLMSpec, ModelConfig

    return ModelConfig(
        encoder=EncoderSpec(name="torchvision", model="mobilenet_v3_small", image_size=64),
        integrator=IntegratorSpec(name="mlp"),
        llm=LLMSpec(name=str(tiny_llm_dir), device="cpu"),
        max_length=512,
    )


@pytest.fixture()
def tiny_model(tiny_config):
    import copy

    from workbench.model import VisionLanguageModel

    torch.manual_seed(0)
    return VisionLanguageModel.from_config(copy.deepcopy(tiny_config))


@pytest.fixture(scope="session")
def example_image() -> Path:
    return EXAMPLE_IMAGE


def train_tiny(config, run_dir: Path, data, epochs: float = 2, **training) -> list[dict]:
    """Train `config` on `data` as one PEFT stage (batches of 4, a metrics row per step); the run's metrics rows."""
    from workbench.config import RunConfig, StageSpec, TrainingSpec
    from workbench.training.metrics import read_metrics
    from workbench.training.trainer import Trainer

    run = RunConfig(model=config, stages=[StageSpec(name="adapt", llm="peft", lr=1e-2, lr_llm=1e-2, epochs=epochs)],
                    training=TrainingSpec(batch_size=4, log_every=1, cache_features=False, **training))
    Trainer(run, run_dir, datasets={"adapt": data}).train()
    return read_metrics(Path(run_dir) / "metrics.jsonl")


def image_beside(folder: Path, source: Path = EXAMPLE_IMAGE) -> str:
    """Copy an image into a dataset's folder and return its relative name: data files may only name images
    inside their own folder."""
    import shutil

    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(source, folder / source.name)
    return source.name


@pytest.fixture()
def llava_data(tmp_path) -> Path:
    """Eight LLaVA rows about the example image (copied beside the JSON), all answered "red"."""
    import json

    rows = [{"id": str(i), "image": image_beside(tmp_path),
             "conversations": [{"from": "human", "value": "<image>\nwhat color is the shape?"},
                               {"from": "gpt", "value": "red"}]} for i in range(8)]
    path = tmp_path / "data.json"
    path.write_text(json.dumps(rows))
    return path
