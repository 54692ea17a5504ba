"""training.config: every flag of every training script is classified for resume, and docs/RELIABILITY.md says so."""
import dataclasses
import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# script -> (module of its config, config class)
TRAINING_SCRIPTS = {
    "main_pretrain": ("engine_pretrain", "PretrainConfig"),
    "main_finetune": ("main_finetune", "FinetuneConfig"),
    "main_linprobe": ("main_linprobe", "LinprobeConfig"),
    "main_segment": ("engine_segment", "SegmentConfig"),
}


def flags_and_config(script):
    parser = importlib.import_module(script).get_args_parser()
    module, name = TRAINING_SCRIPTS[script]
    config = getattr(importlib.import_module(module), name)
    return [a.dest for a in parser._actions if a.dest != "help"], config


def test_every_main_script_that_trains_is_listed():
    scripts = {p.stem for p in ROOT.glob("main_*.py")}
    assert scripts == set(TRAINING_SCRIPTS), "a new training script: classify its flags (training/config.py)"


@pytest.mark.parametrize("script", sorted(TRAINING_SCRIPTS))
def test_every_flag_is_either_checked_on_resume_or_may_change_with_a_reason(script):
    flags, config = flags_and_config(script)
    must, may = set(config.RESUME_MUST_MATCH), config.RESUME_MAY_CHANGE
    assert not [f for f in flags if f not in must and f not in may], f"unclassified flags of {script}"
    assert not must & set(may), "a flag in both kinds"
    fields = {f.name for f in dataclasses.fields(config)}
    assert must <= fields and set(may) <= fields, "a classified name that is no field of the config"
    assert all(len(reason) > 10 for reason in may.values())


def documented_kinds():
    """{flag: kind} from docs/RELIABILITY.md's table of flags ('checked' or 'may change')."""
    text = (ROOT / "docs" / "RELIABILITY.md").read_text()
    section = text[text.index("## Which flags are checked on resume"):]
    kinds = {}
    for flag, kind in re.findall(r"^\| `--(\w+)` \| [^|]* \| (checked|may change) \|", section, re.M):
        assert flag not in kinds, f"--{flag} is listed twice"
        kinds[flag] = kind
    return kinds


def test_the_reliability_doc_lists_every_flag_with_its_kind():
    documented = documented_kinds()
    expected = {}
    for script in TRAINING_SCRIPTS:
        flags, config = flags_and_config(script)
        for flag in flags:
            kind = "checked" if flag in config.RESUME_MUST_MATCH else "may change"
            assert expected.setdefault(flag, kind) == kind, f"--{flag} is of two kinds in two scripts"
    assert documented == expected
