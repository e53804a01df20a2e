"""Registration is the only step: a new integrator family is one new file.

A trivial family is written as a module into a folder on `workbench.integrators`' package path (as if it were
dropped into workbench/integrators/) and found by the same discovery the package runs on import. Nothing
else is edited, and the CLI catalog, the app's choices, the paradigms, the contract tests and the trainer's
every-family test all take it."""
import sys

import pytest

from workbench.integrators import INTEGRATORS
from workbench.integrators.base import Integrator
from workbench.registry import discover

FAMILY = '''"""One visual token per image: the mean encoder token, projected (a trivial family)."""
import torch
from torch import nn

from workbench.integrators import INTEGRATORS
from workbench.integrators.base import Integrator, TextScaleNorm


@INTEGRATORS.register("mean_token", family="pooling", follows="none (a test family)", paradigms=["single-stage"],
                      placement="prefix", description="The mean encoder token, projected")
class MeanToken(Integrator):
    def __init__(self, context, output_norm: bool = True):
        super().__init__(context)
        self.proj = nn.Linear(context.vision_dim, context.llm_hidden)
        self.out_norm = TextScaleNorm(context) if output_norm else nn.Identity()

    @property
    def num_tokens(self) -> int:
        return 1

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        self.check_features(features)
        return self.out_norm(self.proj(features.mean(dim=1, keepdim=True)))
'''


@pytest.fixture()
def registry_snapshot(monkeypatch):
    """Registrations made in a test end with it."""
    monkeypatch.setattr(INTEGRATORS, "_entries", dict(INTEGRATORS._entries))


@pytest.fixture()
def new_family(tmp_path, monkeypatch, registry_snapshot):
    import workbench.integrators as package

    folder = tmp_path / "integrators"
    folder.mkdir()
    (folder / "mean_token.py").write_text(FAMILY)
    monkeypatch.setattr(package, "__path__", [*package.__path__, str(folder)])
    found = discover(package.__name__, package.__path__)
    yield found
    sys.modules.pop("workbench.integrators.mean_token", None)


def test_one_new_file_is_a_new_family_everywhere(new_family, tiny_config, example_image, tmp_path, capsys):
    import json

    import test_app
    import test_integrators_prefix as contract
    import test_training
    from workbench.cli import main
    from workbench.config import IntegratorSpec, ModelConfig, RunConfig, save_model_config
    from workbench.errors import ConfigError
    from workbench.paradigms import resolve_stages

    assert "mean_token" in new_family
    cls = INTEGRATORS.get("mean_token")
    assert (cls.registry_name, cls.family, cls.placement) == ("mean_token", "pooling", "prefix")  # stamped

    config_file = save_model_config(tiny_config, tmp_path / "tiny.yaml")
    assert main(["components", "integrators", "--for", str(config_file), "--json"]) == 0
    row = {r["name"]: r for r in json.loads(capsys.readouterr().out)["integrators"]}["mean_token"]
    assert row["family"] == "pooling" and row["visual_tokens"] == 1 and row["trainable_params"] > 0

    app = test_app.app_module.build_app(tmp_path / "runs")
    assert "mean_token" in test_app.dropdown_values(app, "Modality integrator")

    model = ModelConfig(integrator=IntegratorSpec(name="mean_token"))
    assert resolve_stages(RunConfig(paradigm="single-stage", model=model))[0].train_integrator
    with pytest.raises(ConfigError, match=r"inside the LLM \(gated_xattn, lavin_mma, llama_adapter\)"):
        resolve_stages(RunConfig(paradigm="direct", model=model))  # a prefix family: its placement was read

    assert "mean_token" in contract.families()
    for where in contract.CONTEXTS:
        contract.test_output_shape_and_token_count("mean_token", where)
    for check in (contract.test_defaults_build_at_real_widths, contract.test_visual_tokens_start_at_the_text_embedding_scale,
                  contract.test_gradients_reach_every_integrator_parameter, contract.test_wrong_token_count_is_explained,
                  contract.test_unknown_option_is_a_config_error):
        check("mean_token")
    contract.test_save_load_round_trip("mean_token", tmp_path)
    contract.test_end_to_end_loss_and_generation("mean_token", tiny_config, example_image)
    assert "mean_token" in INTEGRATORS.names()  # what the every-family training test is parametrized over
    test_training.test_every_integrator_family_trains_in_the_single_stage_recipe("mean_token", tiny_config,
                                                                                  example_image, tmp_path / "train")


DECLARED = dict(family="pooling", follows="none", paradigms=["single-stage"], placement="prefix", description="-")


class _Plain(Integrator):
    pass


class _Repeats(Integrator):
    placement = "prefix"


@pytest.mark.parametrize("cls, info, message", [
    (_Repeats, DECLARED, "placement is declared by the registration"),
    (_Plain, {k: v for k, v in DECLARED.items() if k != "family"}, "must declare family"),
    (_Plain, {**DECLARED, "placement": "in_llm"}, "but the class does not override attach"),
    (_Plain, {**DECLARED, "placement": "inside"}, "placement must be one of prefix, in_llm"),
    (_Plain, {**DECLARED, "paradigms": ["three-stage"]}, "unknown paradigm three-stage"),
])
def test_a_registration_that_contradicts_itself_is_refused(cls, info, message, registry_snapshot):
    with pytest.raises(ValueError, match=message):
        INTEGRATORS.register("scratch", **info)(cls)
    assert "scratch" not in INTEGRATORS and not hasattr(cls, "registry_name")


def test_a_data_kind_is_one_file_too(tmp_path, monkeypatch):
    import workbench.data as package
    from workbench.frontend import catalog

    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "one_row.py").write_text(
        "from workbench.data.loaders import DATASETS\n"
        "from workbench.data.samples import SampleDataset\n\n\n"
        "@DATASETS.register('one-row', offline=True, embedded=False, description='No rows at all')\n"
        "def load_one_row():\n"
        "    return SampleDataset([])\n")
    monkeypatch.setattr(package, "__path__", [*package.__path__, str(folder)])
    monkeypatch.setattr(package.DATASETS, "_entries", dict(package.DATASETS._entries))
    try:
        assert "one_row" in discover(package.__name__, package.__path__)
        assert "one-row" in [r["name"] for r in catalog(["data"])["data"]]  # what the app's Dataset list shows
        assert len(package.load_dataset_spec("one-row")) == 0
    finally:
        sys.modules.pop("workbench.data.one_row", None)
