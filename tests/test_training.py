"""The training loop on tiny models: it learns, logs, checkpoints, skips bad rows, resumes exactly."""
import copy
import json

import pytest
import torch

from workbench.config import DataSpec, RunConfig, StageSpec, TrainingSpec
from workbench.data.samples import Sample, SampleDataset
from workbench.errors import ConfigError
from workbench.integrators import INTEGRATORS
from workbench.paradigms import PARADIGMS, resolve_stages
from workbench.training.checkpoint import latest_checkpoint, list_checkpoints
from workbench.training.metrics import read_metrics
from workbench.training.trainer import CANCEL_FILE, Trainer


def _dataset(example_image, n=12, bad=0):
    samples = [Sample([{"role": "user", "content": "<image>\nwhat color is the shape?"},
                       {"role": "assistant", "content": "red"}], [example_image], {"answer": "red"}) for _ in range(n)]
    for i in range(bad):
        samples.append(Sample([{"role": "user", "content": "<image>\nwhat?"}, {"role": "assistant", "content": "x"}],
                              [b"not an image"], {"answer": "x"}))
    return SampleDataset(samples)


def _run(tiny_config, **training):
    settings = dict(batch_size=4, log_every=1, cache_features=False, warmup_ratio=0.0)
    settings.update(training)
    return RunConfig(model=copy.deepcopy(tiny_config), stages=[StageSpec(name="align", lr=1e-2, epochs=2)],
                     training=TrainingSpec(**settings))


def test_paradigm_recipes():
    assert set(PARADIGMS.names()) == {"single-stage", "two-stage", "direct"}
    stages = resolve_stages(RunConfig(paradigm="two-stage"))
    assert [s.name for s in stages] == ["align", "instruct"] and stages[1].llm == "full"
    assert stages[0].data.kind == "emoji-captions" and stages[1].data.kind == "easy-vqa"
    with pytest.raises(ConfigError, match="peft.method.*inside the LLM"):
        resolve_stages(RunConfig(paradigm="direct"))
    from workbench.config import IntegratorSpec, ModelConfig

    direct = resolve_stages(RunConfig(paradigm="direct", model=ModelConfig(integrator=IntegratorSpec(name="lavin_mma"))))
    assert [(s.train_integrator, s.llm) for s in direct] == [(True, "frozen")]  # the adapters are the integrator


def test_training_lowers_the_loss_and_logs(tiny_config, example_image, tmp_path):
    trainer = Trainer(_run(tiny_config, cache_features=True), tmp_path / "run",
                      datasets={"align": _dataset(example_image, bad=2)})
    result = trainer.train()
    assert result["status"] == "completed"
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl", "train")
    assert len(rows) == 8 and rows[-1]["loss"] < rows[0]["loss"]
    assert {"lr", "grad_norm", "samples_per_s", "memory_mb"} <= set(rows[0])
    assert result["skipped"] == {"unreadable image": 4}  # 2 bad rows, seen in each of 2 epochs
    assert trainer.cache is not None and trainer.cache.hits > 0
    assert (tmp_path / "run" / "model" / "integrator.safetensors").is_file()


def test_only_the_recipe_parameters_change(tiny_config, example_image, tmp_path):
    trainer = Trainer(_run(tiny_config), tmp_path / "run", datasets={"align": _dataset(example_image)})
    from workbench.model import VisionLanguageModel

    trainer.model = VisionLanguageModel.from_config(copy.deepcopy(tiny_config))
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    changed = {n.split(".")[0] for n, p in trainer.model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == {"integrator"}


def test_cancel_checkpoints_and_resume_finishes_identically(tiny_config, example_image, tmp_path):
    data = {"align": _dataset(example_image)}
    straight = Trainer(_run(tiny_config), tmp_path / "a", datasets=data)
    straight.train()

    run_dir = tmp_path / "b"
    first = Trainer(_run(tiny_config), run_dir, datasets=data,
                    on_log=lambda row: row["kind"] == "train" and row["step"] == 3 and (run_dir / CANCEL_FILE).touch())
    assert first.train()["status"] == "cancelled"
    ckpt = latest_checkpoint(run_dir)
    assert ckpt is not None and json.loads((ckpt / "checkpoint.json").read_text())["global_step"] == 3
    (run_dir / CANCEL_FILE).unlink()
    resumed = Trainer(_run(tiny_config), run_dir, datasets=data)
    assert resumed.train(resume=True)["status"] == "completed"
    for (n, a), (_, b) in zip(straight.model.integrator.named_parameters(), resumed.model.integrator.named_parameters()):
        assert torch.allclose(a, b, atol=1e-6), n


def test_resume_refuses_a_different_trainable_set(tiny_config, example_image, tmp_path):
    data = {"align": _dataset(example_image)}
    run_dir = tmp_path / "r"
    Trainer(_run(tiny_config), run_dir, datasets=data,
            on_log=lambda row: row["kind"] == "train" and row["step"] == 2 and (run_dir / CANCEL_FILE).touch()).train()
    (run_dir / CANCEL_FILE).unlink()
    changed = _run(tiny_config)
    changed.stages[0].llm = "full"  # would silently unfreeze the LLM on resume
    with pytest.raises(ConfigError, match="different trainable set"):
        Trainer(changed, run_dir, datasets=data).train(resume=True)


def test_keep_last_checkpoints(tiny_config, example_image, tmp_path):
    Trainer(_run(tiny_config, save_every=1, keep_last=2), tmp_path / "k",
            datasets={"align": _dataset(example_image)}).train()
    assert len(list_checkpoints(tmp_path / "k")) == 2


def test_feature_cache_reuses_and_invalidates(tiny_model, example_image, tmp_path):
    from workbench.images import load_image
    from workbench.training.feature_cache import FeatureCache

    image = load_image(example_image)
    cache = FeatureCache(tiny_model.encoder, root=tmp_path)
    first = cache.get([image, image])
    assert cache.misses == 2 and first.shape[0] == 2
    again = FeatureCache(tiny_model.encoder, root=tmp_path).get([image])  # from disk, a new process would do this
    assert torch.equal(again[0], first[0])
    direct = tiny_model.encoder(tiny_model.encoder.preprocess([image]))
    assert torch.allclose(first[0].float(), direct[0], atol=1e-2, rtol=1e-2)
    import copy as _copy

    other = _copy.deepcopy(tiny_model.encoder)
    other.spec.image_aspect = "crop"
    assert FeatureCache(other, root=tmp_path).dir != cache.dir


def test_text_only_baseline_trains_without_images(tiny_config, example_image, tmp_path):
    run = _run(tiny_config)
    run.text_only = True
    with pytest.raises(ConfigError, match="text-only run trains nothing"):
        Trainer(run, tmp_path / "x", datasets={"align": _dataset(example_image)}).train()
    run.stages[0].llm = "full"
    trainer = Trainer(run, tmp_path / "t", datasets={"align": _dataset(example_image, bad=1)},
                      eval_dataset=_dataset(example_image, n=4))
    result = trainer.train()
    assert result["status"] == "completed" and result["skipped"] == {}  # the bad image is never opened
    evals = read_metrics(tmp_path / "t" / "metrics.jsonl", "eval")
    assert evals and evals[-1]["count"] == 4
    assert result["stages"][0]["eval"] == evals[-1]["accuracy"] and 0.0 <= evals[-1]["accuracy"] <= 1.0


def test_vqa_accuracy_normalisation():
    from workbench.evaluation import answer_matches, normalize_answer, without_images

    assert normalize_answer("  The Red.\nmore text") == "red"
    assert answer_matches("Red, I think", "red") and not answer_matches("blue", "red")
    assert without_images([{"role": "user", "content": "<image>\nwhat?"}]) == [{"role": "user", "content": "what?"}]


@pytest.mark.parametrize("method", ["lora", "dora", "ia3", "prompt_tuning", "prefix_tuning", "adaption_prompt"])
def test_direct_adaptation_with_every_peft_method(tiny_config, example_image, tmp_path, method):
    run = _run(tiny_config)
    run.model.peft.method = method
    run.stages = None
    run.paradigm = "direct"
    trainer = Trainer(run, tmp_path / method, datasets={"adapt": _dataset(example_image)})
    assert trainer.train()["status"] == "completed"
    losses = [r["loss"] for r in read_metrics(tmp_path / method / "metrics.jsonl", "train")]
    assert all(map(lambda x: x == x, losses)) and losses[-1] < losses[0]
    assert not any(p.requires_grad for p in trainer.model.encoder.parameters())


def test_direct_adaptation_trains_lora_and_integrator_only(tiny_config, example_image, tmp_path):
    run = _run(tiny_config)
    run.model.peft.method = "lora"
    run.stages = None
    run.paradigm = "direct"
    run.data = DataSpec(kind="llava")  # replaced by the dataset given below
    trainer = Trainer(run, tmp_path / "d", datasets={"adapt": _dataset(example_image)})
    assert trainer.train()["status"] == "completed"
    trained = {n.split(".")[0] for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert trained == {"integrator", "llm"}
    assert all("lora_" in n for n, p in trainer.model.llm.named_parameters() if p.requires_grad)
    assert (tmp_path / "d" / "model" / "adapter" / "adapter_model.safetensors").is_file()


def test_memory_estimate_and_refusal(tiny_config, example_image, tmp_path, monkeypatch):
    from workbench.training import memory

    trainer = Trainer(_run(tiny_config), tmp_path / "m", datasets={"align": _dataset(example_image)})
    trainer.train()
    row = read_metrics(tmp_path / "m" / "metrics.jsonl", "memory")[0]
    assert row["fits"] and row["optimizer"] == 2 * row["gradients"] > 0 and row["seq_len"] > 4
    monkeypatch.setattr(memory, "available_memory", lambda device: 1024)
    with pytest.raises(ConfigError, match="will not fit in memory.*GiB available"):
        Trainer(_run(tiny_config), tmp_path / "m2", datasets={"align": _dataset(example_image)}).train()


def test_a_time_budget_stops_the_stage_and_anneals_the_learning_rate(tiny_config, example_image, tmp_path,
                                                                     monkeypatch):
    import workbench.training.trainer as trainer_module

    clock = {"now": 1000.0}

    def fake_clock():  # each call advances 0.4 s: the 6-second budget runs out after a few batches
        clock["now"] += 0.4
        return clock["now"]

    monkeypatch.setattr(trainer_module.time, "perf_counter", fake_clock)
    run = _run(tiny_config)
    run.stages = [StageSpec(name="align", lr=1e-2, epochs=50, max_minutes=0.1)]  # 6 s of the fake clock
    result = Trainer(run, tmp_path / "run", datasets={"align": _dataset(example_image)}).train()
    assert result["status"] == "completed"
    budget = read_metrics(tmp_path / "run" / "metrics.jsonl", "time_budget")
    assert len(budget) == 1 and budget[0]["minutes"] == 0.1
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl", "train")
    assert 0 < len(rows) < 6  # 50 epochs × 3 batches were allowed by steps; time stopped it
    lrs = [r["lr"] for r in rows]
    assert lrs == sorted(lrs, reverse=True) and lrs[-1] < 1e-2 * 0.5  # decayed by the clock, not the step count
    with pytest.raises(ConfigError, match="max_minutes"):
        RunConfig(stages=[StageSpec(max_minutes=0)]).validate()


SMALL = {"hidden_dim": 16, "depth": 1, "num_layers": 2, "num_heads": 2, "num_queries": 4, "num_latents": 4,
         "num_tokens": 4, "bottleneck": 4, "proj_hidden": 16, "prompt_length": 4}
"""Small widths for whichever of these options a family takes (a new family too): the trainer's treatment of a
family does not depend on its width, and the test stays quick."""


@pytest.mark.parametrize("name", INTEGRATORS.names())
def test_every_integrator_family_trains_in_the_single_stage_recipe(name, tiny_config, example_image, tmp_path):
    """Every registered family on the tiny models: the trainer treats in-LLM integrators like prefix ones, their
    modules learn, the frozen LLM does not, and the saved model reloads with the trained modules in place."""
    import inspect

    from workbench.config import IntegratorSpec
    from workbench.model import VisionLanguageModel

    takes = inspect.signature(INTEGRATORS.get(name)).parameters
    run = _run(tiny_config)
    run.model.integrator = IntegratorSpec(name=name, options={k: v for k, v in SMALL.items() if k in takes})
    run.stages = [StageSpec(name="align", lr=1e-2, max_steps=3)]
    trainer = Trainer(run, tmp_path / "run", datasets={"align": _dataset(example_image)})
    torch.manual_seed(0)
    trainer.model = VisionLanguageModel.from_config(copy.deepcopy(run.model))
    llm_before = {n: p.detach().clone() for n, p in trainer.model.llm.named_parameters()}
    integrator_before = {n: p.detach().clone() for n, p in trainer.model.integrator.named_parameters()}
    assert trainer.train()["status"] == "completed"
    assert all(torch.equal(p, llm_before[n]) for n, p in trainer.model.llm.named_parameters())
    changed = [n for n, p in trainer.model.integrator.named_parameters() if not torch.equal(p, integrator_before[n])]
    assert changed, f"{name}: no integrator parameter moved"
    reloaded = VisionLanguageModel.from_pretrained(tmp_path / "run" / "model")
    for n, p in reloaded.integrator.named_parameters():
        assert torch.equal(p, dict(trainer.model.integrator.named_parameters())[n])


def test_full_fine_tuning_of_a_bf16_llm_through_the_trainer_changes_its_weights(tiny_config, example_image, tmp_path):
    """An LLM loaded in bf16 (dtype auto on CUDA) and fine-tuned at a small learning rate: the trainer keeps the
    trained weights in fp32 under bf16 autocast, so the updates accumulate instead of rounding away."""
    from workbench.model import VisionLanguageModel

    run = _run(tiny_config, precision="bf16")
    run.model.llm.dtype = "bfloat16"
    run.stages = [StageSpec(name="instruct", llm="full", lr=1e-4, lr_llm=2e-5, epochs=2)]
    model = VisionLanguageModel.from_config(run.model)
    before = {n: p.detach().float().clone() for n, p in model.llm.named_parameters()}
    result = Trainer(run, tmp_path / "run", model=model, datasets={"instruct": _dataset(example_image)}).train()
    assert result["status"] == "completed"
    trained = dict(model.llm.named_parameters())
    assert {p.dtype for p in trained.values()} == {torch.float32}  # fp32 masters of what trained
    used = [n for n in before if "embed_tokens" not in n]  # embedding rows of tokens never seen get no gradient
    changed = sum((trained[n].detach() != before[n]).sum().item() for n in used)
    total = sum(before[n].numel() for n in used)
    assert changed / total > 0.9, changed / total
    assert {p.dtype for p in model.encoder.parameters()} == {torch.bfloat16}  # frozen: stays as loaded
