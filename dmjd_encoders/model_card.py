"""The model card (README.md) of an export: the Hugging Face hub's YAML front matter (with a `model-index` of the
results that say their task, dataset and metric), what the encoder is as far as the checkpoint records it, the recipe
that trained it (read from the checkpoint's saved `args`), the results given to the export, loading code for timm,
torch.hub and segmentation_models_pytorch, and the citation."""
import json
import os
import re
from typing import Dict, Optional, Sequence

from .pretrained import checkpoint_origin

# The flags of a run that say how its weights were trained, in the order the card lists them. Pre-training: the
# DMJD recipe; fine-tuning and probing: the epochs, the source and the classes.
RECIPE_FLAGS = ("model", "input_size", "epochs", "warmup_epochs", "batch_size", "accum_iter", "blr", "weight_decay",
                "num_views", "mask_type", "mask_ratio", "pred_ratio", "pred_type", "vis_target", "theta",
                "ema_momentum", "finetune", "nb_classes", "drop_path")

# What the targets mean (models_dmjd's PRED_TYPES and VIS_TARGETS).
TARGETS = {"hog": "HOG features", "pixel": "normalised pixels", "ema": "the tokens of an EMA teacher"}


# The method's paper: what the card cites and links, and the pretrained_cfg's paper of DMJD's weights.
ARXIV_ID = "2301.00230"
PAPER_NAME = "Disjoint Masking with Joint Distillation for Efficient Masked Image Modeling"
CITATION = f"""@article{{ma2023dmjd,
  title         = {{{PAPER_NAME}}},
  author        = {{Ma, Xin and Liu, Chang and Xie, Chunyu and Ye, Long and Deng, Yafeng and Ji, Xiangyang}},
  journal       = {{IEEE Transactions on Multimedia}},
  year          = {{2023}},
  doi           = {{10.1109/TMM.2023.3306840}},
  eprint        = {{{ARXIV_ID}}},
  archivePrefix = {{arXiv}}
}}"""

# `[TASK, DATASET, METRIC] NAME=VALUE`: the hub's ids of a result's task, dataset and metric, which its model-index
# needs (e.g. `[image-classification, imagenet-1k, accuracy] ImageNet-1K fine-tune top-1=85.2`).
_RESULT_IDS = re.compile(r"\s*\[([^\]]*)\]\s*(.*)", re.S)
_NUMBER = re.compile(r"[-+]?(\d+(\.\d*)?|\.\d+)([eE][-+]?\d+)?")


def parse_result(text: str) -> Dict[str, str]:
    """`--result "ImageNet top-1=83.2"` -> {"task": "ImageNet top-1", "value": "83.2"}, a row of the card's results;
    `--result "[image-classification, imagenet-1k, accuracy] ImageNet top-1=83.2"` adds the hub's ids of its task,
    dataset and metric ("task_type", "dataset", "metric"), with which the result also enters the model-index."""
    ids, match = {}, _RESULT_IDS.fullmatch(text)
    if match:
        parts = [p.strip() for p in match.group(1).split(",")]
        if len(parts) != 3 or not all(parts) or any(re.search(r"\s", p) for p in parts):
            raise ValueError(f"--result {text!r}: the brackets take three ids, [TASK, DATASET, METRIC], e.g. "
                             "[image-classification, imagenet-1k, accuracy]")
        ids = dict(zip(("task_type", "dataset", "metric"), parts))
        text = match.group(2)
    task, sep, value = text.rpartition("=")
    if not sep or not task.strip() or not value.strip():
        raise ValueError(f"--result {text!r}: give it as NAME=VALUE, e.g. \"ImageNet top-1=83.2\" (or "
                         "\"[image-classification, imagenet-1k, accuracy] ImageNet top-1=83.2\" for the model-index)")
    return {"task": task.strip(), "value": value.strip(), **ids}


def _yaml_list(key: str, values: Sequence[str]) -> str:
    # JSON strings are YAML scalars: names with colons or quotes need no escaping rules of their own
    return f"{key}:\n" + "".join(f"- {json.dumps(v)}\n" for v in values)


def model_card(name: str, folder: str, input_size: int, args: dict, results: Sequence[Dict[str, str]] = (),
               datasets: Sequence[str] = (), license: str = "mit", source: Optional[str] = None,
               code_repo: Optional[str] = None, key: str = "model") -> str:
    """README.md of the export of encoder `name`, trained at `input_size`, in `folder` (as the user typed it, for the
    loading code). What it says the weights are follows what the checkpoint records (`args`, its saved flags):
    DMJD pre-training, fine-tuning or probing by this project's scripts, or, without them, nothing it cannot know.
    `datasets`: the hub's names of the training data (none given: the metadata names none)."""
    origin = checkpoint_origin(args)
    dmjd = pretrained_with_dmjd(args)
    tags = ["image-feature-extraction", "timm"] + (["dmjd", "masked-image-modeling", f"arxiv:{ARXIV_ID}"]
                                                    if dmjd else [])
    front = ("---\n" + "library_name: timm\n" + f"license: {license}\n" + _yaml_list("tags", tags)
             + "pipeline_tag: image-feature-extraction\n" + (_yaml_list("datasets", datasets) if datasets else "")
             + _model_index(name, results) + "---\n")
    teacher = " (the EMA teacher's encoder)" if key == "teacher" else ""
    lines = [front, f"# {name}{teacher}\n", f"A `{name}` encoder {_what_it_is(origin, args)}, exported by this "
             "project's `export_encoder.py`" + (f" from `{source}`" if source else "") + ".\n"]
    recipe = [f"| `{flag}` | {args[flag]} |" for flag in RECIPE_FLAGS if args.get(flag) not in (None, "")]
    if recipe:
        lines.append("## Training recipe\n\nFrom the checkpoint's saved flags:\n\n| flag | value |\n|---|---|\n"
                     + "\n".join(recipe) + "\n")
        if dmjd:
            lines.append(_targets_sentence(args) + "\n")
    else:
        lines.append("## Training recipe\n\nThe checkpoint did not save its flags.\n")
    if not datasets and args.get("data_path"):
        folder_name = os.path.basename(str(args["data_path"]).rstrip("/\\"))
        lines.append(f"The run read its images from a folder named `{folder_name}`; the metadata names no dataset "
                     "(the export's `--dataset` gives the hub's name of it).\n")
    if results:
        lines.append("## Results\n\n| task | value |\n|---|---|\n"
                     + "\n".join(f"| {r['task']} | {r['value']} |" for r in results) + "\n")
    lines.append(_usage(name, folder, input_size, code_repo))
    lines.append(_citation(dmjd))
    return "\n".join(lines)


def pretrained_with_dmjd(args: Optional[dict]) -> bool:
    """Whether a checkpoint's saved flags (`args`) record a DMJD pre-training run of this project (main_pretrain.py):
    what the card and an export's pretrained_cfg may then say of the weights."""
    origin = checkpoint_origin(args)
    return origin is not None and origin.task == "pre-training"


def _what_it_is(origin, args: dict) -> str:
    """What the weights are, as far as the checkpoint's saved flags say: the sentence's middle."""
    if origin is None:  # the authors' release, MAE's weights, random weights saved by hand, an export: no record
        return ("whose checkpoint does not record how it was trained (no saved flags of a training script of this "
                "project)")
    if origin.task == "pre-training":
        return (f"pre-trained with DMJD (disjoint masking with joint distillation, Ma et al., IEEE TMM 2023, "
                f"arXiv {ARXIV_ID})")
    start = args.get("finetune")
    if origin.task == "fine-tuning":
        return ("fine-tuned for classification by this project's `main_finetune.py`, "
                + (f"starting from `{start}`" if start else "from a random initialisation (no `--finetune`)"))
    if origin.task == "linear-probing":
        return ("from a linear probe of this project's `main_linprobe.py`, which keeps the encoder frozen: the weights "
                + (f"of `{start}`" if start else "it was given"))
    return f"from {origin}"


def _model_index(name: str, results: Sequence[Dict[str, str]]) -> str:
    """The hub's `model-index` of the results that name their task, dataset and metric (see parse_result)."""
    indexed = [r for r in results if "task_type" in r]
    if not indexed:
        return ""
    entries = []
    for r in indexed:
        value = r["value"] if _NUMBER.fullmatch(r["value"]) else json.dumps(r["value"])
        entries.append(f"  - task:\n      type: {json.dumps(r['task_type'])}\n"
                       f"    dataset:\n      type: {json.dumps(r['dataset'])}\n      name: {json.dumps(r['dataset'])}\n"
                       f"    metrics:\n    - type: {json.dumps(r['metric'])}\n      value: {value}\n"
                       f"      name: {json.dumps(r['task'])}\n")
    return f"model-index:\n- name: {json.dumps(name)}\n  results:\n" + "".join(entries)


def _citation(dmjd: bool) -> str:
    paper = f"DMJD ([arXiv {ARXIV_ID}](https://arxiv.org/abs/{ARXIV_ID}))"
    said = (f"These weights were pre-trained with {paper}; please cite:" if dmjd else
            f"The code that builds and exports this encoder implements {paper}; cite it for the code, and the "
            "weights' own origin for the weights:")
    return f"## Citation\n\n{said}\n\n```bibtex\n{CITATION}\n```\n"


def _targets_sentence(args: dict) -> str:
    pred, vis = args.get("pred_type"), args.get("vis_target")
    parts = [f"{args.get('num_views', '?')} disjoint masked views per image"]
    if args.get("mask_ratio") is not None:
        parts.append(f"mask ratio {args['mask_ratio']}")
    if args.get("pred_ratio") is not None:
        parts.append(f"prediction rate {args['pred_ratio']}")
    text = ", ".join(parts)
    if pred:
        text += f"; the decoder reconstructs {TARGETS.get(pred, pred)} of the masked tokens"
    if vis:
        text += f", the visible branch regresses {TARGETS.get(vis, vis)} at the visible tokens"
    return text[0].upper() + text[1:] + "."


def _usage(name: str, folder: str, size: int, code_repo: Optional[str]) -> str:
    install = f"pip install git+https://github.com/{code_repo}" if code_repo else "pip install path/to/dmjd-checkout"
    hub_repo, hub_source = (code_repo, "github") if code_repo else ("path/to/dmjd-checkout", "local")
    return f"""## Use

The encoder's code is a package, `dmjd_encoders` (`{install}`); importing it registers the encoders with timm.

timm (built with the defaults: no classifier, the mean of the final-norm tokens; `features_only=True` for maps):

```python
import timm
import dmjd_encoders  # registers the encoders

encoder = timm.create_model("local-dir:{folder}", pretrained=True)
# the same weights from the Hugging Face hub once this folder is uploaded there:
# encoder = timm.create_model("hf-hub:<user>/<repository>", pretrained=True)
classifier = timm.create_model("local-dir:{folder}", pretrained=True, num_classes=10, fc_norm=True)
```

torch.hub:

```python
import torch

encoder = torch.hub.load("{hub_repo}", "{name}", weights="{folder}", source="{hub_source}")
```

segmentation_models_pytorch (its `tu-` encoders are timm's `features_only` models; any `encoder_weights` value
has timm load the file; the project's docs/MODELS.md lists the architectures that take these encoders):

```python
import segmentation_models_pytorch as smp
import dmjd_encoders  # registers the encoders (also before smp's from_pretrained of a model saved with one)

model = smp.Unet("tu-{name}", encoder_weights="{folder}", classes=150, img_size={size},
                 pretrained_cfg_overlay=dict(file="{folder}/model.safetensors"))
```
"""
