"""Every example config loads and validates (building the online ones needs the hub, so not here)."""
from pathlib import Path

import pytest

from workbench.config import load_run_config, model_config_from_dict, load_yaml
from workbench.paradigms import resolve_stages

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "examples" / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_example_config_is_valid(path):
    data = load_yaml(path)
    if "paradigm" in data or "stages" in data:
        run = load_run_config(path)
        try:
            stages = resolve_stages(run)
        except Exception as e:  # the direct paradigm needs PEFT modules configured
            pytest.fail(f"{path.name}: {e}")
        assert stages
    else:
        model_config_from_dict(data)
