"""Many runs, one base (workbench.model_pool): runs that keep the same encoder and LLM frozen share those tensors in
memory, each answers exactly as when loaded alone, and a memory budget drops the least recently used run first."""
import copy
import threading
import time

import pytest
import torch

from workbench.config import IntegratorSpec, PeftSpec
from workbench.errors import ConfigError
from workbench.model import VisionLanguageModel
from workbench.model_pool import ModelPool, tensor_bytes

QUESTION = [{"role": "user", "content": "<image>\nwhat color is the shape?"}]


@pytest.fixture(scope="module")
def base_config(tiny_config, tmp_path_factory):
    """The tiny config with encoder weights from a file: the same weights on every load, as pretrained ones are."""
    import torchvision.models as tvm

    torch.manual_seed(0)
    weights = tmp_path_factory.mktemp("encoder") / "mobilenet_v3_small.pt"
    torch.save(tvm.get_model("mobilenet_v3_small").state_dict(), weights)
    config = copy.deepcopy(tiny_config)
    config.encoder.pretrained = str(weights)
    return config


def save_run(config, folder, integrator="mlp", peft="none", seed=1):
    config = copy.deepcopy(config)
    config.integrator = IntegratorSpec(name=integrator)
    if peft != "none":
        config.peft = PeftSpec(method=peft, r=4, alpha=8)
    torch.manual_seed(seed)
    model = VisionLanguageModel.from_config(config)
    with torch.no_grad():  # trained-looking parts: not their zero or identity initialisation
        for p in list(model.integrator.parameters()) + [p for n, p in model.llm.named_parameters() if "lora_" in n]:
            p.add_(0.05 * torch.randn_like(p))
    return model.save_pretrained(folder)


@pytest.fixture(scope="module")
def runs(base_config, tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    return {"prefix": save_run(base_config, root / "prefix", "mlp", seed=1),
            "in-llm+lora": save_run(base_config, root / "inllm", "gated_xattn", "lora", seed=2),
            "other": save_run(base_config, root / "other", "qformer", seed=3)}


def load(pool, folder):
    from workbench.config import load_model_config

    return pool.get(str(folder), load_model_config(folder / "config.yaml"), folder)


def answer(model, image):
    model.eval()
    tokens = model.generate(QUESTION, [image], max_new_tokens=6)
    batch = model.prepare_batch([QUESTION], [[image]], add_generation_prompt=True)
    with torch.no_grad():
        logits = model(batch["input_ids"], batch["attention_mask"], pixel_values=batch["pixel_values"],
                       image_to_sample=batch["image_to_sample"]).logits
    return tokens, logits


def test_runs_share_the_base_tensors_and_answer_as_alone(runs, example_image):
    pool = ModelPool(budget_bytes="64GB", dtype="float32")  # as loaded alone (serving in bf16: its own test)
    a, b = load(pool, runs["prefix"]), load(pool, runs["in-llm+lora"])
    embed = lambda m: m.llm.get_input_embeddings().weight  # noqa: E731
    assert embed(a).data_ptr() == embed(b).data_ptr()  # one LLM in memory
    assert next(a.encoder.parameters()).data_ptr() == next(b.encoder.parameters()).data_ptr()
    assert a.llm is not b.llm  # each run its own module tree: b's LoRA layers and hooks are not in a's
    assert not any("lora_" in n for n, _ in a.llm.named_parameters())
    assert tensor_bytes(b) > pool.loaded()[1]["own_bytes"] > 0  # b holds only its own parts
    for model, folder in ((a, runs["prefix"]), (b, runs["in-llm+lora"])):
        alone = VisionLanguageModel.from_pretrained(folder)
        assert embed(alone).data_ptr() != embed(model).data_ptr()
        shared_tokens, shared_logits = answer(model, example_image)
        alone_tokens, alone_logits = answer(alone, example_image)
        assert shared_tokens == alone_tokens
        assert torch.equal(shared_logits, alone_logits)
    assert answer(a, example_image)[1][:, -1].ne(answer(b, example_image)[1][:, -1]).any()  # different runs differ


def test_the_budget_drops_the_least_recently_used_run_and_then_the_base(runs):
    probe = ModelPool(budget_bytes="64GB")
    load(probe, runs["prefix"])
    base = probe.used_bytes - probe.loaded()[0]["own_bytes"]
    probe.clear()
    pool = ModelPool(budget_bytes=base + 1)  # room for the base and hardly anything else
    first = load(pool, runs["prefix"])
    other = load(pool, runs["other"])
    assert pool.dropped == [str(runs["prefix"])]  # least recently used out first; the one asked for stays
    assert [row["key"] for row in pool.loaded()] == [str(runs["other"])] and len(pool._bases) == 1
    again = load(pool, runs["prefix"])  # loaded again, on the base that stayed (other used it)
    assert again is not first
    embed = lambda m: m.llm.get_input_embeddings().weight.data_ptr()  # noqa: E731
    assert embed(again) == embed(other) == embed(first)  # the base was never loaded twice
    pool.clear()
    assert pool.used_bytes == 0 and not pool._bases  # no run uses the base: it went too


def test_a_run_with_a_fine_tuned_llm_keeps_its_own(base_config, tmp_path):
    config = copy.deepcopy(base_config)
    torch.manual_seed(4)
    model = VisionLanguageModel.from_config(config).set_trainable(llm=True)
    folder = model.save_pretrained(tmp_path / "full")
    pool = ModelPool(budget_bytes="64GB", dtype="float32")
    shared = load(pool, folder)
    assert torch.equal(shared.llm.get_input_embeddings().weight, model.llm.get_input_embeddings().weight)
    assert pool.loaded()[0]["own_bytes"] >= tensor_bytes(model.llm)  # its LLM counted as its own


def test_runs_answer_in_the_serving_dtype_on_their_shared_base(runs, example_image):
    pool = ModelPool(budget_bytes="64GB", dtype="bfloat16")
    a, b = load(pool, runs["prefix"]), load(pool, runs["in-llm+lora"])
    embed = lambda m: m.llm.get_input_embeddings().weight  # noqa: E731
    assert embed(a).dtype == torch.bfloat16 and embed(a).data_ptr() == embed(b).data_ptr()
    assert {p.dtype for p in a.integrator.parameters()} == {torch.float32}  # fp32 weights, cast where they meet
    for model, folder in ((a, runs["prefix"]), (b, runs["in-llm+lora"])):
        alone = VisionLanguageModel.from_pretrained(folder, dtype="bfloat16")
        assert answer(model, example_image)[0] == answer(alone, example_image)[0]
    with pytest.raises(ConfigError, match="serving dtype"):
        ModelPool(dtype="float8")


def test_the_serving_dtype_is_bf16_where_the_hardware_computes_it(monkeypatch):
    from workbench import llm

    monkeypatch.setattr(llm, "cpu_has_fast_bf16", lambda: True)
    assert llm.serving_dtype("auto", "cpu") == "bfloat16"
    assert llm.serving_dtype("float32", "cpu") == "float32"  # a run that names its dtype keeps it
    assert llm.serving_dtype("auto", "cpu", "float32") == "float32"  # the server's choice overrides
    assert llm.serving_dtype("auto", "cuda:0") == "auto"  # resolve_dtype's GPU rule: native bf16, else fp16
    monkeypatch.setattr(llm, "cpu_has_fast_bf16", lambda: False)  # emulated bf16 is slower than fp32
    assert llm.serving_dtype("auto", "cpu") == "auto" and llm.resolve_dtype("auto", torch.device("cpu")) == torch.float32


def test_the_app_cache_loads_runs_in_its_serving_dtype_and_says_so(runs):
    from workbench.frontend import ModelCache

    cache = ModelCache(dtype="bfloat16")
    try:
        model = cache.get(str(runs["prefix"]))
        assert model.dtype == torch.bfloat16 and "models answer in bfloat16" in cache.bounds()
    finally:
        cache.batcher.close()


def test_runs_on_one_base_answer_together_in_one_batch(runs, example_image, tmp_path):
    from PIL import Image

    from workbench.batching import GenerationBatcher, GenerationJob
    from workbench.model import generate_together

    pool = ModelPool(budget_bytes="64GB", dtype="float32")
    prefix, other, inllm = load(pool, runs["prefix"]), load(pool, runs["other"]), load(pool, runs["in-llm+lora"])
    assert prefix.llm_batch_key() == other.llm_batch_key()  # two prefix runs: the same LLM computation
    assert inllm.llm_batch_key() != prefix.llm_batch_key()  # LoRA and modules inside the LLM: its own
    blue = tmp_path / "blue.png"
    Image.new("RGB", (64, 64), (0, 0, 255)).save(blue)
    rows = [(prefix, example_image), (other, blue), (prefix, blue), (other, example_image)]
    together = generate_together([m for m, _ in rows], [QUESTION] * 4, [[im] for _, im in rows], max_new_tokens=6)
    assert together == [m.generate(QUESTION, [im], max_new_tokens=6) for m, im in rows]
    with pytest.raises(ConfigError, match="separately"):
        generate_together([prefix, inllm], [QUESTION] * 2, [[example_image]] * 2)

    lock = threading.Lock()
    batcher = GenerationBatcher(None, max_batch=8, batch_window=0.0, lock=lock)
    answers: dict[str, str] = {}

    def job(name, model, image):
        return GenerationJob(list(QUESTION), [image], 6, model=model,
                             sink=lambda kind, value: answers.__setitem__(name, value["text"]) if kind == "done" else None)
    try:
        with lock:  # the first job holds the worker at the lock; the next two wait, then leave as one batch
            batcher.submit(job("first", prefix, example_image))
            wait_until(lambda: batcher.generating == 1)
            batcher.submit(job("prefix", prefix, example_image))
            batcher.submit(job("other", other, blue))
        wait_until(lambda: len(answers) == 3)
        assert batcher.batches == [1, 2]
        assert [answers["prefix"], answers["other"]] == together[:2]
    finally:
        batcher.close()


def test_runs_whose_tokens_enter_above_the_embeddings_answer_together(base_config, example_image, tmp_path):
    from PIL import Image

    from workbench.model import generate_together

    entering = copy.deepcopy(base_config)
    entering.visual_entry_layer = -1
    a = save_run(entering, tmp_path / "a", "mlp", seed=4)
    b = save_run(entering, tmp_path / "b", "qformer", seed=5)
    flat = save_run(base_config, tmp_path / "flat", "mlp", seed=6)
    pool = ModelPool(budget_bytes="64GB", dtype="float32")
    a, b, flat = load(pool, a), load(pool, b), load(pool, flat)
    assert a.entry_layer == b.entry_layer == 1 and a.llm_batch_key() == b.llm_batch_key()
    assert flat.llm_batch_key() != a.llm_batch_key()  # the same tensors, another computation
    blue = tmp_path / "blue.png"
    Image.new("RGB", (64, 64), (0, 0, 255)).save(blue)
    rows = [(a, example_image), (b, blue), (a, blue)]
    together = generate_together([m for m, _ in rows], [QUESTION] * 3, [[im] for _, im in rows], max_new_tokens=6)
    assert together == [m.generate(QUESTION, [im], max_new_tokens=6) for m, im in rows]


def wait_until(condition, timeout: float = 60.0) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, "timed out"
        time.sleep(0.005)
