"""Integrators compared: every modality-integrator family on easy-VQA at one equal training budget.

Same data (the config's: the whole easy-VQA train split), same encoder (embedded MobileNetV2) and LLM
(embedded SmolLM2-135M-Instruct, frozen, with the same LoRA modules), same recipe (direct adaptation: the
integrator and LoRA train together, same learning rate and batch) and the same wall-clock training budget
per row — each row runs `workbench train examples/configs/direct_lora_easyvqa.yaml --integrator NAME` in its
own process. (With a frozen LLM and no LoRA, a few CPU minutes are not enough for any prefix integrator to
teach SmolLM2 to answer: measured 42.9% for `linear` after 3 minutes, below the text-only floor.)
The frozen encoder's features are computed once before the rows (all rows share the feature cache), so
no row pays for them. Each trained model is then evaluated on the same test questions.

The floor is the text-only baseline: the very same recipe (LoRA) at the same budget on the same questions
without their images. An integrator that does not clearly beat it has not learned to see.

Columns: test accuracy (overall, yes/no, colour, shape), trainable parameters, visual tokens per image,
seconds per optimizer step (median over the run), optimizer steps done in the budget, peak memory of
the training process.

Rows are saved per budget in bench/integrators_rows/ (small JSON files, committed with the table), so `--only a,b`
re-runs some rows, on another day or in another session, and the table in RESULTS.md merges them with the rows
saved before (each row gives its date and machine).

`--set KEY=VALUE` (repeatable) tries one change on the rows named by `--only`, e.g.
`--only qformer --set model.integrator.options.num_queries=32`: such rows are saved beside the others and listed
in a second table of variants, never counted as the family's recommended recipe.

Run: .venv/bin/python bench/integrators.py [--quick] [--minutes M] [--limit N] [--only a,b,c] [--set KEY=VALUE]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402
import _runs as R  # noqa: E402

CONFIG = "examples/configs/direct_lora_easyvqa.yaml"
BASELINE_CONFIG = CONFIG
MARGIN = 0.05  # "clearly beats the text-only baseline": at least 5 points of accuracy
TARGET = 0.90  # issue 15: every family >= 90% within 10 minutes
STATE = C.BENCH_DIR / "integrators_rows"  # one JSON per row and budget, committed: the table is built from them


def warm_feature_cache(config: dict, cache_dir: Path) -> float:
    """Compute the frozen encoder's features for the training images once, into the shared cache."""
    from workbench.config import RunConfig, from_dict
    from workbench.data.loaders import load_dataset_spec
    from workbench.encoders import build_encoder
    from workbench.images import load_image
    from workbench.training.feature_cache import FeatureCache

    run = from_dict(RunConfig, config)
    data = load_dataset_spec(run.data.kind, **run.data.options)
    paths = sorted({str(image) for sample in data for image in sample.images})
    cache = FeatureCache(build_encoder(run.model.encoder), root=cache_dir)
    t0 = time.time()
    for start in range(0, len(paths), 256):
        cache.get([load_image(p) for p in paths[start:start + 256]])
    return time.time() - t0


def run_row(name: str, config: dict, tmp: Path, cache_dir: Path, args, text_only: bool = False) -> dict:
    row_tmp = tmp / name
    row_tmp.mkdir()
    extra = [] if text_only else ["--integrator", name, *(f"--set={item}" for item in args.set)]
    run = R.train(config, row_tmp, R.fresh_home(row_tmp, share_features=cache_dir), name, extra)
    run_dir = Path(run["run_dir"])
    rows = R.metrics(run_dir)
    result = R.evaluate(run_dir / "model", args.limit, text_only=text_only)
    if args.keep:
        import shutil

        kept = Path(args.keep) / name
        shutil.rmtree(kept, ignore_errors=True)
        shutil.copytree(run_dir / "model", kept)
    steps = R.steps_taken(rows)
    out = {"name": name, "wall_s": run["wall_s"], "peak_mb": R.peak_mb(rows), "steps": steps,
           "s_per_step": R.seconds_per_step(rows), **result}
    print(f"  {name:<14} accuracy {result['accuracy']:.4f} {result['by_type']}  {steps} steps, "
          f"{result['trainable_params']:,} trainable, {result['visual_tokens']} tokens", flush=True)
    return out


def variant_name(name: str, overrides: list[str]) -> str:
    """`qformer (num_queries=32; seed=1)`: the row of one integrator with `--set` changes, named by their last key
    parts."""
    parts = []
    for item in overrides:
        key, value = item.split("=", 1)
        parts.append(f"{key.rsplit('.', 1)[-1]}={value}")
    return f"{name} ({'; '.join(parts)})"


def row_file(state: Path, name: str, overrides: list[str]) -> Path:
    """The row's JSON file; a variant's name is made file-safe."""
    if not overrides:
        return state / f"{name}.json"
    slug = "".join(c if c.isalnum() or c in "-_" else "_" for c in "+".join(overrides))
    return state / f"{name}+{slug}.json"


def row_state(minutes: float) -> Path:
    """Where each row of a `minutes` budget is saved, so rows run on different days (`--only`) merge into one table."""
    return STATE / f"{minutes:g}min"


def describe_lora(config: dict) -> str:
    """`LoRA r=8 on q/k/v/o/gate/up/down in its top 8 layers`, read from the recipe rather than restated by hand."""
    peft = config["model"].get("peft") or {}
    modules = "/".join(m.removesuffix("_proj") for m in peft.get("target_modules", []))
    layers = (peft.get("options") or {}).get("layers_to_transform")
    where = f" in its top {len(layers)} layers" if layers else ""
    return f"LoRA r={peft.get('r')} on {modules}{where}"


def machine_lines(rows: list[dict]) -> str:
    """One machine line, or one per machine naming its rows when rows were measured on different machines."""
    machines: dict[str, list[str]] = {}
    for r in rows:
        machines.setdefault(r["machine"], []).append(r["name"])
    if len(machines) == 1:
        return f"- machine: {next(iter(machines))}"
    return "\n".join(f"- machine: {m} (rows: {', '.join(names)})" for m, names in machines.items())


def report(config: dict, rows: list[dict], minutes: float, limit: int) -> tuple[str, int]:
    """The RESULTS.md section (every saved row of this budget, best first, the text-only floor last) and how many
    families reach TARGET."""
    from workbench.integrators import INTEGRATORS

    variants = sorted((r for r in rows if r.get("overrides")), key=lambda r: r["name"])
    rows = [r for r in rows if not r.get("overrides")]
    floor_row = next((r for r in rows if r["name"] == "text-only"), None)
    floor = floor_row["accuracy"] if floor_row else None
    headers = ["integrator", "family", "accuracy %", "yes/no %", "colour %", "shape %", "vs text-only (points)",
               "trainable params", "visual tokens", "s/step", "steps", "peak memory (MB)", "measured"]
    others = sorted((r for r in rows if r is not floor_row), key=lambda r: -r["accuracy"])

    def line(r: dict) -> list[str]:
        text_only = r is floor_row
        family = "LoRA, no image" if text_only else INTEGRATORS.info(r.get("integrator", r["name"])).get("family", "")
        return [r["name"], family, f"{100 * r['accuracy']:.2f}", *R.by_type(r),
                "" if text_only or floor is None else f"{100 * (r['accuracy'] - floor):+.1f}",
                f"{r['trainable_params']:,}",
                "0" if text_only else str(r["visual_tokens"]), f"{r['s_per_step']:.2f}", str(r["steps"]),
                f"{r['peak_mb']:.0f}", f"{r['date']} ({r['load']})"]

    table = [line(r) for r in others + ([floor_row] if floor_row else [])]
    variant_table = [line(r) for r in variants]
    print(C.text_table(headers, table + variant_table))
    beaten = [r for r in others if floor is not None and r["accuracy"] >= floor + MARGIN]
    reached = [r for r in others if r["accuracy"] >= TARGET]
    missing = [n for n in INTEGRATORS.names() if n not in {r["name"] for r in others}]
    body = "\n".join([
        "## integrators — every integrator family on easy-VQA at an equal budget",
        "",
        f"`workbench train {CONFIG} --integrator NAME` per row, in its own process: MobileNetV2 (frozen) → "
        f"integrator → SmolLM2-135M-Instruct (frozen) with {describe_lora(config)}, where the visual tokens of "
        "integrators that have them enter (`visual_entry_layer: -8`; the layers below see only text and are "
        "cached when nothing in them trains), direct-adaptation recipe (integrator + LoRA train together, "
        f"lr 1e-3, batch 16), on the config's training data, **{minutes:g} minutes of training per row** (the "
        "stage's time budget; the cosine schedule follows the clock), features cached once beforehand for all "
        "rows of one invocation. The text-only floor is the same recipe at the same budget without the images. "
        f"Evaluated on {limit or 9673} easy-VQA test questions (seeded subset) by greedy generation and "
        "normalised exact match. Rows may come from separate invocations (`--only`); each gives its date and "
        "the share of the CPU other processes used meanwhile.",
        "",
        machine_lines(rows),
        f"- command: `.venv/bin/python bench/integrators.py --minutes {minutes:g} --limit {limit}` "
        "(or `--only a,b` per row)",
        "",
        C.markdown_table(headers, table),
        "",
        f"{len(beaten)} of {len(others)} integrators beat the text-only floor by at least {100 * MARGIN:.0f} points; "
        f"{len(reached)} of {len(others)} reach {100 * TARGET:.0f}%."
        + (f" Not measured at this budget: {', '.join(missing)}." if missing else ""),
    ] + ([
        "",
        "Variants: one change to a family's recommended recipe (`--only NAME --set KEY=VALUE`), not counted above.",
        "",
        C.markdown_table(headers, variant_table),
    ] if variants else []))
    return body, len(reached)


def main() -> int:
    global STATE
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="20-second budgets, 200 test questions")
    parser.add_argument("--minutes", type=float, default=4.0, help="training budget per row")
    parser.add_argument("--limit", type=int, default=1000, help="test questions per evaluation (0: all 9,673)")
    parser.add_argument("--only", help="comma-separated integrators (default: all); the text-only floor runs too "
                                       "unless this budget already has one saved (name it to re-run it)")
    parser.add_argument("--report", action="store_true", help="train nothing: write the table from the saved rows")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="try one change on the --only rows (repeatable); saved as variants beside the table")
    parser.add_argument("--json", help="also write the rows here")
    parser.add_argument("--keep", help="keep each row's trained model under this folder (bench/attention_localisation.py "
                                       "reads them from there)")
    args = parser.parse_args()
    if args.quick:
        args.minutes, args.limit = 0.33, 200
        STATE = Path(tempfile.mkdtemp(prefix="integrators-quick-"))
    C.setup_environment()
    from workbench.integrators import INTEGRATORS

    names = args.only.split(",") if args.only else ["text-only", *INTEGRATORS.names()]  # a new family too
    unknown = [n for n in names if n != "text-only" and n not in INTEGRATORS.names()]
    if unknown:
        parser.error(f"unknown integrator(s): {', '.join(unknown)}")
    bad = [item for item in args.set if "=" not in item]
    if bad:
        parser.error(f"--set takes KEY=VALUE, got: {', '.join(bad)}")
    if args.set and (not args.only or "text-only" in names):
        parser.error("--set changes integrator rows: name them with --only (the text-only floor is not a variant)")
    state = row_state(args.minutes)
    if args.report:
        names = []
    elif "text-only" not in names and not (state / "text-only.json").is_file() and not args.set:
        names.insert(0, "text-only")
    elif "text-only" in names:
        names.insert(0, names.pop(names.index("text-only")))
    config = R.with_budget(R.read_yaml(C.REPO / CONFIG), args.minutes)
    baseline = R.with_budget(R.read_yaml(C.REPO / BASELINE_CONFIG), args.minutes, text_only=True)
    results = []
    state.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        cache_dir = tmp / "feature-cache"
        if names:
            print(f"== feature cache: {warm_feature_cache(config, cache_dir):.0f} s (shared by every row, not in "
                  "the budget)")
            print(f"== {', '.join(names)}: {args.minutes:g} min each", flush=True)
        for name in names:
            load = C.OtherLoad()
            text_only = name == "text-only"
            row = run_row(name, baseline if text_only else config, tmp, cache_dir, args, text_only=text_only)
            load.stop()
            share = "unknown" if load.share is None else f"{100 * load.share:.0f}%"
            row.update(date=time.strftime("%Y-%m-%d", time.gmtime()), load=f"other load {share}", machine=C.machine_line(),
                       limit=args.limit)
            if args.set and not text_only:
                row.update(name=variant_name(name, args.set), integrator=name, overrides=args.set)
            row_file(state, name, [] if text_only else args.set).write_text(json.dumps(row, indent=2, default=str))
            results.append(row)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=str))

    saved = [json.loads(p.read_text()) for p in sorted(state.glob("*.json"))]
    saved = [r for r in saved if r.get("limit") == args.limit]  # one table, one question set
    if not saved:
        print(f"no rows saved for {args.minutes:g} minutes and --limit {args.limit}: run some first")
        return 1
    body, reached = report(config, saved, args.minutes, args.limit)
    if not args.quick:
        C.write_results_section("integrators", body)
    families = len(INTEGRATORS.names())
    print(C.result_line("integrators_reaching_90", f"{reached}/{families}", f"{families}/{families}",
                        reached == families))
    return 0


if __name__ == "__main__":
    sys.exit(main())
