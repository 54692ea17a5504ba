"""Every command-line entry point: --help explains every option and shows its default."""
import argparse
import importlib

import pytest

# module -> the function that builds and parses its command line
ENTRY_POINTS = {
    "main_pretrain": "get_args_parser",
    "main_finetune": "get_args_parser",
    "main_linprobe": "get_args_parser",
    "main_segment": "get_args_parser",
    "visualize": "get_args_parser",
    "demo": "parse_args",
    "util.demo_data": "main",
    "util.demo_seg_data": "main",
    "export_encoder": "main",
    "benchmarks.throughput": "parse_args",
    "benchmarks.gpu_check": "parse_args",
    "benchmarks.convergence": "parse_args",
    "benchmarks.jpeg_folder": "parse_args",
    "benchmarks.segmentation_check": "parse_args",
    "benchmarks.segmentation_step": "parse_args",
}


class _Parsed(Exception):
    pass


def parser_of(module_name: str, function: str, monkeypatch) -> argparse.ArgumentParser:
    """The parser an entry point builds: returned by it, or caught when it parses."""
    built = getattr(importlib.import_module(module_name), function)
    if function == "get_args_parser":
        return built()
    caught = []

    def catch(self, *args, **kwargs):
        caught.append(self)
        raise _Parsed

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", catch)
    with pytest.raises(_Parsed):
        built([])
    return caught[0]


@pytest.mark.parametrize("module_name", list(ENTRY_POINTS))
def test_help_describes_every_option_and_shows_its_default(module_name, monkeypatch):
    parser = parser_of(module_name, ENTRY_POINTS[module_name], monkeypatch)
    assert issubclass(parser.formatter_class, argparse.ArgumentDefaultsHelpFormatter)
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        name = (action.option_strings or [action.dest])[0]
        assert action.help and action.help.strip(), f"{module_name} {name} has no help"
        # the formatter adds "(default: ...)": a hand-written one would show twice
        assert "(default:" not in action.help.replace("(default: %(default)s)", ""), f"{module_name} {name}"
    text = parser.format_help()
    optional = [a for a in parser._actions if a.option_strings and not isinstance(a, argparse._HelpAction)
                and a.default is not argparse.SUPPRESS]
    assert text.count("(default:") >= len(optional)


def test_submitit_launcher_help_shows_defaults():
    from util.submitit_launch import launcher_parser
    parser = launcher_parser("test")
    assert issubclass(parser.formatter_class, argparse.ArgumentDefaultsHelpFormatter)
    assert all(a.help for a in parser._actions)
