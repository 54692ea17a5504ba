"""training.config and training.flags: every flag of every training script declares, where it is defined, what a
resumed run does with it (and a config field holds it), and docs/RELIABILITY.md says so."""
import dataclasses
import importlib
import re
from pathlib import Path

import pytest

from training.flags import MUST_MATCH, absent_values, check_flags, flag, resume_rules

ROOT = Path(__file__).resolve().parents[1]

# Every task's script, main_<task>.py: its parser there, its config <Task>Config in engine_<task>.py
# (docs/ARCHITECTURE.md, "Each task in one shape"). The order is the scripts' order in docs/RELIABILITY.md's table.
TRAINING_SCRIPTS = ["main_pretrain", "main_finetune", "main_linprobe", "main_segment", "main_detect"]
# The main_*.py that train nothing themselves: main_transfer.py runs the transfer scripts as subprocesses (no flag of
# its own is resumed, no config).
NOT_TRAINING = {"main_transfer"}


def config_of(script: str):
    """The config class of main_<task>.py: engine_<task>.<Task>Config, found by the shape every task has."""
    task = script[len("main_"):]
    return getattr(importlib.import_module(f"engine_{task}"), f"{task.capitalize()}Config")


def flags_and_config(script):
    parser = importlib.import_module(script).get_args_parser()
    return [a.dest for a in parser._actions if a.dest != "help"], config_of(script), resume_rules(parser)


def test_every_main_script_that_trains_is_listed():
    scripts = {p.stem for p in ROOT.glob("main_*.py")} - NOT_TRAINING
    assert scripts == set(TRAINING_SCRIPTS), "a new training script: classify its flags (training/config.py)"
    for script in TRAINING_SCRIPTS:  # each in the shape of a task: main_<task>.py and engine_<task>.py's config
        assert dataclasses.is_dataclass(config_of(script)), script


@pytest.mark.parametrize("script", sorted(TRAINING_SCRIPTS))
def test_every_flag_is_either_checked_on_resume_or_may_change_with_a_reason(script):
    flags, config, rules = flags_and_config(script)
    must = {name for name, rule in rules.items() if rule == MUST_MATCH}
    may = {name: rule for name, rule in rules.items() if rule != MUST_MATCH}
    assert not [f for f in flags if f not in must and f not in may], f"unclassified flags of {script}"
    assert not must & set(may), "a flag in both kinds"
    fields = {f.name for f in dataclasses.fields(config)}
    assert must <= fields and set(may) <= fields, "a classified name that is no field of the config"
    assert all(len(reason) > 10 for reason in may.values())
    assert set(config.RESOLVED_MUST_MATCH) <= fields - set(flags), "a resolved name that is a flag or no field"


def documented_kinds():
    """{flag: (scripts, kind)} from docs/RELIABILITY.md's table of flags (kind 'checked' or 'may change')."""
    text = (ROOT / "docs" / "RELIABILITY.md").read_text()
    section = text[text.index("## Which flags are checked on resume"):]
    kinds = {}
    for name, scripts, kind in re.findall(r"^\| `--(\w+)` \| ([^|]*?) \| (checked|may change) \|", section, re.M):
        assert name not in kinds, f"--{name} is listed twice"
        kinds[name] = (scripts, kind)
    return kinds


def test_the_reliability_doc_lists_every_flag_with_its_scripts_and_kind():
    documented = documented_kinds()
    kinds, scripts = {}, {}
    for script in TRAINING_SCRIPTS:
        flags, config, rules = flags_and_config(script)
        for name in flags:
            kind = "checked" if rules[name] == MUST_MATCH else "may change"
            assert kinds.setdefault(name, kind) == kind, f"--{name} is of two kinds in two scripts"
            scripts.setdefault(name, []).append(script[len("main_"):])
    assert documented == {name: (", ".join(scripts[name]), kind) for name, kind in kinds.items()}


def test_a_flag_declares_its_range_and_check_flags_names_the_first_out_of_it():
    import argparse
    parser = argparse.ArgumentParser()
    flag(parser, "--views", type=int, default=2, check=">= 1", resume=MUST_MATCH)
    flag(parser, "--ratio", type=float, default=0.5, check="(0, 1)", resume=MUST_MATCH)
    flag(parser, "--betas", type=float, nargs=2, default=[0.9, 0.99], check="[0, 1)", resume=MUST_MATCH)
    flag(parser, "--clip", type=float, default=None, check="> 0", resume="a reason that is long enough")
    check_flags(parser, parser.parse_args([]))  # defaults in range; None passes
    for argv, message in ((["--views", "0"], "--views must be >= 1, got 0"),
                          (["--ratio", "1"], "--ratio must be in (0, 1), got 1.0"),
                          (["--betas", "0.9", "1"], "--betas must be in [0, 1), got [0.9, 1.0]"),
                          (["--clip", "0"], "--clip must be > 0, got 0.0")):
        with pytest.raises(ValueError, match=re.escape(message)):
            check_flags(parser, parser.parse_args(argv))
    assert resume_rules(parser) == {"views": MUST_MATCH, "ratio": MUST_MATCH, "betas": MUST_MATCH,
                                    "clip": "a reason that is long enough"}
    with pytest.raises(ValueError, match="unknown check"):
        flag(parser, "--other", check="< 3", resume=MUST_MATCH)


def test_a_flag_added_after_checkpoints_were_saved_declares_the_value_they_ran_with():
    import argparse

    from main_segment import get_args_parser as segmentation_parser
    parser = argparse.ArgumentParser()
    flag(parser, "--new_option", action="store_true", resume=MUST_MATCH, absent=False)
    flag(parser, "--old", type=int, default=1, resume=MUST_MATCH)
    assert absent_values(parser) == {"new_option": False}
    # segmentation's dense options were off before they were flags (training.checkpointing.check_saved_flags compares them so)
    assert absent_values(segmentation_parser()) == {"rel_pos_bias": False, "layer_scale": None,
                                                    "simple_pyramid": False}


# Flags of no range: any integer seeds a run; --aug_test_ratios's own check (engine_segment) says "must be positive".
UNRANGED = {"seed", "aug_test_ratios"}


@pytest.mark.parametrize("script", sorted(TRAINING_SCRIPTS))
def test_every_numeric_flag_declares_its_range(script):
    parser = importlib.import_module(script).get_args_parser()
    unranged = [a.dest for a in parser._actions if a.type in (int, float) and getattr(a, "check", None) is None]
    assert set(unranged) <= UNRANGED, f"{script}: declare the range of {sorted(set(unranged) - UNRANGED)}"


@pytest.mark.parametrize("script, argv, message", [
    ("main_finetune", ["--smoothing", "1.5"], "--smoothing must be in [0, 1), got 1.5"),
    ("main_finetune", ["--mixup", "-1"], "--mixup must be >= 0, got -1.0"),
    ("main_finetune", ["--cutmix", "-0.5"], "--cutmix must be >= 0, got -0.5"),
    ("main_finetune", ["--layer_decay", "0"], "--layer_decay must be in (0, 1], got 0.0"),
    ("main_finetune", ["--drop_path", "1.5"], "--drop_path must be in [0, 1), got 1.5"),
    ("main_finetune", ["--reprob", "1.5"], "--reprob must be in [0, 1], got 1.5"),
    ("main_finetune", ["--recount", "0"], "--recount must be >= 1, got 0"),
    ("main_finetune", ["--mixup_prob", "2"], "--mixup_prob must be in [0, 1], got 2.0"),
    ("main_finetune", ["--mixup_switch_prob", "-0.1"], "--mixup_switch_prob must be in [0, 1], got -0.1"),
    ("main_finetune", ["--cutmix_minmax", "0.5", "1.5"], "--cutmix_minmax must be in [0, 1], got [0.5, 1.5]"),
    ("main_finetune", ["--color_jitter", "-0.4"], "--color_jitter must be >= 0, got -0.4"),
    ("main_finetune", ["--warmup_epochs", "-1"], "--warmup_epochs must be >= 0, got -1.0"),
    ("main_finetune", ["--dist_timeout", "0"], "--dist_timeout must be > 0, got 0.0"),
    ("main_linprobe", ["--warmup_epochs", "-1"], "--warmup_epochs must be >= 0, got -1.0"),
    ("main_linprobe", ["--min_crop_scale", "0"], "--min_crop_scale must be in (0, 1], got 0.0"),
    ("main_linprobe", ["--nb_classes", "0"], "--nb_classes must be >= 1, got 0"),
    ("main_pretrain", ["--pred_ratio", "1.5"], "--pred_ratio must be in (0, 1], got 1.5"),
    ("main_pretrain", ["--warmup_epochs", "-1"], "--warmup_epochs must be >= 0, got -1.0"),
    ("main_segment", ["--warmup_iters", "-1"], "--warmup_iters must be >= 0, got -1"),
    ("main_segment", ["--img_scale", "0", "512"], "--img_scale must be >= 1, got [0, 512]"),
    ("main_segment", ["--out_indices", "-1", "2"], "--out_indices must be >= 0, got [-1, 2]"),
    ("main_detect", ["--drop_path", "1.5"], "--drop_path must be in [0, 1), got 1.5"),
])
def test_a_flag_out_of_its_declared_range_is_named_by_the_checks_every_script_makes_before_torch(script, argv,
                                                                                                   message):
    from training.flags import check_run_flags
    parser = importlib.import_module(script).get_args_parser()
    with pytest.raises(ValueError, match=re.escape(message)):
        check_run_flags(parser, parser.parse_args(argv))


@pytest.mark.parametrize("script", sorted(TRAINING_SCRIPTS))
def test_allow_flag_changes_takes_only_the_names_of_the_scripts_flags(script):
    from training.flags import check_run_flags
    parser = importlib.import_module(script).get_args_parser()
    for allowed in ("batch_size,seed", " lr , model ", "all", "world_size", ""):
        check_run_flags(parser, parser.parse_args(["--allow_flag_changes", allowed]))
    other = "theta" if script != "main_pretrain" else "smoothing"  # another script's flag
    for allowed, message in (("bogus", "'bogus' is not a flag of this script; give the names of flags without '--'"),
                             ("batch_size,bach_size", "'bach_size' is not a flag of this script; did you mean "
                                                      "batch_size"),
                             ("--lr", "'--lr' is not a flag of this script; did you mean lr"),
                             (other, f"{other!r} is not a flag of this script")):
        with pytest.raises(ValueError, match=re.escape(f"--allow_flag_changes {message}")):
            check_run_flags(parser, parser.parse_args([f"--allow_flag_changes={allowed}"]))
