"""One recipe at one training budget: train it as a user does, then ask it easy-VQA test questions.

`workbench train CONFIG --set …` in its own process with every stage's time budget scaled to `--minutes`
(`paradigms.spread_budget`), a fresh workbench home (so the frozen encoder's features are computed inside the
budget, as on a new machine) and no evaluation during training; then the saved model answers `--limit` test
questions (seeded subset; 0 = all 9,673). For trying one change to a recipe at a time, e.g.

    .venv/bin/python bench/recipe_at_budget.py examples/configs/direct_lora_easyvqa.yaml --minutes 10 \
        --set training.batch_size=8
    .venv/bin/python bench/recipe_at_budget.py examples/configs/direct_lora_easyvqa.yaml --integrator qformer

`--shipped` keeps the recipe's own budget instead (the recipe as a user launches it). `--every M` also keeps a
checkpoint every M minutes and evaluates each (`--checkpoint-limit` questions): the learning curve of one run,
e.g. when yes/no leaves the text prior. `--keep DIR` copies the trained model there, for
bench/easyvqa_yes_no.py and bench/attention_localisation.py.

Prints optimizer steps, seconds per step, the text-state cache's cut and hit rate, accuracy by question type,
and `RESULT recipe_accuracy <accuracy> target >=0.90` last.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402
import _runs as R  # noqa: E402

TARGET = 0.90


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", help="run config YAML (examples/configs/)")
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument("--minutes", type=float, default=10.0, help="training budget, spread over the stages")
    budget.add_argument("--shipped", action="store_true", help="keep the recipe's own budget")
    parser.add_argument("--limit", type=int, default=1000, help="test questions (0: all 9,673)")
    parser.add_argument("--integrator", help="use this integrator (its default options) instead of the config's")
    parser.add_argument("--every", type=float, help="minutes between evaluated checkpoints (default: none)")
    parser.add_argument("--checkpoint-limit", type=int, default=500, help="test questions per earlier checkpoint")
    parser.add_argument("--keep", help="copy the trained model to this folder")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override (repeatable)")
    args = parser.parse_args()
    C.setup_environment()
    minutes = None if args.shipped else args.minutes
    config = R.with_budget(R.read_yaml(C.REPO / args.config), minutes, checkpoint_minutes=args.every)
    with tempfile.TemporaryDirectory(prefix="recipe-") as tmp:
        tmp = Path(tmp)
        extra = (["--integrator", args.integrator] if args.integrator else []) + [
            a for kv in args.set for a in ("--set", kv)]
        started = time.time()
        run = R.train(config, tmp, R.fresh_home(tmp), Path(args.config).stem, extra)
        run_dir = Path(run["run_dir"])
        rows = R.metrics(run_dir)
        curve = []
        if args.every:
            for seconds, step, model_dir in R.checkpoint_points(run_dir, started, args.every)[:-1]:
                curve.append((seconds / 60, step, R.evaluate(model_dir, args.checkpoint_limit)))
        result = R.evaluate(run_dir / "model", args.limit)
        if args.keep:
            import shutil

            shutil.rmtree(args.keep, ignore_errors=True)
            shutil.copytree(run_dir / "model", args.keep)
    steps = R.steps_taken(rows)
    trained = (rows[-1]["time"] - started) / 60 if rows else float("nan")
    cache = [r for r in rows if r["kind"] == "text_state_cache"]
    print(f"machine: {C.machine_line()}")
    budget = "its own budget" if args.shipped else f"{args.minutes:g} min"
    print(f"{args.config} {' '.join(extra)}: {budget} ({trained:.1f} min to the saved model), {steps} optimizer steps, "
          f"{R.seconds_per_step(rows):.2f} s/step, wall {run['wall_s']:.0f} s")
    for minutes, step, r in curve:
        print(f"checkpoint {minutes:.1f} min, step {step}: {100 * r['accuracy']:.2f}% on {args.checkpoint_limit} "
              f"questions (yes/no, colour, shape: {', '.join(R.by_type(r))})")
    if cache:
        print("text-state cache: " + ", ".join(f"{k} {cache[-1][k]}" for k in ("cut", "hit_rate", "entries")
                                               if k in cache[-1]))
    print(f"accuracy {100 * result['accuracy']:.2f}% on {args.limit or 9673} questions "
          f"(yes/no, colour, shape: {', '.join(R.by_type(result))})")
    print(C.result_line("recipe_accuracy", f"{result['accuracy']:.4f}", f">={TARGET}", result["accuracy"] >= TARGET))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
