"""Figures of a benchmark written into the documentation: the block of a markdown file between the lines
`<!-- name -->` and `<!-- /name -->` is replaced by what the benchmark measured, with where and when, so that a figure
in the docs is the one its command printed (`--doc FILE` of the benchmarks that have one)."""
import datetime
import os
import re
from typing import List

import torch


def provenance(device: torch.device) -> str:
    """When, on what and with which torch the figures were made: "2026-12-06, 2 CPU cores, torch 2.14.1"."""
    where = (torch.cuda.get_device_name(device) if device.type == "cuda"
             else f"{os.cpu_count()} CPU cores ({torch.get_num_threads()} threads)")
    return f"{datetime.date.today().isoformat()}, {where}, torch {torch.__version__.split('+')[0]}"


def rewrite_block(path: str, name: str, text: str) -> None:
    """Replaces the lines between `<!-- name -->` and `<!-- /name -->` of `path` with `text`; a file without the
    two markers is left as it is and named in the error."""
    opening, closing = f"<!-- {name} -->", f"<!-- /{name} -->"
    with open(path) as f:
        content = f.read()
    start, end = content.find(opening), content.find(closing)
    if start < 0 or end < start:
        raise ValueError(f"{path} has no block to rewrite: it needs the lines {opening} and {closing}")
    content = content[:start + len(opening)] + "\n" + text.strip("\n") + "\n" + content[end:]
    with open(path, "w") as f:
        f.write(content)
    print(f"rewrote the {name} block of {path}")


def block_names(path: str) -> List[str]:
    """The names of the blocks that `path` holds, in order: a command that writes several checks them before it
    runs, rather than failing at the end."""
    with open(path) as f:
        content = f.read()
    return [name for name in re.findall(r"^<!-- (\w+) -->$", content, re.M) if f"<!-- /{name} -->" in content]
