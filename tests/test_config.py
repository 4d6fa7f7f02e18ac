"""The trainer's configuration (sar_fast.train.config): the command line is generated from the
dataclasses, presets are data checked against them, the objective is SARConfig itself."""
import argparse
import dataclasses

import pytest

from sar_fast.train import config
from sar_fast.sar import SARConfig
from sar_fast.train import parse_config


def _actions():
    """--flag -> argparse action, and the --help group each sits in."""
    parser = config.build_parser()
    found = {}
    for group in parser._action_groups:
        for action in group._group_actions:
            found[action.option_strings[0]] = (action, group.title)
    return found


def test_every_field_has_a_flag_with_help_text():
    actions = _actions()
    seen = []
    for name, cls, title in config.sections():
        for f in dataclasses.fields(cls):
            if not f.metadata.get("cli", True):
                assert name == "objective" and f.name == "seed"  # the run's --seed
                continue
            flag = config.flag_name(f)
            assert flag in actions, f"{cls.__name__}.{f.name} has no flag"
            action, group = actions[flag]
            assert f.metadata["help"].strip() and action.help == f.metadata["help"], flag
            assert group == f.metadata.get("group", title), flag
            seen.append(flag)
    assert len(seen) == len(set(seen)), "two fields share a flag"
    # and nothing else: every flag but --help and --preset comes from a field
    assert set(actions) - set(seen) == {"-h", "--preset"}


def test_help_groups_and_the_objective_flags_come_from_sarconfig():
    titles = [g.title for g in config.build_parser()._action_groups][2:]
    assert titles == ["run", "model", "data", "objective (sar_fast.sar)", "optimisation", "system",
                      "checkpoints and logs"]
    actions = _actions()
    for f in dataclasses.fields(SARConfig):
        if f.name != "seed":
            action, group = actions["--" + f.name.replace("_", "-")]
            assert group == "objective (sar_fast.sar)"
            assert action.choices == f.metadata.get("choices"), f.name


def test_flag_types_follow_the_annotations():
    actions = _actions()
    assert actions["--lr"][0].type is float and actions["--max-steps"][0].type is int
    assert isinstance(actions["--export"][0], argparse.BooleanOptionalAction)
    assert actions["--out"][0].type is None and actions["--schedule"][0].type is config.parse_schedule
    cfg = parse_config(["--schedule", "1,2,4", "--betas", "0.8,0.9", "--max-steps", "3", "--epochs", "1.5",
                        "--no-export", "--model", "var-tiny", "--seed", "5"])
    assert cfg.data.schedule == (1, 2, 4) and cfg.optim.betas == (0.8, 0.9) and cfg.optim.max_steps == 3
    assert cfg.optim.epochs == 1.5 and cfg.checkpoint.export is False and cfg.model.name == "var-tiny"
    assert cfg.run.seed == 5 and cfg.objective.seed == 5  # one seed for the run and SSR's draws


def test_presets_name_only_existing_flag_fields():
    for name, values in config.PRESETS.items():
        config.check_preset(name, values)
        sections = {sec: {f.name for f in config.flag_fields(cls)} for sec, cls, _ in config.sections()}
        for sec, entries in values.items():
            assert set(entries) <= sections[sec], (name, sec)


@pytest.mark.parametrize("values, msg", [
    ({"optim": {"learning_rate": 1.0}}, r"OptimConfig has no flag field \['learning_rate'\]"),
    ({"optimizer": {"lr": 1.0}}, "no config section 'optimizer'"),
    ({"objective": {"seed": 3}}, r"SARConfig has no flag field \['seed'\]"),
])
def test_unknown_preset_keys_fail(values, msg):
    with pytest.raises(ValueError, match=msg):
        config.check_preset("broken", values)


def test_preset_then_flags_then_defaults():
    cfg = parse_config(["--gamma", "0.5"])  # tiny preset
    assert cfg.objective.gamma == 0.5                      # flag
    assert cfg.objective.transitions == "all"              # preset
    assert cfg.objective.csf_target == "sampled"           # SARConfig default
    assert cfg.optim.weight_decay == 0.05                  # OptimConfig default
    assert cfg.model.depth == 3 and cfg.data.workers == 0  # preset


def test_objective_errors_name_the_setting():
    with pytest.raises(SystemExit, match="hybrid_k must be >= 1"):
        parse_config(["--hybrid-k", "0"])


def test_to_dict_is_json_ready_and_nested():
    import json
    d = parse_config([]).to_dict()
    assert d["data"]["schedule"] == [1, 2, 3, 4, 6, 8] and d["objective"]["objective"] == "sar"
    assert json.loads(json.dumps(d)) == d


def test_device_flags_mean_the_same_everywhere():
    """--device of train, sample and cache all go through cli.resolve_device."""
    import torch

    from sar_fast.cli import resolve_device
    assert resolve_device("cpu") == torch.device("cpu")
    expected = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("auto") == resolve_device(None) == expected
    with pytest.raises(RuntimeError, match="--device 'bogus'"):
        resolve_device("bogus")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="--device cuda was requested but no CUDA device"):
            resolve_device("cuda")
