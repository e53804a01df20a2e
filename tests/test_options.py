"""Declared options: read from constructors and docstrings, checked with one-line reasons, round-tripped
through form values."""
import pytest

from workbench.config import IntegratorSpec, PeftSpec
from workbench.errors import ConfigError
from workbench.forms import fill_form, option_fields, read_form
from workbench.integrators import INTEGRATORS, integrator_options
from workbench.options import check_options, declared_options, from_form, to_form
from workbench.peft_modules import METHOD_FIELDS, METHODS, method_options


def test_every_integrator_and_peft_option_is_declared_with_help():
    for name in INTEGRATORS.names():
        for o in integrator_options(name):
            assert o.help and o.type != "any", (name, o.name)
    for method in METHODS:
        assert [o.name for o in method_options(method)] == [n for n in ("r", "alpha", "dropout", "target_modules",
                                                              "layers", "num_virtual_tokens") if n in METHOD_FIELDS[method]]
        assert all(o.help for o in method_options(method))


def test_types_defaults_choices_and_ranges_come_from_the_declaration():
    options = {o.name: o for o in integrator_options("mlp")}
    assert (options["depth"].type, options["depth"].default, options["depth"].minimum) == ("int", 2, 1)
    assert options["hidden_dim"].optional and options["activation"].choices == ("gelu", "relu", "silu")
    assert options["input_norm"].choices == ("layer", "batch", "none", True, False)
    assert (options["dropout"].minimum, options["dropout"].maximum) == (0, 1)
    lavin = {o.name: o for o in integrator_options("lavin_mma")}
    assert lavin["layers"].type == "union" and lavin["layers"].members == ("str", "int")


@pytest.mark.parametrize("values, message", [
    ({"depht": 2}, "Unknown option 'depht' for integrator 'mlp'. Valid options: depth"),
    ({"depth": "two"}, "Option 'depth' of integrator 'mlp' must be int"),
    ({"depth": 0}, "must be at least 1, got 0"),
    ({"dropout": 2.0}, "must be at most 1, got 2.0"),
    ({"activation": "tanh"}, "must be one of gelu, relu, silu, got 'tanh'"),
    ({"output_norm": "yes"}, "must be bool"),
])
def test_wrong_values_are_refused_with_the_reason(values, message):
    with pytest.raises(ConfigError, match=message):
        check_options("integrator 'mlp'", integrator_options("mlp"), values)


def test_checked_values_are_converted():
    assert check_options("x", integrator_options("mlp"), {"dropout": 0, "depth": 3.0}) == {"dropout": 0.0, "depth": 3}


def test_form_values_convert_to_option_values_and_back():
    layers = next(o for o in method_options("lora") if o.name == "layers")
    assert from_form("lora", layers, "22, 23") == [22, 23] and from_form("lora", layers, "") is None
    assert to_form(layers, [22, 23]) == "22, 23"
    with pytest.raises(ConfigError, match="must be int"):
        from_form("lora", layers, "22, top")
    with pytest.raises(ConfigError, match="at least 0"):
        from_form("lora", layers, "-1")
    norm = next(o for o in integrator_options("mlp") if o.name == "input_norm")
    assert from_form("mlp", norm, "true") is True and from_form("mlp", norm, "batch") == "batch"
    lavin_layers = next(o for o in integrator_options("lavin_mma") if o.name == "layers")
    assert from_form("lavin", lavin_layers, "2") == 2 and from_form("lavin", lavin_layers, "all") == "all"


def test_a_form_round_trips_a_spec():
    fields = option_fields()
    integrator = IntegratorSpec(name="qformer", options={"num_queries": 8, "input_norm": "batch"})
    peft = PeftSpec(method="lora", r=4, layers=[1, 2], target_modules=["q_proj"])
    options, spec = read_form(fields, fill_form(fields, integrator, peft), "qformer", "lora")
    assert options == integrator.options and spec == peft
    old_style = PeftSpec(method="lora", options={"layers_to_transform": [3]})
    _, spec = read_form(fields, fill_form(fields, integrator, old_style), "qformer", "lora")
    assert spec.layers == [3]
    with pytest.raises(ConfigError, match="Unknown option 'nope'"):
        fill_form(fields, IntegratorSpec(name="mlp", options={"nope": 1}), peft)


def test_data_loaders_are_checked_by_the_same_rule():
    from workbench.data.loaders import DATASETS

    with pytest.raises(ConfigError, match="Unknown option 'json_file'"):
        check_options("dataset 'llava'", declared_options(DATASETS.get("llava"), skip=()), {"json_file": "x"})
