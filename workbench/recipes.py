"""Recipes a front end can launch: the example run configs and the saved configs of earlier runs, each with a
line saying what it trains, its budget, its data and its last measured accuracy; and edits applied to one.

- `recipe_catalog`: every recipe (a file that cannot be read is listed with its error, so one broken file never
  hides the others); `default_recipe`: the one a picker starts on.
- `summarize` / `budget_text` / `data_text`: one line each, for people.
- `measured_accuracy`: the accuracy bench/RESULTS.md reports for a recipe file, or None (never a guess).
- `recipe_fields` / `apply_edits`: the editable fields of a recipe, and a new validated RunConfig with edits.
"""
from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import DataSpec, RunConfig, load_run_config, load_yaml
from .errors import ConfigError, WorkbenchError

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "examples" / "configs"
RESULTS = REPO / "bench" / "RESULTS.md"
DEFAULT = "fast_easyvqa.yaml"
"""Learns at its default budget (bench/RESULTS.md, easyvqa_time_to_accuracy): the picker's first choice."""
STAGE_COLUMNS = ["stage", "trains", "data", "epochs", "minutes", "lr", "lr_llm"]
"""The stage table of `recipe_fields`; the last four are editable."""


@dataclass
class Recipe:
    key: str
    """What a picker holds: "examples/NAME.yaml" or "run:RUN_ID"."""
    label: str
    path: Path
    run: RunConfig | None = None
    error: str = ""
    """Why the file cannot be launched (then `run` is None)."""
    accuracy: str | None = None

    @property
    def summary(self) -> str:
        if self.run is None:
            return f"cannot be launched: {self.error}"
        return (f"{summarize(self.run)} · budget {budget_text(self.run)} · data {data_text(self.run)} · "
                f"measured: {self.accuracy or 'not measured'}")


def recipe_catalog(registry=None, examples: str | Path = EXAMPLES, results: str | Path = RESULTS) -> list[Recipe]:
    """The example recipes (run configs in `examples`; bare model configs belong to the Build tab and are left
    out), then the saved config of every run in `registry`, newest first."""
    results_text = Path(results).read_text(encoding="utf-8") if Path(results).is_file() else ""
    recipes = []
    for path in sorted(Path(examples).glob("*.yaml")):
        try:
            if _bare_model_config(path):
                continue
            recipe = Recipe(f"examples/{path.name}", path.name, path, run=load_run_config(path))
        except WorkbenchError as e:
            recipe = Recipe(f"examples/{path.name}", f"{path.name} (broken)", path, error=str(e).splitlines()[0])
        recipe.accuracy = measured_accuracy(results_text, path.name)
        recipes.append(recipe)
    for row in registry.list() if registry is not None else []:
        path = registry.run_dir(row["id"]) / "run.yaml"
        try:
            recipe = Recipe(f"run:{row['id']}", f"run {row['id']} ({row['status']})", path, run=load_run_config(path))
        except WorkbenchError as e:
            recipe = Recipe(f"run:{row['id']}", f"run {row['id']} (broken)", path, error=str(e).splitlines()[0])
        recipes.append(recipe)
    return recipes


def _bare_model_config(path: Path) -> bool:
    data = load_yaml(path)
    return "model" not in data and "encoder" in data


def default_recipe(recipes: list[Recipe]) -> str | None:
    """DEFAULT when it is there and readable, else the first readable recipe."""
    usable = [r for r in recipes if r.run is not None]
    preferred = [r for r in usable if r.key == f"examples/{DEFAULT}"]
    chosen = preferred or usable
    return chosen[0].key if chosen else None


def find_recipe(recipes: list[Recipe], key: str) -> Recipe:
    for r in recipes:
        if r.key == key:
            if r.run is None:
                raise ConfigError(f"{r.label} cannot be launched: {r.error}")
            return r
    raise ConfigError(f"No recipe '{key}'. Recipes: {', '.join(r.key for r in recipes) or 'none'}")


# ------------------------------------------------------------------------------------------------ one-liners

def trains_text(run: RunConfig, stage) -> str:
    """What a stage trains, in words: integrator, encoder, the whole LLM or its PEFT modules."""
    parts = (["encoder"] if stage.train_encoder else []) + (["integrator"] if stage.train_integrator else [])
    if stage.llm == "full":
        parts.append("whole LLM")
    elif stage.llm == "peft":
        parts.append(peft_text(run))
    return " + ".join(parts) or "nothing"


def peft_text(run: RunConfig) -> str:
    p = run.model.peft
    if p.method == "none":
        return "no PEFT"
    layers = p.layers if p.layers is not None else p.options.get("layers_to_transform")
    detail = [f"r={p.r}"] if p.method in ("lora", "dora") else []
    detail += [f"on {', '.join(p.target_modules)}"] if p.target_modules else []
    detail += [f"layers {_span(layers)}"] if layers else []
    return f"{p.method}" + (f" ({' '.join(detail)})" if detail else "")


def _span(layers: list[int]) -> str:
    layers = sorted(layers)
    if len(layers) > 2 and layers == list(range(layers[0], layers[-1] + 1)):
        return f"{layers[0]}–{layers[-1]}"
    return ", ".join(map(str, layers))


def summarize(run: RunConfig) -> str:
    """`direct: adapt trains integrator + lora (r=8 …) · llama_adapter on mobilenet_v2 → smollm2-135m-instruct`."""
    from .paradigms import resolve_stages

    m = run.model
    stages = "; ".join(f"{s.name} trains {trains_text(run, s)}" for s in resolve_stages(run))
    return f"{run.paradigm}: {stages} · {m.integrator.name} on {m.encoder.name} → {m.llm.name}"


def budget_text(run: RunConfig) -> str:
    """The stages' time budget in minutes when every stage has one, else their epochs (and minutes where set)."""
    from .paradigms import resolve_stages

    stages = resolve_stages(run)
    if all(s.max_minutes for s in stages):
        return f"{sum(s.max_minutes for s in stages):g} min"
    return " + ".join(f"{s.epochs:g} epoch(s)" + (f" or {s.max_minutes:g} min" if s.max_minutes else "")
                      for s in stages)


def data_text(run: RunConfig) -> str:
    def one(spec: DataSpec) -> str:
        return described(spec.kind, spec.options)

    def described(kind: str, options: dict) -> str:
        text = ", ".join(f"{k}={described(v['kind'], v.get('options') or {}) if _names_data(v) else v}"
                         for k, v in options.items())
        return kind + (f" ({text})" if text else "")

    from .paradigms import resolve_stages

    own = [f"{s.name}: {one(s.data)}" for s in resolve_stages(run) if s.data != run.data]
    return "; ".join([one(run.data)] + own)


def _names_data(value: Any) -> bool:
    """A loader option that names other data (task-captions' `source`)."""
    return isinstance(value, dict) and isinstance(value.get("kind"), str) and isinstance(value.get("options", {}), dict)


# ------------------------------------------------------------------------------------------------ measured

def measured_accuracy(results_text: str, filename: str) -> str | None:
    """The accuracy bench/RESULTS.md reports for recipe `filename`: a table row naming
    `examples/configs/FILENAME`, or the last measured row (first cell a number) of a table whose section runs
    the recipe as it is (`workbench train examples/configs/FILENAME` with no other arguments). The last
    such mention in the file wins; None when there is none."""
    path = f"examples/configs/{filename}"
    plain_command = f"`workbench train {path}`"
    found, heading, date, prose, header = None, "", "", "", None
    for line in results_text.splitlines():
        if line.startswith("## "):
            heading, date, prose, header = line[3:].split(" — ")[0].strip(), "", "", None
            continue
        if line.startswith("<!--") and line.rstrip().endswith(":end -->"):  # text after a section is its own
            heading, date, prose, header = "bench/RESULTS.md", "", "", None
            continue
        if line.startswith("- date:"):
            date = line.split(":", 1)[1].strip().split(" ")[0]
        if not line.startswith("|"):
            if line.strip():
                prose = prose + " " + line if header is None else line
                header = None
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if header is None:
            header = cells
            continue
        column = next((i for i, h in enumerate(header) if h.startswith("accuracy")), None)
        if column is None or set("".join(cells)) <= set("-: ") or column >= len(cells):
            continue
        named = any(path in c for c in cells)
        measured = plain_command in prose and re.fullmatch(r"[\d.]+", cells[0] or "") is not None
        if named or measured:
            when = date or next(iter(re.findall(r"\d{4}-\d{2}-\d{2}", prose)), "")
            found = f"{cells[column]}% ({heading or 'bench/RESULTS.md'}" + (f", {when}" if when else "") + ")"
    return found


# ------------------------------------------------------------------------------------------------ editing

def recipe_fields(run: RunConfig) -> dict[str, Any]:
    """What a recipe editor shows: name, LLM, batch size, the stage table (STAGE_COLUMNS), the overall budget
    in minutes (0: none), PEFT method, rank, layers and target modules, the data kind and its options."""
    from .paradigms import resolve_stages

    stages = resolve_stages(run)
    peft = run.model.peft
    layers = peft.layers if peft.layers is not None else peft.options.get("layers_to_transform")
    return {"name": run.name, "llm": run.model.llm.name, "batch_size": run.training.batch_size,
            "stages": [[s.name, trains_text(run, s), data_text_of(s.data), s.epochs, s.max_minutes or 0, s.lr,
                        s.lr_llm] for s in stages],
            "budget": sum(s.max_minutes or 0 for s in stages), "peft_method": peft.method, "peft_r": peft.r,
            "peft_layers": ", ".join(map(str, layers or [])), "peft_targets": ", ".join(peft.target_modules or []),
            "data_kind": run.data.kind, "data_options": dict(run.data.options)}


def data_text_of(spec: DataSpec | None) -> str:
    return "" if spec is None else spec.kind + "".join(f" {k}={v}" for k, v in spec.options.items())


def apply_edits(run: RunConfig, edits: dict[str, Any]) -> RunConfig:
    """A new validated RunConfig: `run` (left as it is) with `edits` applied. Keys (all optional) as
    `recipe_fields` returns them. The stage table's epochs, minutes (0: none) and learning rates are taken
    row by row. `budget` (minutes, 0: none), when it differs from `run`'s own total, is spread over the stages
    in proportion to their minutes (evenly when they had none). A new data kind replaces the run's data (stages
    with their own data keep it) and drops an evaluation set of the old kind."""
    from .options import from_form
    from .paradigms import PARADIGMS, resolve_stages, spread_budget
    from .peft_modules import METHODS, method_options

    run = copy.deepcopy(run)
    original = run.stages or list(PARADIGMS.get(run.paradigm).stages)
    stages = resolve_stages(run)
    for own, resolved in zip(original, stages):
        if own.data is None:
            resolved.data = None  # keeps following the run's data
    if edits.get("name"):
        run.name = str(edits["name"]).strip()
    if edits.get("llm"):
        run.model.llm.name = str(edits["llm"]).strip()
    if edits.get("batch_size") is not None:
        run.training.batch_size = _number("batch size", edits["batch_size"], 1, whole=True)
    rows = edits.get("stages")
    if rows is not None:
        if len(rows) != len(stages):
            raise ConfigError(f"The recipe has {len(stages)} stage(s); the table has {len(rows)} rows")
        for stage, row in zip(stages, rows):
            values = dict(zip(STAGE_COLUMNS, row))
            where = f"stage '{stage.name}'"
            stage.epochs = _number(f"{where} epochs", values["epochs"], 0.0)
            minutes = _number(f"{where} minutes", values["minutes"] or 0, 0.0)
            stage.max_minutes = minutes or None
            stage.lr = _number(f"{where} lr", values["lr"], 0.0)
            stage.lr_llm = _number(f"{where} lr_llm", values["lr_llm"], 0.0)
    budget = edits.get("budget")
    own_total = sum(s.max_minutes or 0 for s in (resolve_stages(copy.deepcopy(run))))
    if budget is not None and abs(_number("budget", budget, 0.0) - own_total) > 1e-9:
        if budget:
            spread_budget(stages, float(budget))
        else:
            for s in stages:
                s.max_minutes = None
    run.stages = stages
    peft = run.model.peft
    if edits.get("peft_method") is not None:
        if edits["peft_method"] not in METHODS:
            raise ConfigError(f"Unknown PEFT method '{edits['peft_method']}'. Valid methods: {', '.join(METHODS)}")
        peft.method = edits["peft_method"]
    declared = {o.name: o for o in method_options(peft.method)}
    what = f"PEFT method {peft.method}"
    for key, field in (("peft_r", "r"), ("peft_layers", "layers"), ("peft_targets", "target_modules")):
        if key in edits and field in declared:
            setattr(peft, field, from_form(what, declared[field], edits[key]))
    if "peft_layers" in edits and "layers" in declared:
        peft.options.pop("layers_to_transform", None)  # the editor's layers replace the file's
    if "peft_layers" in edits and "layers" not in declared:
        peft.layers = None
        peft.options.pop("layers_to_transform", None)
    kind = edits.get("data_kind")
    options = edits.get("data_options")
    if kind or options is not None:
        if options is not None and not isinstance(options, dict):
            raise ConfigError("Data options must be a mapping of loader options, e.g. {\"split\": \"train\"}")
        kind = kind or run.data.kind
        if kind != run.data.kind and run.eval_data is not None and run.eval_data.kind == run.data.kind:
            run.eval_data = None
        run.data = DataSpec(kind=kind, options=dict(options if options is not None else run.data.options),
                            balance=run.data.balance)
    return run.validate()


def _number(what: str, value: Any, minimum: float, whole: bool = False) -> Any:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{what} must be a number, got {value!r}") from None
    if number < minimum:
        raise ConfigError(f"{what} must be at least {minimum:g}, got {number:g}")
    if whole:
        if not number.is_integer():
            raise ConfigError(f"{what} must be a whole number, got {number:g}")
        return int(number)
    return number
