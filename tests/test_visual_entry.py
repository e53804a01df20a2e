"""Visual tokens entering the LLM above the embeddings (`model.visual_entry_layer`): the layers below see only
text, the image still decides the answer, generation with a KV cache matches generation without one, and the
text-state cache skips the text-only layers with the same loss and gradients."""
import copy

import pytest
import torch

from workbench.config import IntegratorSpec
from workbench.errors import ConfigError
from workbench.integrators.llm_layers import decoder_layers
from workbench.model import VisionLanguageModel
from workbench.peft_modules import base_llm
from workbench.training.text_state_cache import TextStateCache, frozen_text_layers

QA = [{"role": "user", "content": "<image>\nwhat color is the shape?"}, {"role": "assistant", "content": "red"}]
QB = [{"role": "user", "content": "is it round? <image>"}, {"role": "assistant", "content": "yes"}]


def _model(tiny_config, entry=1, integrator="mlp", **options):
    config = copy.deepcopy(tiny_config)
    config.visual_entry_layer = entry
    config.integrator = IntegratorSpec(name=integrator, options=options)
    torch.manual_seed(0)
    return VisionLanguageModel.from_config(config).eval()


def _inputs_of_layer(model, layer, batch):
    """The hidden states decoder `layer` works on in a forward of `batch` (its input norm's input: after the
    entry hook, which the forward registers after any hook of the test's)."""
    seen = {}
    norm = decoder_layers(base_llm(model.llm), "test")[layer].input_layernorm
    handle = norm.register_forward_pre_hook(lambda module, args: seen.setdefault("h", args[0].detach().clone()))
    try:
        with torch.no_grad():
            out = model(**batch)
    finally:
        handle.remove()
    return seen["h"], out


def test_layers_below_the_entry_see_only_text_and_the_image_still_matters(tiny_model, tiny_config, example_image,
                                                                           tmp_path):
    from PIL import Image

    other = tmp_path / "blue.png"
    Image.new("RGB", (64, 64), (0, 0, 255)).save(other)
    model = _model(tiny_config, entry=1)
    assert model.entry_layer == 1
    a = model.prepare_batch([QA], [[example_image]])
    b = model.prepare_batch([QA], [[other]])
    below_a, out_a = _inputs_of_layer(model, 0, a)
    below_b, out_b = _inputs_of_layer(model, 0, b)
    assert torch.equal(below_a, below_b)  # layer 0 gets the same input whatever the image
    # ... yet the layer-1 entry makes the logits depend on the image
    assert not torch.allclose(out_a.logits, out_b.logits)
    # and with entry at the embeddings, layer 0 does see the image
    flat = _model(tiny_config, entry=0)
    assert not torch.equal(_inputs_of_layer(flat, 0, a)[0], _inputs_of_layer(flat, 0, b)[0])


def test_the_visual_tokens_are_what_enters_the_entry_layer(tiny_config, example_image):
    model = _model(tiny_config, entry=1)
    batch = model.prepare_batch([QB], [[example_image]])
    entering, _ = _inputs_of_layer(model, 1, batch)
    visual = model.visual_tokens(model.encode_images(batch["pixel_values"]))[0]
    start = batch["input_ids"][0].tolist().index(-200)  # the placeholder's position: its tokens start there
    assert torch.allclose(entering[0, start:start + model.num_visual_tokens], visual.float(), atol=1e-6)


def test_generation_with_a_kv_cache_matches_greedy_full_forward_passes(tiny_config, example_image):
    """Generation (prompt once, then one token at a time through the KV cache) and the training path (a full
    forward over prompt + answer so far, the visual tokens entering on each) pick the same tokens."""
    model = _model(tiny_config, entry=1)
    for p in model.integrator.parameters():
        torch.nn.init.normal_(p, std=0.5)
    question = [QA[0]]
    answer = model.generate(question, [example_image], max_new_tokens=6)
    batch = model.prepare_batch([question], [[example_image]], add_generation_prompt=True)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    eos = model.llm.generation_config.eos_token_id or model.tokenizer.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos])
    tokens = []
    with torch.no_grad():
        for _ in range(6):
            logits = model(ids, mask, pixel_values=batch["pixel_values"],
                           image_to_sample=batch["image_to_sample"]).logits
            token = int(logits[0, -1].argmax())
            if token in eos:
                break
            tokens.append(token)
            ids = torch.cat([ids, torch.tensor([[token]])], 1)
            mask = torch.cat([mask, torch.ones(1, 1, dtype=mask.dtype)], 1)
    assert tokens and model.tokenizer.decode(tokens, skip_special_tokens=True).strip() == answer
    assert not any(h._forward_pre_hooks for h in decoder_layers(base_llm(model.llm), "test"))  # hook removed


@pytest.mark.parametrize("integrator, options", [("mlp", {}), ("gated_xattn", {"every": 1}),
                                                 ("lavin_mma", {"dropout": 0.0})])
def test_the_text_state_cache_skips_the_layers_below_the_entry(tiny_config, example_image, integrator, options):
    """In-LLM integrators put their modules at the entry layer and above, so the cache skips the layers below
    for them too."""
    model = _model(tiny_config, entry=1, integrator=integrator, **options).train()
    if integrator != "mlp":
        assert model.integrator.llm_layers() == [1]
        for p in model.integrator.parameters():  # open the zero-init gates: the modules must act on the loss
            torch.nn.init.normal_(p, std=0.3)
    cut, why = frozen_text_layers(model)
    assert cut == 1 and "enter at layer 1" in why
    batch = model.prepare_batch([QA, QB], [[example_image], [example_image]])
    plain = model(**batch, answer_logits_only=True)
    plain.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    cache = TextStateCache(model, cut)
    for _ in range(2):  # a miss, then a hit
        model.zero_grad()
        cached = model(**batch, answer_logits_only=True, text_states=cache)
        cached.loss.backward()
        assert torch.allclose(cached.loss, plain.loss, atol=1e-6)
        for n, p in model.named_parameters():
            if p.requires_grad:
                assert torch.allclose(p.grad, grads[n], atol=1e-6), n
    assert cache.hits == 2 and cache.misses == 2
    assert frozen_text_layers(_model(tiny_config, entry=0))[0] == 0


def test_entry_layer_range_and_counting_from_the_top(tiny_config):
    assert _model(tiny_config, entry=-1).entry_layer == 1
    with pytest.raises(ConfigError, match="decoder layers"):
        _model(tiny_config, entry=2)
    assert _model(tiny_config, entry=1, integrator="llama_adapter").entry_layer == 0  # no tokens to move


def test_the_entry_layer_survives_save_and_load(tiny_config, example_image, tmp_path):
    model = _model(tiny_config, entry=1)
    for p in model.integrator.parameters():
        torch.nn.init.normal_(p, std=0.5)
    answer = model.generate([QA[0]], [example_image], max_new_tokens=5)
    loaded = VisionLanguageModel.from_pretrained(model.save_pretrained(tmp_path / "run"))
    assert loaded.entry_layer == 1
    assert loaded.generate([QA[0]], [example_image], max_new_tokens=5) == answer


def test_a_single_stage_run_trains_through_the_cache_and_its_answers_depend_on_the_image(tiny_config,
                                                                                         example_image, tmp_path):
    from workbench.config import RunConfig, StageSpec, TrainingSpec
    from workbench.data.samples import Sample, SampleDataset
    from workbench.training.metrics import read_metrics
    from workbench.training.trainer import Trainer

    config = copy.deepcopy(tiny_config)
    config.visual_entry_layer = -1
    data = SampleDataset([Sample(QA, [example_image]), Sample(QB, [example_image])] * 4)
    run = RunConfig(model=config, stages=[StageSpec(name="tune", llm="frozen", lr=1e-2, epochs=2)],
                    training=TrainingSpec(batch_size=4, log_every=1, cache_features=False))
    Trainer(run, tmp_path / "run", datasets={"tune": data}).train()
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    cache = [r for r in rows if r["kind"] == "text_state_cache"]
    assert cache[0]["cut"] == 1 and cache[0]["check_diff"] == pytest.approx(0.0, abs=1e-6)
    assert cache[-1]["hit_rate"] > 0.5
    losses = [r["loss"] for r in rows if r["kind"] == "train"]
    assert losses[-1] < losses[0]  # the integrator learns through the entry hook
    loaded = VisionLanguageModel.from_pretrained(tmp_path / "run" / "model")
    assert loaded.entry_layer == 1


def test_attention_views_and_the_logit_lens_read_from_the_entry_layer_up(tiny_config, example_image):
    from workbench.attention import token_scores, trace_attention
    from workbench.logit_lens import decode, logit_lens

    model = _model(tiny_config, entry=1)
    trace = trace_attention(model, [QA[0]], [example_image], answer="red", relevancy=True)
    assert trace.entry_layer == 1 and trace.num_layers == 2
    # the default layer set is the entry layer and above: layer 0's attention to the placeholders is left out
    assert torch.allclose(token_scores(trace), token_scores(trace, layers=[1]))
    assert not torch.allclose(token_scores(trace, layers=[0]), token_scores(trace, layers=[1]))
    lens = logit_lens(model, [QA[0]], [example_image])
    assert lens.layer_names == ["entering layer 1", "layer 1"]
    visual = model.visual_tokens(model.encode_images(model.prepare_batch([[QA[0]]], [[example_image]])["pixel_values"]))
    expected, _ = decode(model, visual[0], top_k=5)
    assert torch.allclose(lens.probs[0], expected)  # the first row reads the tokens as they enter


def test_an_entry_layer_beyond_the_llm_is_refused_before_a_run_exists(tiny_config, tmp_path):
    from workbench.config import DataSpec, RunConfig
    from workbench.jobs import RunRegistry

    config = copy.deepcopy(tiny_config)
    config.visual_entry_layer = 5
    registry = RunRegistry(tmp_path / "runs")
    with pytest.raises(ConfigError, match="the LLM has 2 decoder layers"):
        registry.create(RunConfig(model=config, paradigm="single-stage", data=DataSpec(kind="easy-vqa")))
    assert registry.list() == []
    config.visual_entry_layer = -2  # the bottom layer, counted from the top: fine
    assert registry.create(RunConfig(model=config, paradigm="single-stage", data=DataSpec(kind="easy-vqa")))
