"""VisionLanguageModel on tiny random parts: splicing, labels, gradients, generation, save/load."""
import copy

import pytest
import torch

from workbench.data.prompting import IGNORE_INDEX
from workbench.errors import ConfigError, ImageError
from workbench.model import VisionLanguageModel, format_parameter_table

Q = [{"role": "user", "content": "<image>\nwhat color is the shape?"}]
QA = Q + [{"role": "assistant", "content": "red"}]


def test_parameter_report_adds_up(tiny_model):
    rows = {r["component"]: r for r in tiny_model.parameter_report()}
    assert rows["total"]["total"] == sum(p.numel() for p in tiny_model.parameters())
    assert rows["total"]["trainable"] == rows["integrator"]["total"] > 0
    assert rows["encoder"]["trainable"] == rows["llm"]["trainable"] == 0
    assert "integrator" in format_parameter_table(tiny_model.parameter_report())


def test_visual_tokens_are_spliced_where_the_placeholder_is(tiny_model, example_image):
    batch = tiny_model.prepare_batch([QA], [[example_image]])
    features = tiny_model.encode_images(batch["pixel_values"])
    visual = tiny_model.visual_tokens(features)
    inputs = tiny_model.splice(batch["input_ids"], batch["attention_mask"], visual, batch["labels"])
    T = tiny_model.num_visual_tokens
    assert T == 4  # 64 px MobileNetV3 → 2×2 grid
    (start, length), = inputs.image_spans[0]
    assert length == T
    assert torch.equal(inputs.inputs_embeds[0, start:start + T], visual[0])
    assert inputs.inputs_embeds.shape[1] == batch["input_ids"].shape[1] - 1 + T
    assert (inputs.labels[0, start:start + T] == IGNORE_INDEX).all()
    assert (inputs.labels != IGNORE_INDEX).sum() == (batch["labels"] != IGNORE_INDEX).sum()


def test_training_step_reaches_only_the_integrator(tiny_model, example_image):
    tiny_model.train()
    batch = tiny_model.prepare_batch([QA, QA], [[example_image], [example_image]])
    out = tiny_model(**batch)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert all(p.grad is not None for p in tiny_model.integrator.parameters())
    assert all(p.grad is None for p in tiny_model.encoder.parameters())
    assert all(p.grad is None for p in tiny_model.llm.parameters())
    assert not tiny_model.encoder.training and not tiny_model.llm.training  # frozen parts stay in eval


def test_unfrozen_llm_gets_gradients(tiny_model, example_image):
    tiny_model.set_trainable(llm=True)
    out = tiny_model(**tiny_model.prepare_batch([QA], [[example_image]]))
    out.loss.backward()
    assert any(p.grad is not None for p in tiny_model.llm.parameters())


def test_padding_does_not_change_a_sample(tiny_model, example_image):
    tiny_model.eval()
    long = [{"role": "user", "content": "<image>\nis there a circle in the image ? the quick brown fox"},
            {"role": "assistant", "content": "yes"}]
    with torch.no_grad():
        alone = tiny_model(**tiny_model.prepare_batch([QA], [[example_image]])).logits[0]
        both = tiny_model(**tiny_model.prepare_batch([QA, long], [[example_image], [example_image]])).logits[0]
    assert torch.allclose(alone, both[: alone.shape[0]], atol=1e-5)


def test_several_images_and_text_only_samples_in_one_batch(tiny_model, example_image):
    two = [{"role": "user", "content": "<image> <image> same?"}, {"role": "assistant", "content": "yes"}]
    text = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "world"}]
    batch = tiny_model.prepare_batch([two, text], [[example_image, example_image], []])
    assert batch["pixel_values"].shape[0] == 2
    assert torch.isfinite(tiny_model(**batch).loss)


def test_placeholder_count_mismatch_is_refused(tiny_model, example_image):
    with pytest.raises(ConfigError, match="placeholder"):
        tiny_model.prepare_batch([QA], [[example_image, example_image]])
    with pytest.raises(ConfigError, match="placeholder"):
        tiny_model.generate([{"role": "user", "content": "no image here"}], [example_image])


def test_bad_image_is_refused_with_its_name(tiny_model, tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(ImageError, match="broken.png"):
        tiny_model.generate(Q, [bad])


def test_too_long_conversation_is_refused(tiny_model):
    tiny_model.config.max_length = 20
    with pytest.raises(ConfigError, match="max_length"):
        tiny_model.prepare_batch([[{"role": "user", "content": "hello " * 40}]], [[]])


def test_generate_and_stream_agree(tiny_model, example_image):
    text = tiny_model.generate(Q, [example_image], max_new_tokens=8)
    streamed = "".join(tiny_model.stream(Q, [example_image], max_new_tokens=8)).strip()
    assert isinstance(text, str) and text == streamed


def test_batched_generation_matches_single(tiny_model, example_image):
    other = [{"role": "user", "content": "describe the image . the quick brown fox <image>"}]
    single = tiny_model.generate(Q, [example_image], max_new_tokens=6)
    batch = tiny_model.generate([Q, other], [[example_image], [example_image]], max_new_tokens=6)
    assert batch[0] == single and len(batch) == 2


def test_the_encoder_runs_once_per_distinct_image_in_a_batch(tiny_model, example_image, tmp_path):
    from PIL import Image

    other = tmp_path / "blue.png"
    Image.new("RGB", (64, 64), (0, 0, 255)).save(other)
    pixels = tiny_model.pixel_values([example_image, other, example_image, example_image])
    calls = []
    hook = tiny_model.encoder.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))
    try:
        features = tiny_model._encode_distinct(pixels)
    finally:
        hook.remove()
    assert calls == [2]  # two distinct images of four
    torch.testing.assert_close(features, tiny_model.encode_images(pixels))


def test_stream_raises_errors_in_the_caller(tiny_model, tmp_path):
    empty = tmp_path / "zero.png"
    empty.write_bytes(b"")
    with pytest.raises(ImageError, match="zero.png"):
        list(tiny_model.stream(Q, [empty]))


def test_save_and_load_round_trip(tiny_model, example_image, tmp_path):
    with torch.no_grad():
        for p in tiny_model.integrator.parameters():
            p.add_(0.1)  # make it differ from a fresh initialisation
    tiny_model.eval()
    batch = tiny_model.prepare_batch([QA], [[example_image]])
    with torch.no_grad():
        before = tiny_model(**batch).logits
    path = tiny_model.save_pretrained(tmp_path / "run")
    assert sorted(p.name for p in path.iterdir()) == ["config.yaml", "integrator.safetensors", "manifest.json"]
    loaded = VisionLanguageModel.from_pretrained(path)
    with torch.no_grad():
        after = loaded(**batch).logits
    assert torch.allclose(before, after, atol=1e-6)


def test_a_saved_model_keeps_its_integrator_options_when_a_default_changes(tiny_config, tmp_path, monkeypatch):
    """config.yaml holds every integrator option, defaults included: turning a default on or off later (as
    `global_token` was) must not rebuild a saved model differently from its weights."""
    from workbench.config import IntegratorSpec, load_model_config
    from workbench.integrators.abstractors import QFormer

    config = copy.deepcopy(tiny_config)
    config.integrator = IntegratorSpec(name="qformer", options={"num_queries": 3})
    path = VisionLanguageModel.from_config(config).save_pretrained(tmp_path / "run")
    saved = load_model_config(path / "config.yaml").integrator.options
    assert saved["num_queries"] == 3 and saved["global_token"] is True and saved["num_layers"] == 4
    assert config.integrator.options == {"num_queries": 3}  # the live model's config is left as given
    defaults = list(QFormer.__init__.__defaults__)
    defaults[-1] = not defaults[-1]  # global_token's default flips after the model was saved
    monkeypatch.setattr(QFormer.__init__, "__defaults__", tuple(defaults))
    loaded = VisionLanguageModel.from_pretrained(path)
    assert loaded.integrator.global_token is not None and loaded.num_visual_tokens == 3 + 1


def test_unfrozen_parts_are_saved_and_restored(tiny_model, example_image, tmp_path):
    tiny_model.set_trainable(llm=True, encoder=True)
    with torch.no_grad():
        tiny_model.llm.get_input_embeddings().weight.add_(0.5)
    path = tiny_model.save_pretrained(tmp_path / "full")
    assert (path / "llm.safetensors").is_file() and (path / "encoder.safetensors").is_file()
    loaded = VisionLanguageModel.from_pretrained(path)
    assert torch.equal(loaded.llm.get_input_embeddings().weight, tiny_model.llm.get_input_embeddings().weight)
    assert not loaded.config.llm.frozen and any(p.requires_grad for p in loaded.llm.parameters())


def test_saving_over_an_existing_directory_replaces_it(tiny_model, tmp_path):
    path = tiny_model.save_pretrained(tmp_path / "m")
    (path / "stale.txt").write_text("old")
    tiny_model.save_pretrained(path)
    assert not (path / "stale.txt").exists()


def test_loading_something_else_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="not a saved workbench model"):
        VisionLanguageModel.from_pretrained(tmp_path)


def test_mismatched_weights_are_refused(tiny_model, tiny_config, tmp_path):
    path = tiny_model.save_pretrained(tmp_path / "m")
    config_text = (path / "config.yaml").read_text()
    assert "depth: 2" in config_text  # every integrator option is saved, the defaults too
    (path / "config.yaml").write_text(config_text.replace("depth: 2", "depth: 3"))
    with pytest.raises(ConfigError, match="does not match"):
        VisionLanguageModel.from_pretrained(path)


def test_config_from_dict_and_unknown_integrator_option(tiny_config):
    from workbench.config import to_dict

    data = to_dict(copy.deepcopy(tiny_config))
    data["integrator"]["options"] = {"depht": 2}
    with pytest.raises(ConfigError, match=r"Unknown option 'depht'.*Valid options: depth"):
        VisionLanguageModel.from_config(data)


def test_answer_logits_only_gives_the_same_loss_and_gradients(tiny_model, example_image):
    long = [{"role": "user", "content": "<image>\nis there a circle in the image ? the quick brown fox"},
            {"role": "assistant", "content": "yes it is"}]
    batch = tiny_model.prepare_batch([QA, long], [[example_image], [example_image]])
    full = tiny_model(**batch)
    full.loss.backward()
    grads = [p.grad.clone() for p in tiny_model.integrator.parameters()]
    tiny_model.zero_grad()
    fast = tiny_model(**batch, answer_logits_only=True)
    fast.loss.backward()
    assert torch.allclose(full.loss, fast.loss, atol=1e-5)
    assert fast.logits.shape[1] < full.logits.shape[1]
    for g, p in zip(grads, tiny_model.integrator.parameters()):
        assert torch.allclose(g, p.grad, atol=1e-6)


def test_generation_runs_in_inference_mode_and_restores_the_mode(tiny_config, example_image, tmp_path):
    """A model fresh from from_config is in training mode; with a batch-statistics feature standardiser, an answer
    must still not depend on the rest of its batch, and generating must not move the running statistics."""
    import copy

    from PIL import Image

    from workbench.model import VisionLanguageModel

    config = copy.deepcopy(tiny_config)
    config.integrator.options = {"input_norm": "batch"}
    torch.manual_seed(0)
    model = VisionLanguageModel.from_config(config)
    assert model.training
    norm = next(m for m in model.integrator.modules() if isinstance(m, torch.nn.BatchNorm1d))
    with torch.no_grad():  # running statistics that differ from any one batch's
        norm.running_mean.normal_()
        norm.running_var.uniform_(0.5, 2.0)
    stats = (norm.running_mean.clone(), norm.running_var.clone(), int(norm.num_batches_tracked))
    blue = tmp_path / "blue.png"
    Image.new("RGB", (64, 64), (0, 0, 255)).save(blue)
    single = model.generate(Q, [example_image], max_new_tokens=6)
    batch = model.generate([Q, Q], [[example_image], [blue]], max_new_tokens=6)
    assert batch[0] == single
    assert torch.equal(norm.running_mean, stats[0]) and torch.equal(norm.running_var, stats[1])
    assert int(norm.num_batches_tracked) == stats[2] and model.training
