"""The training loop: runs a paradigm's stages in order on one model, with accelerate.

Per stage: set what trains (recipe), build per-module learning rates, warmup + cosine schedule,
gradient accumulation and clipping, periodic evaluation with early stopping, checkpoints, and a
JSONL metrics log. Bad samples are skipped and counted, never fatal. Resuming restores the exact
data position and refuses to continue if the trainable set differs from the checkpoint's.
"""
from __future__ import annotations

import math
import os
import random
import signal
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from ..config import RunConfig, StageSpec, save_run_config
from ..errors import ConfigError, ImageError, WorkbenchError
from ..evaluation import without_images
from ..images import load_image
from ..paradigms import resolve_stages
from .checkpoint import latest_checkpoint, load_trainer_state, restore_rng, save_checkpoint
from .feature_cache import FeatureCache
from .memory import peak_memory_mb
from .metrics import MetricsLog

CANCEL_FILE = "CANCEL"


class Cancelled(Exception):
    """Raised inside the loop when a cancel was requested; the trainer checkpoints and stops."""


class Trainer:
    def __init__(self, run: RunConfig, run_dir: str | Path, model=None, datasets: dict | None = None,
                 eval_dataset=None, on_log: Callable[[dict], None] | None = None):
        self.run = run.validate()
        self.dir = Path(run_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.model = model
        self._datasets = datasets or {}
        self._eval_dataset = eval_dataset
        self.on_log = on_log
        self.metrics = MetricsLog(self.dir / "metrics.jsonl")
        self.skipped: Counter = Counter()
        self.cache: FeatureCache | None = None
        self._cancel = False
        self._last_save = time.monotonic()

    # ------------------------------------------------------------------ public
    def train(self, resume: bool = False) -> dict:
        from accelerate import Accelerator

        from ..model import VisionLanguageModel

        save_run_config(self.run, self.dir / "run.yaml")
        torch.manual_seed(self.run.training.seed)
        random.seed(self.run.training.seed)
        if self.model is None:
            self.model = VisionLanguageModel.from_config(self.run.model)
        stages = resolve_stages(self.run)
        start = {"stage": 0, "global_step": 0, "epoch": 0, "batch": 0}
        state = None
        ckpt = latest_checkpoint(self.dir) if resume else None
        if ckpt is not None:
            info, state = load_trainer_state(ckpt)
            if info["stage"] < len(stages):  # the saved trained parts are fp32 masters: load them as such
                self._apply_recipe(stages[info["stage"]])
                self.model.upcast_trainable_()
            self.model.load_trained_parts(ckpt / "model")
            start = info
            self._log("resume", checkpoint=ckpt.name, stage=info["stage"], step=info["global_step"])
        elif resume:  # killed before its first checkpoint: nothing to lose by starting again
            self._log("resume", checkpoint=None, stage=0, step=0,
                      message="no checkpoint was written before the run stopped: starting it from the beginning")
        from accelerate.utils import DistributedDataParallelKwargs

        from ..llm import use_device

        use_device(self.model.device)  # accelerate's "cuda" is then the model's GPU (llm.device: cuda:1), not GPU 0
        precision = self._precision()
        # Which parameters a step uses depends on the batch (rows without images skip the integrator; a text-only
        # run never calls it), so DDP must look for unused ones instead of waiting for their gradients.
        self.accelerator = Accelerator(gradient_accumulation_steps=self.run.training.grad_accum,
                                       mixed_precision=precision, cpu=self.model.device.type == "cpu",
                                       kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])
        previous = signal.signal(signal.SIGTERM, self._request_cancel) if _main_thread() else None
        result: dict = {"status": "completed"}
        try:
            global_step = start["global_step"]
            for index in range(start["stage"], len(stages)):
                # Mid-stage: continue its optimizer and data position. At a stage boundary: start it fresh.
                mid_stage = state is not None and index == start["stage"] and not start.get("stage_done")
                resuming = state if mid_stage else None
                global_step, stage_result = self._run_stage(index, stages[index], global_step,
                                                            start if resuming else None, resuming)
                result.setdefault("stages", []).append(stage_result)
            self.accelerator.wait_for_everyone()
            if self.accelerator.is_main_process:
                self.model.save_pretrained(self.dir / "model")
            self.accelerator.wait_for_everyone()  # no process leaves while the main one still writes
            result["model_dir"] = str(self.dir / "model")
        except Cancelled:
            result["status"] = "cancelled"
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)
            # A process that exits with its process group alive can abort in the group's teardown (gloo's
            # threads), and the launcher then kills the others: leave the group explicitly.
            self.accelerator.end_training()
        result["skipped"] = dict(self.skipped)
        self._log("end", **result)
        return result

    # ------------------------------------------------------------------ one stage
    def _apply_recipe(self, stage: StageSpec) -> list[str]:
        if self.run.text_only and stage.llm == "frozen":
            raise ConfigError(f"Stage '{stage.name}' of a text-only run trains nothing that sees the text: the "
                              f"integrator gets no images. Set the stage's llm to full or peft for the baseline")
        has_peft = self.model.config.peft.method != "none"
        if stage.llm == "peft" and not has_peft:
            raise ConfigError(f"Stage '{stage.name}' trains PEFT modules but model.peft.method is none")
        # A frozen stage freezes the adapters too; full trains base weights and adapters together.
        self.model.set_trainable(encoder=stage.train_encoder, integrator=stage.train_integrator,
                                 llm=stage.llm == "full", peft=(stage.llm != "frozen") if has_peft else None)
        return sorted(n for n, p in self.model.named_parameters() if p.requires_grad)

    def _optimizer(self, stage: StageSpec):
        groups = []
        for part, lr in (("integrator", stage.lr), ("llm", stage.lr_llm), ("encoder", stage.lr_encoder)):
            params = [p for p in getattr(self.model, part).parameters() if p.requires_grad]
            if params:
                groups.append({"params": params, "lr": lr, "name": part})
        if not groups:
            raise ConfigError(f"Stage '{stage.name}' has nothing to train")
        return torch.optim.AdamW(groups, weight_decay=self.run.training.weight_decay)

    def _run_stage(self, index: int, stage: StageSpec, global_step: int, position: dict | None, state: dict | None):
        """Train one stage from its start or from a checkpoint's position; returns (global step, stage result)."""
        s = self._start_stage(index, stage, global_step, position, state)
        while s.done < s.total_batches:
            order = _epoch_order(len(s.dataset), s.weights, self.run.training.seed + 1000 * index + s.epoch)
            # Every process gets the same number of batches (DDP waits for all of them at each step).
            world, rank = self.accelerator.num_processes, self.accelerator.process_index
            batches = order[: len(order) - len(order) % world][rank::world].split(self.run.training.batch_size)
            for b, idx in enumerate(batches):
                if b < s.skip:
                    continue
                if s.done >= s.total_batches or not self._train_batch(s, b, idx, len(batches)):
                    s.done = s.total_batches
                    break
            s.epoch, s.skip = s.epoch + 1, 0
        return s.step, self._finish_stage(s)

    def _start_stage(self, index: int, stage: StageSpec, global_step: int, position: dict | None,
                     state: dict | None) -> "_Stage":
        """What trains, the data, optimizer and schedule (restored when resuming), caches; logged as `stage`."""
        t = self.run.training
        trainable = self._apply_recipe(stage)
        self.model.upcast_trainable_()  # fp32 master weights: bf16 weights would round most updates away
        if position is not None and position.get("trainable") != trainable:
            raise ConfigError(f"The checkpoint trained {len(position.get('trainable', []))} tensors but stage "
                              f"'{stage.name}' would train {len(trainable)}: refusing to resume with a different "
                              f"trainable set")
        dataset = self._dataset(stage)
        per_epoch = math.ceil((len(dataset) // self.accelerator.num_processes) / t.batch_size)
        total_batches = stage.max_steps * t.grad_accum if stage.max_steps else math.ceil(per_epoch * stage.epochs)
        total_updates = max(1, total_batches // t.grad_accum)
        optimizer = self._optimizer(stage)
        s = _Stage(index=index, spec=stage, dataset=dataset, eval_dataset=self._eval_data(stage), trainable=trainable,
                   optimizer=optimizer, total_batches=total_batches, step=global_step,
                   budget=stage.max_minutes * 60 if stage.max_minutes else None,
                   started=time.perf_counter() - (position.get("stage_seconds", 0.0) if position else 0.0))
        self._stage_seconds = s.seconds()  # the stage's clock, agreed by every process at each batch
        s.first_step = global_step
        s.scheduler = self._schedule(optimizer, total_updates, s.budget)
        if state is not None:
            optimizer.load_state_dict(state["optimizer"])
            s.scheduler.load_state_dict(state["scheduler"])
            restore_rng(state)
        if position is not None:
            s.epoch, s.skip, s.done = position["epoch"], position["batch"], position.get("stage_batches", 0)
        self._check_memory(dataset)
        # The scheduler is stepped here once per optimizer update, not prepared: accelerate's wrapper steps it once
        # per process, which would run the schedule `world` times too fast (the update count is per process).
        s.model, s.optimizer = self.accelerator.prepare(self.model, optimizer)
        if t.cache_features and self.model.encoder.frozen and self.cache is None:
            self.cache = FeatureCache(self.model.encoder)
        self.text_states = self._text_state_cache(index, dataset)
        self.share_prefix = self._shared_prefix(index, dataset)
        self._log("stage", stage=index, name=stage.name, samples=len(dataset), batches=total_batches,
                  updates=total_updates, trainable=len(trainable),
                  trainable_params=sum(p.numel() for p in self.model.parameters() if p.requires_grad),
                  total_params=sum(p.numel() for p in self.model.parameters()),
                  data_report=getattr(getattr(dataset, "report", None), "as_dict", lambda: {})())
        s.model.train()
        s.weights = self._balance(stage, dataset)
        s.window_start = time.perf_counter()  # the first curve point's rate counts training, not the set-up
        return s

    def _schedule(self, optimizer, total_updates: int, budget: float | None):
        """Warmup + cosine over the updates, or over the time budget's progress when the stage has one."""
        from transformers import get_cosine_schedule_with_warmup

        warmup_ratio = self.run.training.warmup_ratio
        if budget is None:
            return get_cosine_schedule_with_warmup(optimizer, int(warmup_ratio * total_updates), total_updates)
        return _budget_schedule(optimizer, warmup_ratio, total_updates, lambda: self._stage_seconds / budget)

    def _train_batch(self, s: "_Stage", b: int, idx: torch.Tensor, epoch_batches: int) -> bool:
        """One batch: stop on cancel (with a checkpoint) or on the time budget, else a step and what follows an
        update (log, evaluation, checkpoint). False ends the stage."""
        batch = self._batch([s.dataset[i] for i in idx.tolist()])
        # Every process takes the same decision, or one leaves the loop while another waits in an all-reduce:
        # stop if any was asked to, skip the step if any has nothing usable.
        cancel, self._stage_seconds, unusable = self._agree(
            self._cancel or (self.dir / CANCEL_FILE).exists(), s.seconds(), batch is None)
        if cancel:
            self._checkpoint(s, batch=b)
            raise Cancelled()
        # The budget ends a stage only after its first update, so every stage leaves a curve point, however
        # slow the machine or short the budget.
        if s.budget is not None and self._stage_seconds >= s.budget and s.step > s.first_step:
            if s.window_loss:  # a short run still gets its curve and peak memory
                self._log_window(s, s.epoch + b / max(1, epoch_batches))
            self._log("time_budget", stage=s.index, step=s.step, minutes=s.spec.max_minutes)
            return False
        s.done += 1
        if unusable:
            return True
        self._step(s, batch)
        if not self.accelerator.sync_gradients:
            return True
        s.step += 1
        t = self.run.training
        if s.step % t.log_every == 0 or s.done == s.total_batches:
            self._log_window(s, s.epoch + b / max(1, epoch_batches))
        if t.eval_every and s.step % t.eval_every == 0 and s.eval_dataset is not None and self._early_stop(s):
            return False
        if self._checkpoint_due(s.step):
            self._checkpoint(s, batch=b + 1)
        return True

    def _step(self, s: "_Stage", batch: dict) -> None:
        """Forward, backward, clip, optimizer and schedule (once per update), under gradient accumulation."""
        with self.accelerator.accumulate(s.model):
            loss = s.model(**batch, answer_logits_only=True, text_states=self.text_states,
                           share_prefix=self.share_prefix).loss
            self.accelerator.backward(loss)
            if self.accelerator.sync_gradients:
                s.norm = self.accelerator.clip_grad_norm_(
                    [p for p in self.model.parameters() if p.requires_grad], self.run.training.max_grad_norm)
            s.optimizer.step()
            if self.accelerator.sync_gradients and not self.accelerator.optimizer_step_was_skipped:
                s.scheduler.step()
            s.optimizer.zero_grad()
        s.window_loss.append(loss.item())
        s.window_samples += batch["input_ids"].shape[0]

    def _early_stop(self, s: "_Stage") -> bool:
        """Evaluate; keep the best model in best/; true when every process agrees patience has run out."""
        patience_limit = self.run.training.early_stopping_patience
        score = self._evaluate(s.eval_dataset, s.index, s.step)
        if score > s.best:
            s.best, s.patience = score, 0
            if self.accelerator.is_main_process:
                self.model.save_pretrained(self.dir / "best")
        else:
            s.patience += 1
        (stop,) = self._agree(bool(patience_limit) and s.patience >= patience_limit)
        if stop:
            self._log("early_stop", stage=s.index, step=s.step, best=s.best)
        return bool(stop)

    def _finish_stage(self, s: "_Stage") -> dict:
        if self.text_states is not None:
            self._log("text_state_cache", stage=s.index, **self.text_states.summary())
        result = {"stage": s.spec.name, "steps": s.step}
        if s.eval_dataset is not None:
            result["eval"] = self._evaluate(s.eval_dataset, s.index, s.step)
        self._checkpoint(s, stage_done=True)
        return result

    # ------------------------------------------------------------------ helpers
    def _log_window(self, s: "_Stage", epoch: float) -> None:
        """One `train` row for the optimizer steps since the last: mean loss, rate, memory (the curves' points)."""
        elapsed = time.perf_counter() - s.window_start
        self._log("train", stage=s.index, step=s.step, batch=s.done, batches=s.total_batches, epoch=epoch,
                  loss=sum(s.window_loss) / len(s.window_loss) if s.window_loss else float("nan"),
                  lr=s.scheduler.get_last_lr()[0], grad_norm=float(s.norm),
                  samples_per_s=s.window_samples / max(elapsed, 1e-9), memory_mb=peak_memory_mb(),
                  skipped=sum(self.skipped.values()))
        s.window_loss, s.window_samples, s.window_start = [], 0, time.perf_counter()

    def _check_memory(self, dataset) -> None:
        """Log the estimate; turn on gradient checkpointing when it advises so; refuse (with the breakdown and
        what to change) a stage that clearly cannot fit."""
        from .memory import estimate_training_memory, training_lengths

        seq_len, answer_len = training_lengths(self.model, [dataset[i] for i in range(min(len(dataset), 32))])
        estimate = estimate_training_memory(self.model, self.run.training.batch_size, seq_len, self._precision(),
                                            answer_len=answer_len,
                                            gradient_checkpointing=self.run.training.gradient_checkpointing)
        self._log("memory", seq_len=seq_len, answer_len=answer_len, **estimate.as_dict())
        if estimate.gradient_checkpointing and not self.model.gradient_checkpointing:
            self.model.enable_gradient_checkpointing()
        if not estimate.fits:
            raise ConfigError(f"This stage will not fit in memory: {estimate.explain()}. {estimate.advice}")

    def _batch(self, samples) -> dict | None:
        """Samples → model inputs; a sample that fails (image, template, length) is skipped and counted."""
        model = self.model
        encoded, images, owners = [], [], []
        for sample in samples:
            try:
                if self.run.text_only:
                    loaded, messages = [], without_images(sample.messages, model.config.image_token)
                else:
                    loaded, messages = [load_image(im) for im in sample.images], sample.messages
                enc = model.encode_conversation(messages, len(loaded))
            except ImageError:
                self.skipped["unreadable image"] += 1
                continue
            except WorkbenchError as e:
                self.skipped["too long" if "max_length" in str(e) else "bad conversation"] += 1
                continue
            owners += [len(encoded)] * len(loaded)
            encoded.append(enc)
            images += loaded
        if not encoded:
            return None
        batch = model.collate(encoded)
        if images:
            if self.cache is not None and model.encoder.frozen:
                batch["image_features"] = self.cache.get(images)
            else:
                batch["pixel_values"] = model.encoder.preprocess(images)
            batch["image_to_sample"] = torch.tensor(owners)
        return batch

    def _text_state_cache(self, stage: int, dataset):
        """A TextStateCache when the bottom LLM layers are frozen and text-only, checked on one batch to give
        the same loss as the ordinary forward; None (with the reason logged) otherwise."""
        from .text_state_cache import TextStateCache, frozen_text_layers

        if not self.run.training.cache_text_states:
            return None
        cut, why = frozen_text_layers(self.model)
        if cut == 0:
            self._log("text_state_cache", stage=stage, cut=0, reason=why)
            return None
        cache = TextStateCache(self.model, cut, self.run.training.text_state_cache_mb)
        check = self._check_rewrite(dataset, dict(text_states=cache))
        if check is None:
            return cache
        plain, cached = check
        if not self._same_loss(plain, cached):
            self._log("text_state_cache", stage=stage, cut=0, reason=f"check failed: loss {plain:.6f} without the "
                                                                    f"cache, {cached:.6f} with it")
            return None
        self._log("text_state_cache", stage=stage, cut=cut, reason=why, check_loss=plain, check_diff=plain - cached)
        return cache

    def _shared_prefix(self, stage: int, dataset) -> bool:
        """Whether training steps run the batch's common leading tokens once (shared_prefix.py): only where it is
        an exact rewrite, checked on one batch like the text-state cache; the decision and why are logged."""
        from ..shared_prefix import why_not_by_setting, why_not_shared

        if self.run.training.share_prefix is False:
            return False
        why = why_not_by_setting(self.run.training.share_prefix, self._precision()) or why_not_shared(self.model)
        if why is None:
            check = self._check_rewrite(dataset, dict(text_states=self.text_states, share_prefix=True),
                                        plain=dict(text_states=self.text_states))
            if check is not None and not self._same_loss(*check):
                why = f"check failed: loss {check[0]:.6f} without it, {check[1]:.6f} with it"
        if why is not None:
            self._log("shared_prefix", stage=stage, used=False, reason=why)
            return False
        self._log("shared_prefix", stage=stage, used=True,
                  check_diff=None if check is None else check[0] - check[1])
        return True

    def _check_rewrite(self, dataset, rewritten: dict, plain: dict | None = None) -> tuple[float, float] | None:
        """(loss of the ordinary forward, loss with the `rewritten` keywords) on one small batch of `dataset`
        without dropout; None when no batch of the first rows can be built."""
        batch = None
        for start in range(0, min(len(dataset), 64), 8):
            batch = self._batch([dataset[i] for i in range(start, min(len(dataset), start + 8))])
            if batch is not None:
                break
        if batch is None:
            return None
        was_training = self.model.training
        self.model.eval()  # no dropout: the two passes must be comparable
        try:
            with torch.no_grad(), self.accelerator.autocast():
                before = self.model(**batch, answer_logits_only=True, **(plain or {})).loss.item()
                after = self.model(**batch, answer_logits_only=True, **rewritten).loss.item()
        finally:
            self.model.train(was_training)
        return before, after

    def _same_loss(self, plain: float, rewritten: float) -> bool:
        tolerance = 1e-4 if self._precision() == "no" else 2e-2
        return abs(plain - rewritten) <= tolerance * max(1.0, abs(plain))

    def _balance(self, stage: StageSpec, dataset) -> torch.Tensor | None:
        """Sampling weights when the stage's data asks for answer balancing (logged with what it changes)."""
        strength = stage.data.balance if stage.data is not None else 0.0
        if not strength:
            return None
        from ..data.balance import balance_report, balance_weights

        samples = [dataset[i] for i in range(len(dataset))]
        weights = balance_weights(samples, strength, self.model.config.image_token)
        self._log("balance", stage=stage.name, strength=strength,
                  **balance_report(samples, weights, self.model.config.image_token))
        return weights

    def _dataset(self, stage: StageSpec):
        if stage.name in self._datasets:
            return self._datasets[stage.name]
        from ..data.loaders import load_dataset_spec

        dataset = load_dataset_spec(stage.data.kind, **stage.data.options)
        if len(dataset) == 0:  # every row was bad: say why instead of "completing" without a step
            report = getattr(dataset, "report", None)
            raise ConfigError(f"Stage '{stage.name}' has no usable samples"
                              + (f": {report.summary()}" if report is not None else ""))
        return dataset

    def _eval_data(self, stage: StageSpec):
        if self._eval_dataset is not None:
            return self._eval_dataset
        if self.run.eval_data is None:
            return None
        from ..data.loaders import load_dataset_spec

        data = load_dataset_spec(self.run.eval_data.kind, **self.run.eval_data.options)
        self._eval_dataset = data.subset(self.run.training.eval_samples, seed=self.run.training.seed) \
            if len(data) > self.run.training.eval_samples and hasattr(data, "subset") else data
        return self._eval_dataset

    def _evaluate(self, dataset, stage: int, step: int) -> float:
        """The task's headline score (accuracy for short answers, CIDEr-D for captions): what picks `best/` and
        stops early, so a captioning stage is judged by its captions."""
        from ..evaluation import evaluate

        with self.accelerator.autocast():  # evaluate in the precision the run trains in
            result = evaluate(self.model, dataset, batch_size=self.run.training.batch_size * 2,
                              text_only=self.run.text_only)
        metrics = {k: result[k] for k in ("accuracy", "bleu4", "cider") if k in result}
        self._log("eval", stage=stage, step=step, task=result["task"], metric=result["metric"], score=result["score"],
                  **metrics, by_type=result["by_type"], count=result["count"], examples=result["examples"][:3])
        return result["score"]

    def _agree(self, *values: float) -> tuple[float, ...]:
        """The largest of each value over all processes (one small all-reduce): a flag is set everywhere when
        it is set anywhere, and the stage clock is the slowest process's, so budgets and schedules agree."""
        if self.accelerator.num_processes == 1:
            return tuple(values)
        votes = torch.tensor([float(v) for v in values], dtype=torch.float64, device=self.accelerator.device)
        torch.distributed.all_reduce(votes, op=torch.distributed.ReduceOp.MAX)
        return tuple(votes.tolist())

    def _checkpoint_due(self, step: int) -> bool:
        """Every `save_every` steps and every `save_every_minutes`, whichever comes first."""
        t = self.run.training
        by_steps = bool(t.save_every) and step % t.save_every == 0
        by_time = bool(t.save_every_minutes) and time.monotonic() - self._last_save >= 60 * t.save_every_minutes
        return by_steps or by_time

    def _checkpoint(self, s: "_Stage", batch: int = 0, stage_done: bool = False) -> None:
        """A checkpoint at batch `batch` of the current epoch, or (stage_done) at the start of the next stage."""
        self._last_save = time.monotonic()
        if not self.accelerator.is_main_process:
            return
        if stage_done:
            info = {"stage": s.index + 1, "global_step": s.step, "epoch": 0, "batch": 0, "stage_batches": 0,
                    "trainable": [], "stage_done": True, "time": time.time(), "stage_seconds": 0.0}
        else:
            info = {"stage": s.index, "global_step": s.step, "epoch": s.epoch, "batch": batch,
                    "stage_batches": s.done, "trainable": s.trainable, "stage_done": False, "time": time.time(),
                    "stage_seconds": s.seconds()}
        path = save_checkpoint(self.dir, self.model, s.optimizer, s.scheduler, info, self.run.training.keep_last)
        self._log("checkpoint", path=path.name, step=s.step, stage=info["stage"])

    def _precision(self) -> str:
        from ..llm import training_precision

        return training_precision(self.run.training.precision, self.model.device)

    def _request_cancel(self, *_):
        self._cancel = True

    def _log(self, kind: str, **values) -> None:
        accelerator = getattr(self, "accelerator", None)
        if accelerator is not None and not accelerator.is_main_process:
            return  # one log per run, written by the main process
        row = self.metrics.write(kind, **values)
        if self.on_log is not None:
            self.on_log(row)


@dataclass(eq=False)
class _Stage:
    """What one stage's loop carries from batch to batch; its position is what a checkpoint records."""

    index: int
    spec: StageSpec
    dataset: Any
    eval_dataset: Any
    trainable: list[str]
    optimizer: Any
    total_batches: int
    step: int
    budget: float | None
    started: float
    """perf_counter() at the stage's (virtual) start: a resumed stage counts the seconds it already spent."""
    first_step: int = 0
    """The global step the stage (or its resumed part) began at."""
    scheduler: Any = None
    model: Any = None
    weights: torch.Tensor | None = None
    epoch: int = 0
    skip: int = 0
    done: int = 0
    best: float = -1.0
    patience: int = 0
    norm: torch.Tensor = field(default_factory=lambda: torch.tensor(float("nan")))  # until the first update
    window_loss: list[float] = field(default_factory=list)
    window_samples: int = 0
    window_start: float = field(default_factory=time.perf_counter)

    def seconds(self) -> float:
        return time.perf_counter() - self.started


def _epoch_order(n: int, weights: torch.Tensor | None, seed: int) -> torch.Tensor:
    """One epoch's sample order: a permutation, or `n` weighted draws with replacement when balancing.
    Seeded by stage and epoch, so a resumed run replays the same order."""
    generator = torch.Generator().manual_seed(seed)
    if weights is None:
        return torch.randperm(n, generator=generator)
    return torch.multinomial(weights, n, replacement=True, generator=generator)


def _budget_schedule(optimizer, warmup_ratio: float, total: int, spent: Callable[[], float]):
    """Warmup + cosine over the stage's progress, measured by whichever runs out first: the steps or the
    time budget. Warmup is a share of that progress too, so a time-limited stage with a generous step
    count does not spend its budget warming up."""
    from torch.optim.lr_scheduler import LambdaLR

    def factor(step: int) -> float:
        progress = min(1.0, max(step / max(1, total), spent()))
        if progress < warmup_ratio:
            return max(progress / warmup_ratio, 1e-3)
        return 0.5 * (1.0 + math.cos(math.pi * (progress - warmup_ratio) / max(1e-9, 1.0 - warmup_ratio)))

    return LambdaLR(optimizer, factor)


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread() and os.name == "posix"
