"""Exports: plain-transformers LLaVA round trips on tiny random parts built here (CLIP / SigLIP / open_clip towers,
MLP, tiny Llama, with and without LoRA), blocked exports naming their reasons, merged and workbench formats,
the model card's evaluation numbers from a real (tiny) run, and the LLaVA-1.5-like example from stand-ins."""
from __future__ import annotations

import copy
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from workbench.config import (DataSpec, EncoderSpec, IntegratorSpec, LLMSpec, ModelConfig, PeftSpec, RunConfig,
                              StageSpec, TrainingSpec, load_run_config, save_run_config)
from workbench.errors import ConfigError
from workbench.export import (HFLlavaBlocked, check_image, compare, export, transformers_reference,
                              workbench_reference)
from workbench.model import VisionLanguageModel

from conftest import make_tokenizer

TINY_VISION = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37, image_size=32,
                   patch_size=8)
LLAVA_MLP = {"input_norm": False, "output_norm": False}
QUESTION = "what color is the shape?"


@pytest.fixture(scope="module")
def towers(tmp_path_factory):
    from transformers import CLIPVisionConfig, CLIPVisionModel, SiglipVisionConfig, SiglipVisionModel

    root = tmp_path_factory.mktemp("towers")
    torch.manual_seed(0)
    CLIPVisionModel(CLIPVisionConfig(**TINY_VISION)).save_pretrained(root / "clip")
    SiglipVisionModel(SiglipVisionConfig(**TINY_VISION)).save_pretrained(root / "siglip")
    oc = root / "wb-export-tiny-vit.json"
    oc.write_text(json.dumps({"embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": 3, "width": 32,
                                                              "patch_size": 8, "head_width": 16},
                              "text_cfg": {"context_length": 16, "vocab_size": 100, "width": 32, "heads": 2,
                                           "layers": 1}}))
    return {"clip": str(root / "clip"), "siglip": str(root / "siglip"), "open_clip": str(oc)}


def _model(llm_dir, encoder: EncoderSpec, options=None, peft: str = "none", seed: int = 0,
           system_prompt: str | None = None):
    """A tiny model whose every trained part is random and non-trivial (LoRA's B starts at zero: perturbed)."""
    from workbench.peft_modules import peft_parameters

    config = ModelConfig(encoder=encoder, integrator=IntegratorSpec(name="mlp", options=dict(options or LLAVA_MLP)),
                         llm=LLMSpec(name=str(llm_dir), device="cpu"), peft=PeftSpec(method=peft), max_length=512,
                         system_prompt=system_prompt)
    torch.manual_seed(seed)
    model = VisionLanguageModel.from_config(config)
    with torch.no_grad():
        for p in peft_parameters(model.llm):
            p.normal_(0.0, 0.3)
        norm = model.integrator.norm
        if hasattr(norm, "running_mean"):  # a "batch" standardiser with statistics gathered in training
            norm.running_mean.normal_()
            norm.running_var.uniform_(0.5, 2.0)
    return model.eval()


def _clip(towers, **kw) -> EncoderSpec:
    return EncoderSpec(name="clip", model=towers["clip"], layer=kw.pop("layer", -2), **kw)


def _wide_image() -> Image.Image:
    rng = np.random.default_rng(1)
    return Image.fromarray(rng.integers(0, 255, (40, 56, 3), dtype=np.uint8))


# ---------------------------------------------------------------- hf-llava round trips

@pytest.mark.parametrize("peft", ["none", "lora"])
def test_hf_llava_round_trip_with_plain_transformers(tiny_llm_dir, towers, tmp_path, peft):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    system = "Answer about the picture, \"briefly\"." if peft == "lora" else None  # the card's template adds it too
    model = _model(tiny_llm_dir, _clip(towers), peft=peft, system_prompt=system)
    saved = model.save_pretrained(tmp_path / "saved")
    image = check_image(32)
    reference = workbench_reference(model, image, QUESTION, max_new_tokens=8)
    if peft == "lora":  # the adapter really changes the answer's logits, so merging it is what is tested
        plain = workbench_reference(_model(tiny_llm_dir, _clip(towers), system_prompt=system), image, QUESTION,
                                    max_new_tokens=8)
        assert (plain["logits"] - reference["logits"]).abs().max() > 1e-2

    result = export(saved, "hf-llava", tmp_path / "llava")
    assert result.check["same_tokens"] and result.check["within_tolerance"]
    config = json.loads((result.path / "config.json").read_text())
    assert config["model_type"] == "llava" and "auto_map" not in config
    assert config["vision_feature_layer"] == -2 and config["vision_feature_select_strategy"] == "default"
    assert config["image_seq_length"] == model.num_visual_tokens == 16

    # what a user of plain transformers does, no trust_remote_code, no workbench
    llava = LlavaForConditionalGeneration.from_pretrained(result.path).eval()
    processor = AutoProcessor.from_pretrained(result.path)
    exported = transformers_reference(result.path, image, QUESTION, max_new_tokens=8, model=llava,
                                      processor=processor)
    check = compare(reference, exported)
    assert check["max_abs_diff"] < 1e-4, check
    assert exported["tokens"] == reference["tokens"] and len(reference["tokens"]) > 0
    # the prompt is tokenized as the workbench tokenizes it, the image placeholder expanded to its visual tokens
    messages = [{"role": "user", "content": "<image>\n" + QUESTION}]
    ids = model.encode_conversation(messages, 1, add_generation_prompt=True).input_ids
    image_id = llava.config.image_token_id
    expanded = [t for i in ids for t in ([image_id] * 16 if i < 0 else [i])]
    assert exported["input_ids"] == expanded
    # non-square pictures are padded with the mean colour as the workbench pads them
    wide = _wide_image()
    pixels = processor(images=[wide], text="<image>", return_tensors="pt")["pixel_values"]
    assert (pixels - model.pixel_values([wide])).abs().mean() < 2e-3
    # a plain string message works too, through the same chat template
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    with_system = ([{"role": "system", "content": system}] if system else []) + messages
    assert text == model.formatter.render(with_system, add_generation_prompt=True)
    assert (system or "") in text


@pytest.mark.parametrize("variant", ["siglip-batchnorm-silu", "clip-cls-layer0-resize", "open_clip"])
def test_hf_llava_other_towers_and_projector_options(tiny_llm_dir, towers, tmp_path, variant):
    if variant == "siglip-batchnorm-silu":
        encoder = EncoderSpec(name="siglip", model=towers["siglip"], layer=-1)
        options, strategy, tokens = {"input_norm": "batch", "output_norm": False, "activation": "silu"}, "full", 16
    elif variant == "clip-cls-layer0-resize":
        encoder = _clip(towers, layer=0, use_cls=True, image_aspect="resize")
        options, strategy, tokens = LLAVA_MLP, "full", 17
    else:
        encoder = EncoderSpec(name="open_clip", model_config=towers["open_clip"], layer=-2, weights="random")
        options, strategy, tokens = LLAVA_MLP, "default", 16
    model = _model(tiny_llm_dir, encoder, options)
    result = export(model.save_pretrained(tmp_path / "saved"), "hf-llava", tmp_path / "llava")
    assert result.check["same_tokens"] and result.check["within_tolerance"], result.check
    config = json.loads((result.path / "config.json").read_text())
    assert config["vision_feature_select_strategy"] == strategy and config["image_seq_length"] == tokens
    if variant == "open_clip":  # converted: only the blocks up to the chosen one, the last one's output
        assert config["vision_config"]["model_type"] == "clip_vision_model"
        assert config["vision_config"]["num_hidden_layers"] == 2 and config["vision_feature_layer"] == -1


def test_blocked_export_names_every_reason(tiny_config, tmp_path):
    config = copy.deepcopy(tiny_config)
    config.integrator.options = {"depth": 3}
    config.visual_entry_layer = -1  # a model LLaVA cannot express: the tokens enter above the embeddings
    torch.manual_seed(0)
    saved = VisionLanguageModel.from_config(config).save_pretrained(tmp_path / "saved")
    with pytest.raises(HFLlavaBlocked) as info:
        export(saved, "hf-llava", tmp_path / "llava")
    message = str(info.value)
    assert len(message.splitlines()) == 1 and len(info.value.reasons) == 5
    assert "enter the LLM at decoder layer -1 (`model.visual_entry_layer`)" in message
    assert "encoder 'torchvision' (mobilenet_v3_small) is not a ViT" in message
    assert ("input LayerNorm in the projector has no place in LlavaMultiModalProjector: train with "
            "`input_norm: false`") in message
    assert "`output_norm: false`" in message and "`depth: 2`" in message
    assert "--format merged" in message
    assert not (tmp_path / "llava").exists() and not list(tmp_path.glob(".llava-*"))


def test_blocked_by_an_unmergeable_adapter_and_an_in_llm_integrator(tiny_llm_dir, towers, tmp_path):
    config = ModelConfig(encoder=_clip(towers), integrator=IntegratorSpec(name="gated_xattn"),
                         llm=LLMSpec(name=str(tiny_llm_dir), device="cpu"), peft=PeftSpec(method="prompt_tuning"))
    torch.manual_seed(0)
    saved = VisionLanguageModel.from_config(config).save_pretrained(tmp_path / "saved")
    with pytest.raises(HFLlavaBlocked) as info:
        export(saved, "hf-llava", tmp_path / "llava")
    message = str(info.value)
    assert "integrator 'gated_xattn' adds modules inside the LLM's layers" in message
    assert "PEFT method prompt_tuning cannot be merged" in message and "--format workbench" in message
    with pytest.raises(ConfigError, match="prompt_tuning cannot be merged"):
        export(saved, "merged", tmp_path / "merged")


def test_blocked_after_loading_by_what_only_the_weights_tell(tiny_llm_dir, towers, tmp_path):
    saved = _model(tiny_llm_dir, _clip(towers, image_size=48)).save_pretrained(tmp_path / "saved")
    with pytest.raises(HFLlavaBlocked, match="encoder.image_size 48 differs from the tower's 32") as info:
        export(saved, "hf-llava", tmp_path / "llava")
    assert len(info.value.reasons) == 1 and "--format merged" in str(info.value)


# ---------------------------------------------------------------- merged and workbench formats

def test_merged_reloads_through_workbench_without_peft(tiny_llm_dir, tiny_config, tmp_path, example_image):
    import shutil

    from transformers import AutoModelForCausalLM

    from workbench.peft_modules import is_peft_model

    config = copy.deepcopy(tiny_config)
    config.peft = PeftSpec(method="lora")
    torch.manual_seed(0)
    model = VisionLanguageModel.from_config(config).eval()
    with torch.no_grad():
        for name, p in model.llm.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.3)
    reference = workbench_reference(model, example_image, QUESTION, max_new_tokens=6)
    result = export(model.save_pretrained(tmp_path / "saved"), "merged", tmp_path / "merged")
    assert result.check["same_tokens"] and result.check["within_tolerance"]
    assert not (result.path / "adapter").exists() and (result.path / "llm" / "config.json").is_file()
    saved_config = yaml.safe_load((result.path / "config.yaml").read_text())
    assert saved_config["peft"]["method"] == "none" and saved_config["llm"]["name"] == "./llm"
    card = (result.path / "README.md").read_text()  # it names the parts the model was built from
    assert f"| {tiny_llm_dir} |" in card and "lora r=8 alpha=16 (merged into the LLM)" in card
    moved = shutil.move(str(result.path), str(tmp_path / "elsewhere"))  # the parts travel with the folder
    reloaded = VisionLanguageModel.from_pretrained(moved).eval()
    assert not is_peft_model(reloaded.llm)
    again = workbench_reference(reloaded, example_image, QUESTION, max_new_tokens=6)
    assert again["tokens"] == reference["tokens"]
    torch.testing.assert_close(again["logits"], reference["logits"], atol=1e-4, rtol=1e-4)
    # the language part alone is a standard transformers causal LM with the LoRA merged in
    llm = AutoModelForCausalLM.from_pretrained(Path(moved) / "llm")
    merged_q = reloaded.llm.model.layers[0].self_attn.q_proj.weight
    torch.testing.assert_close(llm.model.layers[0].self_attn.q_proj.weight, merged_q)


def test_workbench_format_copies_or_zips_with_a_card(tiny_model, tmp_path):
    saved = tiny_model.save_pretrained(tmp_path / "saved")
    folder = export(saved, "workbench", tmp_path / "copy")
    assert (folder.path / "config.yaml").is_file() and (folder.path / "README.md").is_file()
    assert VisionLanguageModel.from_pretrained(folder.path).num_visual_tokens == tiny_model.num_visual_tokens
    archive = export(saved, "workbench", tmp_path / "archive", zip=True)
    assert archive.path.name == "archive.zip"
    with zipfile.ZipFile(archive.path) as zf:
        assert {"model/config.yaml", "model/README.md"} <= set(zf.namelist())
    with pytest.raises(ConfigError, match="exists"):
        export(saved, "workbench", tmp_path / "copy")
    with pytest.raises(ConfigError, match="Valid formats: hf-llava, merged, workbench"):
        export(saved, "gguf", tmp_path / "x")


# ---------------------------------------------------------------- the model card of a real run

@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, tiny_llm_dir, towers):
    """A real (tiny) run in a run registry, trained in this process: LLaVA-style parts, evaluated during training."""
    from workbench.jobs import RunRegistry
    from workbench.training.trainer import Trainer

    root = tmp_path_factory.mktemp("trained")
    from conftest import image_beside

    rows = [{"id": str(i), "image": image_beside(root), "meta": {"question_type": "colour"},
             "conversations": [{"from": "human", "value": "<image>\nwhat color is the shape?"},
                               {"from": "gpt", "value": "red"}]} for i in range(4)]
    (root / "data.json").write_text(json.dumps(rows))
    data = DataSpec(kind="llava", options={"json_path": str(root / "data.json")})
    model = ModelConfig(encoder=_clip(towers), integrator=IntegratorSpec(name="mlp", options=LLAVA_MLP),
                        llm=LLMSpec(name=str(tiny_llm_dir), device="cpu"), max_length=512)
    run = RunConfig(name="card", model=model, stages=[StageSpec(name="align", epochs=1.0)], data=data, eval_data=data,
                    training=TrainingSpec(batch_size=2, log_every=1, warmup_ratio=0.0, cache_features=False))
    registry = RunRegistry(root / "runs")
    run_id = registry.create(run)
    assert Trainer(registry.config(run_id), registry.run_dir(run_id)).train()["status"] == "completed"
    return registry, run_id, root / "data.json"


def test_model_card_carries_the_runs_evaluations_and_baseline(trained_run, capsys):
    from workbench.cli import main

    registry, run_id, data_json = trained_run
    run_dir = registry.run_dir(run_id)
    options = json.dumps({"json_path": str(data_json)})
    assert main(["eval", str(run_dir), "--data", "llava", "--options", options, "--split", "", "--text-only"]) == 0
    capsys.readouterr()
    assert (run_dir / "eval-llava-vqa-text-only.json").is_file()
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evaluation = [r for r in metrics if r["kind"] == "eval"][-1]
    # a text-only baseline: the same recipe trained without images, a sibling run (its own numbers)
    baseline_dir = run_dir.parent / "card-text-only"
    baseline_dir.mkdir()
    base = copy.deepcopy(registry.config(run_id))
    base.text_only, base.stages[0].llm = True, "full"
    save_run_config(base, baseline_dir / "run.yaml")
    with open(baseline_dir / "metrics.jsonl", "w") as fh:
        fh.write(json.dumps({"time": 0, "kind": "eval", "stage": 0, "step": 2, "accuracy": 0.3125,
                             "by_type": {"colour": 0.3125}, "count": 16}) + "\n")

    result = export(run_dir, "hf-llava", overwrite=True)
    assert result.path == run_dir / "export" / "hf-llava"
    card = (result.path / "README.md").read_text()
    meta = yaml.safe_load(card.split("---")[1])
    assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == "image-text-to-text"
    values = [m["value"] for r in meta["model-index"][0]["results"] for m in r["metrics"]]
    assert round(evaluation["accuracy"], 4) in values and 0.3125 in values
    assert f"{100 * evaluation['accuracy']:.1f}%" in card and "31.2%" in card and "text-only baseline" in card
    stage = next(r for r in metrics if r["kind"] == "stage")
    assert f"{stage['trainable_params']:,}" in card
    assert "Training time:" in card and "Hardware: cpu" in card and "llava" in meta["datasets"]
    assert "LlavaForConditionalGeneration.from_pretrained" in card and "## Intended use and limits" in card
    assert meta["workbench"]["parts"]["llm"]["licence"] == "unknown"  # a local folder without a card says so


def test_the_apps_export_button(trained_run):
    import gradio as gr

    from test_app import app_module

    registry, run_id, _ = trained_run
    wb = app_module.Workbench(registry.root)
    message, card = wb.export(run_id, "merged")
    assert "Exported **merged**" in message and card.lstrip().startswith("# card") and "## Evaluation" in card
    message, card = wb.export(run_id, "workbench")
    assert f"{run_id}-model.zip" in message and "Load it" in card
    with pytest.raises(gr.Error, match="Pick a run"):
        wb.export("", "hf-llava")


def test_card_licences_of_named_parts():
    from workbench.export import describe_parts

    config = ModelConfig(encoder=EncoderSpec(name="clip", model="openai/clip-vit-large-patch14-336"),
                         llm=LLMSpec(name="qwen2.5-0.5b-instruct"))
    parts = describe_parts(config)
    assert parts["encoder"]["licence"] == "mit" and parts["llm"]["licence"] == "apache-2.0"
    assert parts["llm"]["hub_id"] == "Qwen/Qwen2.5-0.5B-Instruct"
    assert describe_parts(ModelConfig())["encoder"]["licence"] == "bsd-3-clause"  # embedded MobileNetV2


# ---------------------------------------------------------------- the example configs, from stand-ins

def _stand_in_parts(root: Path, vision_type: str) -> tuple[str, str]:
    """Tiny stand-ins of the example's architectures (same model types and activations, no hub)."""
    from transformers import CLIPVisionConfig, Qwen2Config, SiglipVisionConfig

    vision = (CLIPVisionConfig(hidden_act="quick_gelu", **{**TINY_VISION, "patch_size": 14, "image_size": 28})
              if vision_type == "clip" else
              SiglipVisionConfig(hidden_act="gelu_pytorch_tanh", **{**TINY_VISION, "patch_size": 14,
                                                                     "image_size": 28}))
    vision.save_pretrained(root / "vision")
    tokenizer = make_tokenizer()
    Qwen2Config(vocab_size=len(tokenizer) + 8, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                eos_token_id=tokenizer.eos_token_id).save_pretrained(root / "llm")
    tokenizer.save_pretrained(root / "llm")
    return str(root / "vision"), str(root / "llm")


@pytest.mark.parametrize("example,vision_type", [("llava15_like_online.yaml", "clip"),
                                                 ("tinyllava_like_online.yaml", "siglip")])
def test_example_configs_export_to_hf_llava(tmp_path, example, vision_type):
    path = Path(__file__).resolve().parents[1] / "examples" / "configs" / example
    config = load_run_config(path).model
    config.encoder.model, config.llm.name = _stand_in_parts(tmp_path, vision_type)
    config.encoder.weights, config.llm.weights, config.llm.device = "random", "random", "cpu"
    torch.manual_seed(0)
    saved = VisionLanguageModel.from_config(config).save_pretrained(tmp_path / "saved")
    result = export(saved, "hf-llava", tmp_path / "llava")
    assert result.check["same_tokens"] and result.check["within_tolerance"], result.check
    llava = json.loads((result.path / "config.json").read_text())
    assert llava["vision_feature_layer"] == -2 and llava["tie_word_embeddings"] is True
    # the image token fits in the padded vocabulary (Qwen-style): no new row
    assert llava["text_config"]["vocab_size"] == len(make_tokenizer()) + 8


# ---------------------------------------------------------------- the command line

def test_export_from_the_command_line(tiny_llm_dir, towers, tiny_config, tmp_path, capsys):
    from workbench.cli import main

    saved = _model(tiny_llm_dir, _clip(towers)).save_pretrained(tmp_path / "saved")
    assert main(["export", str(saved), "--format", "hf-llava", "--out", str(tmp_path / "llava")]) == 0
    out = capsys.readouterr().out
    assert "exported hf-llava" in out and "same greedy tokens as the workbench model: yes" in out
    blocked = VisionLanguageModel.from_config(copy.deepcopy(tiny_config)).save_pretrained(tmp_path / "cnn")
    assert main(["export", str(blocked), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: Cannot export to hf-llava") and len(err.splitlines()) == 1
    assert "--format merged" in err
