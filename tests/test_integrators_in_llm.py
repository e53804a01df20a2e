"""In-LLM integrators (gated_xattn, lavin_mma, llama_adapter): zero-init exactness, the generic hook
mechanism on Llama / Qwen2 / Mistral, gradients, save/load, generation with the KV cache, LoRA, attention
records, and the trainable fraction on a SmolLM2-135M-shaped LLM. The contract tests take every registered
in-LLM family (`families()`), a new one included; what only one family does is checked by name."""
import copy

import pytest
import torch
from safetensors.torch import load_file

from workbench.config import IntegratorSpec, PeftSpec
from workbench.errors import ConfigError
from workbench.integrators import INTEGRATORS, IntegratorContext, build_integrator
from workbench.integrators.llm_layers import InLLMIntegrator
from workbench.model import VisionLanguageModel
from workbench.peft_modules import base_llm, peft_parameters



def families() -> list[str]:
    """Every registered in-LLM family: what the contract tests below run on."""
    return INTEGRATORS.names(placement="in_llm")


NAMES = families()
TEXT_ROWS_CHANGE = {"gated_xattn": False, "lavin_mma": True, "llama_adapter": True}
"""Whether a family acts on rows without an image: gated cross-attention attends only to images; LaVIN's
textual adapter path and LLaMA-Adapter's prompts act on every row."""
Q = [{"role": "user", "content": "<image>\nwhat color is the shape?"}]
QA = Q + [{"role": "assistant", "content": "red"}]
TEXT = [{"role": "user", "content": "describe the quick brown fox ."}]
TEXT_A = TEXT + [{"role": "assistant", "content": "the fox jumps"}]


def build(tiny_config, name: str, peft: str = "none", dtype: str = "auto", **options) -> VisionLanguageModel:
    config = copy.deepcopy(tiny_config)
    config.integrator = IntegratorSpec(name=name, options=options)
    config.llm.dtype = dtype
    if peft != "none":
        config.peft = PeftSpec(method=peft, r=4, alpha=8)
    torch.manual_seed(0)
    return VisionLanguageModel.from_config(config)


def perturb(integrator, scale: float = 0.5) -> None:
    """Move the zero-initialised tensors (gates, LaVIN's up-projections) off zero."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in integrator.parameters():
            if not p.any():
                p.copy_(scale * torch.randn(p.shape, generator=generator))


def plain_logits(model, batch) -> torch.Tensor:
    """The same call with the integrator's hooks removed: the plain LLM on the same input embeddings."""
    model.integrator.detach()
    try:
        with torch.no_grad():
            return model(**batch).logits
    finally:
        model.integrator.attach(base_llm(model.llm))


def logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).logits


@pytest.mark.parametrize("name", NAMES)
def test_zero_init_is_exact_and_rows_without_images_are_untouched(name, tiny_config, example_image):
    model = build(tiny_config, name).eval()
    info = INTEGRATORS.info(name)
    assert info["placement"] == "in_llm" == model.integrator.placement and model.integrator.registry_name == name
    assert model.integrator.attached and model.integrator.llm_parameters() == []
    hooks = len(model.integrator._hooks)
    model.integrator.attach(base_llm(model.llm))  # idempotent: no second set of hooks
    assert len(model.integrator._hooks) == hooks > 0
    assert not any(n.startswith("llm.") for n, _ in model.integrator.named_parameters())

    text = model.prepare_batch([TEXT_A], [[]])
    image = model.prepare_batch([QA, TEXT_A], [[example_image], []])
    for batch in (text, image):
        assert torch.allclose(logits(model, batch), plain_logits(model, batch), atol=1e-5)

    perturb(model.integrator)
    with_image, plain = logits(model, image), plain_logits(model, image)
    assert not torch.allclose(with_image[0], plain[0], atol=1e-3)  # the image row now sees the image
    if TEXT_ROWS_CHANGE.get(name) is False:  # only image rows are cross-attended; text-only rows stay the LLM's
        assert torch.allclose(with_image[1], plain[1], atol=1e-5)
        assert torch.allclose(logits(model, text), plain_logits(model, text), atol=1e-5)
    elif TEXT_ROWS_CHANGE.get(name):
        assert not torch.allclose(logits(model, text), plain_logits(model, text), atol=1e-3)

    model.integrator.detach()
    assert len(model.integrator._hooks) == 0 and not model.integrator.attached


def _arch(kind: str):
    import transformers

    common = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128)
    cls = {"llama": "Llama", "qwen2": "Qwen2", "mistral": "Mistral"}[kind]
    config = getattr(transformers, f"{cls}Config")(**common)
    torch.manual_seed(0)
    return getattr(transformers, f"{cls}ForCausalLM")(config).eval()


@pytest.mark.parametrize("kind", ["llama", "qwen2", "mistral"])
@pytest.mark.parametrize("name", NAMES)
def test_generic_mechanism_on_llama_qwen2_mistral(name, kind):
    llm = _arch(kind)
    context = IntegratorContext(vision_dim=32, num_input_tokens=4, grid=(2, 2), has_cls=False, llm_hidden=64,
                                llm_config=llm.config)
    torch.manual_seed(0)
    integrator = build_integrator(IntegratorSpec(name=name, options={"every": 2} if name == "gated_xattn" else {}),
                                  context).eval()
    integrator.attach(llm)
    embeds = torch.randn(2, 6, 64)
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[1, :2] = 0  # left padding on the text-only row
    features = torch.randn(2, 4, 32)
    rows = torch.tensor([0, 0])  # row 0 has two images, row 1 none

    def run():
        integrator.set_visual_context(features, rows)
        try:
            with torch.no_grad():
                return llm(inputs_embeds=embeds, attention_mask=mask).logits
        finally:
            integrator.set_visual_context(None, None)

    def plain():
        integrator.detach()
        with torch.no_grad():
            out = llm(inputs_embeds=embeds, attention_mask=mask).logits
        integrator.attach(llm)
        return out

    reference = plain()
    assert torch.allclose(run(), reference, atol=1e-5)
    perturb(integrator)
    changed = run()
    assert not torch.allclose(changed[0], reference[0], atol=1e-3)
    if name in TEXT_ROWS_CHANGE:
        assert torch.allclose(changed[1, 2:], reference[1, 2:], atol=1e-5) != TEXT_ROWS_CHANGE[name]

    # KV cache: decode steps see one token and the same per-row context as a full forward
    def generate(use_cache: bool):
        integrator.set_visual_context(features, rows)
        try:
            with torch.no_grad():
                return llm.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=4, do_sample=False,
                                    use_cache=use_cache, pad_token_id=0)
        finally:
            integrator.set_visual_context(None, None)

    assert torch.equal(generate(True), generate(False))


def test_unsupported_architectures_and_contexts_are_refused():
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=2, n_positions=64))
    context = IntegratorContext(vision_dim=8, num_input_tokens=4, grid=(2, 2), has_cls=False, llm_hidden=32,
                                llm_config=gpt2.config)
    for name in NAMES:
        with pytest.raises(ConfigError, match=f"Integrator '{name}' supports Llama-like decoders.*'gpt2'"):
            build_integrator(IntegratorSpec(name=name), context).attach(gpt2)
        with pytest.raises(ConfigError, match="needs the LLM's config"):
            build_integrator(IntegratorSpec(name=name), IntegratorContext(8, 4, (2, 2), False, 32))
    llama = _arch("llama")
    small = IntegratorContext(8, 4, (2, 2), False, 64, llm_config=_arch("llama").config)
    with pytest.raises(ConfigError, match="Unknown option 'bottleneck' for integrator 'gated_xattn'"):
        build_integrator(IntegratorSpec(name="gated_xattn", options={"bottleneck": 4}), small)
    with pytest.raises(ConfigError, match="layers must be 'all' or an integer"):
        build_integrator(IntegratorSpec(name="lavin_mma", options={"layers": "some"}), small)
    assert build_integrator(IntegratorSpec(name="lavin_mma", options={"layers": 2}), small).adapted_layers == [0, 2]
    other = copy.deepcopy(llama.config)
    other.num_hidden_layers = 5
    with pytest.raises(ConfigError, match="built for an LLM with 5 layers; this one has 3"):
        build_integrator(IntegratorSpec(name="llama_adapter"),
                         IntegratorContext(8, 4, (2, 2), False, 64, llm_config=other)).attach(llama)


@pytest.mark.parametrize("name", NAMES)
def test_gradients_reach_exactly_the_integrator(name, tiny_config, example_image):
    model = build(tiny_config, name)
    model.train()
    assert not model.llm.training  # frozen LLM: eval; the integrator's modules train
    assert model.integrator.training
    batch = model.prepare_batch([QA, TEXT_A], [[example_image], []])
    if name == "llama_adapter":  # no tokens in the sequence: the placeholder is removed
        single = model.prepare_batch([QA], [[example_image]])
        assert model.num_visual_tokens == 0
        assert model(**single).logits.shape[1] == single["input_ids"].shape[1] - 1
    model(**batch).loss.backward()
    params = dict(model.integrator.named_parameters())
    assert all(p.grad is not None for p in params.values())
    assert all(p.grad is None for p in model._llm_own_parameters())
    assert all(p.grad is None for p in model.encoder.parameters())
    gates = [n for n in params if "alpha" in n or n == "gates"]
    assert all(params[n].grad.abs().sum() > 0 for n in gates)  # gates at 0 still learn

    model.zero_grad(set_to_none=True)
    perturb(model.integrator, scale=0.1)
    model(**batch).loss.backward()
    silent = [n for n, p in params.items() if p.grad is None or not p.grad.any()]
    assert silent == []
    assert all(p.grad is None for p in model._llm_own_parameters())

    # one optimizer step changes the output, and only through the integrator
    before = logits(model.eval(), batch)
    with torch.no_grad():
        for p in params.values():
            p.sub_(1e-2 * p.grad.sign())
    assert not torch.allclose(before, logits(model, batch), atol=1e-4)


def test_gated_xattn_global_token_is_a_whole_image_latent_read_first(tiny_config, example_image):
    """The global token: one more latent, first, the patches' average (a CLS left out), trained through the
    blocks, with a uniform row over the patches in the recorded latent→token map."""
    plain, model = build(tiny_config, "gated_xattn", global_token=False), build(tiny_config, "gated_xattn")
    integ = model.integrator
    perturb(integ)
    integ.record_attention = True
    batch = model.prepare_batch([QA, TEXT_A], [[example_image], []])
    logits(model, batch)
    rec = integ.last_attention
    n = integ.context.num_input_tokens
    latents = rec.latent_to_image[0]
    assert latents.shape[-2:] == (17, n) and plain.integrator.resampler.whole_image is None
    assert torch.allclose(latents.sum(-1), torch.ones(()), atol=1e-5)
    patches = integ.context.grid[0] * integ.context.grid[1]
    assert torch.allclose(latents[..., 0, n - patches:], torch.full((patches,), 1 / patches))
    assert not latents[..., 0, :n - patches].any()  # a CLS token is not part of the average
    assert all(rec.text_to_latent[i].shape[-1] == 17 for i in integ.block_layers)
    features = torch.randn(2, n, integ.context.vision_dim)
    shuffled = torch.cat([features[:, :n - patches], features[:, n - patches + torch.randperm(patches)]], dim=1)
    with torch.no_grad():  # where things are does not matter to it
        assert torch.allclose(integ.resampler(features)[0][:, 0], integ.resampler(shuffled)[0][:, 0], atol=1e-5)
    model.train()
    model(**batch).loss.backward()
    assert all(p.grad is not None and p.grad.any() for p in integ.resampler.whole_image.parameters())


def test_llama_adapter_media_marker_option(tiny_config, example_image):
    model = build(tiny_config, "llama_adapter", media_marker=True).eval()
    assert model.num_visual_tokens == 1
    single = model.prepare_batch([QA], [[example_image]])
    out = logits(model, single)
    assert out.shape[1] == single["input_ids"].shape[1]
    assert torch.allclose(out, plain_logits(model, single), atol=1e-5)
    assert model.generate(Q, [example_image], max_new_tokens=3)


@pytest.mark.parametrize("name", NAMES)
def test_save_and_load_round_trip(name, tiny_config, example_image, tmp_path):
    model = build(tiny_config, name).eval()
    perturb(model.integrator)
    batch = model.prepare_batch([QA, TEXT_A], [[example_image], []])
    before = logits(model, batch)
    path = model.save_pretrained(tmp_path / "m")
    saved = load_file(str(path / "integrator.safetensors"))
    assert set(saved) == set(model.integrator.state_dict())  # the modules, not the LLM
    assert not (path / "llm.safetensors").exists()
    torch.manual_seed(0)  # the tiny encoder is random: rebuild it alike
    loaded = VisionLanguageModel.from_pretrained(path).eval()
    assert torch.allclose(before, logits(loaded, batch), atol=1e-6)
    fresh = build(tiny_config, name).eval()
    assert not torch.allclose(before, logits(fresh, batch), atol=1e-4)


@pytest.mark.parametrize("name", NAMES)
def test_generation_with_cache_and_batches(name, tiny_config, example_image):
    model = build(tiny_config, name).eval()
    perturb(model.integrator)
    cached = model.generate(Q, [example_image], max_new_tokens=6)
    assert isinstance(cached, str) and cached
    assert model.generate(Q, [example_image], max_new_tokens=6, use_cache=False) == cached
    assert not model.integrator.has_visual_context  # cleared after the call
    text_only = model.generate(TEXT, [], max_new_tokens=6)
    # two prompts of different length, left padded, one with and one without an image
    pair = model.generate([Q, TEXT], [[example_image], []], max_new_tokens=6)
    assert pair == [cached, text_only]
    swapped = model.generate([TEXT, Q], [[], [example_image]], max_new_tokens=6)
    assert swapped == [text_only, cached]


@pytest.mark.parametrize("name", NAMES)
def test_works_on_a_lora_wrapped_llm(name, tiny_config, example_image):
    model = build(tiny_config, name, peft="lora").eval()
    assert model.integrator.attached
    batch = model.prepare_batch([QA, TEXT_A], [[example_image], []])
    assert torch.allclose(logits(model, batch), plain_logits(model, batch), atol=1e-5)
    perturb(model.integrator)
    with torch.no_grad():
        for p in peft_parameters(model.llm):
            p.add_(0.1 * torch.randn_like(p))
    assert not torch.allclose(logits(model, batch), plain_logits(model, batch), atol=1e-3)

    model.train()
    model(**batch).loss.backward()
    assert all(p.grad is not None and p.grad.any() for p in peft_parameters(model.llm))
    assert all(p.grad is not None and p.grad.any() for p in model.integrator.parameters())
    assert all(p.grad is None for p in model._llm_own_parameters())
    model.eval()
    out = model.generate(Q, [example_image], max_new_tokens=5)
    assert out == model.generate(Q, [example_image], max_new_tokens=5, use_cache=False)


@pytest.mark.parametrize("name", NAMES)
def test_record_attention(name, tiny_config, example_image):
    model = build(tiny_config, name).eval()
    perturb(model.integrator)
    model.integrator.record_attention = True
    batch = model.prepare_batch([QA, TEXT_A], [[example_image], []])
    logits(model, batch)
    rec = model.integrator.last_attention
    assert rec
    ones = lambda t: torch.allclose(t.sum(-1), torch.ones(()), atol=1e-5)  # noqa: E731
    if name == "gated_xattn":
        latents = rec.latent_to_image[0]  # the resampler's one layer
        assert ones(latents) and latents.shape[-2:] == (16 + 1, model.integrator.context.num_input_tokens)  # + global
        layers = model.integrator.block_layers
        for i in layers:
            attn = rec.text_to_latent[i]
            assert attn.shape[:2] == (2, 4) and attn.shape[-1] == 16 + 1
            assert ones(attn[0]) and not attn[1].any()  # the text-only row attends to nothing
            assert rec.gates[i].shape == () and -1 < float(rec.gates[i]) < 1
            alpha = model.integrator.blocks[str(i)].alpha_attn.detach()
            assert float(rec.gates[i]) == pytest.approx(float(torch.tanh(alpha)))
    elif name == "lavin_mma":
        routes = list(rec.routes)
        assert len(routes) == 2 * len(model.integrator.adapted_layers)
        for k in routes:
            assert rec.routes[k].shape == (2, 2) and ones(rec.routes[k])
            assert not torch.allclose(rec.routes[k][0], rec.routes[k][1])  # image and text-only rows differ
    elif name == "llama_adapter":
        heads = model.llm.config.num_attention_heads
        for i in model.integrator.adapted_layers:
            assert rec.text_to_prompt[i].shape[:2] == (2, heads) and rec.text_to_prompt[i].shape[-1] == 10
            assert ones(rec.text_to_prompt[i]) and rec.gates[i].shape == (heads,)
    model.integrator.record_attention = False


@pytest.mark.parametrize("name", NAMES)
def test_bf16_llm_autocast_and_copies(name, tiny_config, example_image):
    import pickle

    model = build(tiny_config, name, dtype="bfloat16").eval()
    assert model.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in model.integrator.parameters())  # fp32 master weights
    batch = model.prepare_batch([QA, TEXT_A], [[example_image], []])
    assert torch.equal(logits(model, batch), plain_logits(model, batch))  # zero-init is exact in bf16 too
    perturb(model.integrator)
    model.train()
    out = model(**batch)
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.loss)
    out.loss.backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.integrator.parameters())
    model.eval()
    assert model.generate(Q, [example_image], max_new_tokens=3)

    fp32 = build(tiny_config, name).train()  # bf16 autocast over an fp32 LLM, as the trainer runs on CUDA
    perturb(fp32.integrator)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = fp32(**batch).loss
    loss.backward()
    assert all(p.grad is not None for p in fp32.integrator.parameters())

    hooks = len(model.integrator._hooks)
    clone = copy.deepcopy(model.integrator)  # copies and pickles leave the hooks with the original
    assert not clone.attached and model.integrator.attached and len(model.integrator._hooks) == hooks
    assert set(clone.state_dict()) == set(model.integrator.state_dict())
    assert pickle.loads(pickle.dumps(model.integrator)).num_tokens == model.integrator.num_tokens


def test_trainable_fraction_on_a_smollm2_shaped_llm():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True)
    with torch.device("meta"):
        llm_params = sum(p.numel() for p in LlamaForCausalLM(config).parameters())
    assert 134_000_000 < llm_params < 135_000_000
    context = IntegratorContext(vision_dim=1280, num_input_tokens=49, grid=(7, 7), has_cls=False, llm_hidden=576,
                                llm_config=config)
    counts, built = {}, {}
    for name in ("gated_xattn", "lavin_mma", "llama_adapter"):
        with torch.device("meta"):
            built[name] = build_integrator(IntegratorSpec(name=name), context)
        assert isinstance(built[name], InLLMIntegrator)
        counts[name] = sum(p.numel() for p in built[name].parameters())
    print({n: (c, f"{100 * c / llm_params:.2f}%") for n, c in counts.items()})
    assert counts["lavin_mma"] < 0.02 * llm_params and counts["llama_adapter"] < 0.02 * llm_params
    assert built["gated_xattn"].block_layers == [0, 4, 8, 12, 16, 20, 24, 28]
    assert len(built["lavin_mma"].adapters) == 60 and built["llama_adapter"].adapted_layers == list(range(22, 30))


# The fast easy-VQA recipe (examples/configs/fast_easyvqa.yaml) trains llama_adapter at its default options.
# These losses were recorded with llama_adapter.py as it was before issue 16 removed its experiment options
# (visual_grid, fusion_*, input_norm; commit 8f8c89c), for the setup below; the old and the new code were also
# compared bit for bit then (initial weights, losses, logits, gradients, generation), here and on the embedded
# recipe model. Re-record only after checking that code gives the new numbers too.
RECORDED_LOSSES = [5.94895076751709, 5.882429599761963, 5.754145622253418, 5.642005920410156]
RECORDED_KEYS = ["prompts", "gates", "visual_proj.0.weight", "visual_proj.0.bias", "visual_proj.1.weight",
                 "visual_proj.1.bias"]


def test_llama_adapter_trains_the_model_it_trained_before_its_options_were_removed(tiny_config, example_image):
    """Seed, data and steps as when the losses were recorded: the recipe's integrator options, LoRA only in the
    top layer as the recipe has it, an image row, a two-image row and a text-only row, four AdamW steps over the
    integrator and the LoRA."""
    config = copy.deepcopy(tiny_config)
    config.integrator = IntegratorSpec(name="llama_adapter", options={"prompt_length": 10, "num_layers": 8})
    config.peft = PeftSpec(method="lora", r=4, alpha=8, dropout=0.0, options={"layers_to_transform": [1]})
    torch.manual_seed(0)
    model = VisionLanguageModel.from_config(config)
    assert list(model.integrator.state_dict()) == RECORDED_KEYS  # checkpoints saved before still load
    two = [{"role": "user", "content": "<image> and <image>\nis there a circle in the image?"},
           {"role": "assistant", "content": "yes"}]
    batch = model.prepare_batch([QA, two, TEXT_A], [[example_image], [example_image] * 2, []])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    losses = []
    for _ in RECORDED_LOSSES:
        optimizer.zero_grad()
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses == pytest.approx(RECORDED_LOSSES, rel=1e-5)


def test_removed_llama_adapter_options_are_refused_by_name(tiny_config):
    with pytest.raises(ConfigError, match="Unknown option 'visual_grid'.*Valid options: prompt_length, num_layers"):
        build(tiny_config, "llama_adapter", visual_grid=1)
