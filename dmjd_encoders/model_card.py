"""The model card (README.md) of an export: the Hugging Face hub's YAML front matter, what the encoder is, the recipe
that trained it (read from the checkpoint's saved `args`), the results given to the export, and loading code for
timm, torch.hub and segmentation_models_pytorch."""
import json
from typing import Dict, Optional, Sequence

# The flags of a run that say how its weights were trained, in the order the card lists them. Pre-training: the
# DMJD recipe; fine-tuning and probing: the epochs, the source and the classes.
RECIPE_FLAGS = ("model", "input_size", "epochs", "warmup_epochs", "batch_size", "accum_iter", "blr", "weight_decay",
                "num_views", "mask_type", "mask_ratio", "pred_ratio", "pred_type", "vis_target", "theta",
                "ema_momentum", "finetune", "nb_classes", "drop_path")

# What the targets mean (models_dmjd's PRED_TYPES and VIS_TARGETS).
TARGETS = {"hog": "HOG features", "pixel": "normalised pixels", "ema": "the tokens of an EMA teacher"}


def parse_result(text: str) -> Dict[str, str]:
    """`--result "ImageNet top-1=83.2"` -> {"task": "ImageNet top-1", "value": "83.2"}."""
    task, sep, value = text.rpartition("=")
    if not sep or not task.strip() or not value.strip():
        raise ValueError(f"--result {text!r}: give it as NAME=VALUE, e.g. \"ImageNet top-1=83.2\"")
    return {"task": task.strip(), "value": value.strip()}


def _yaml_list(key: str, values: Sequence[str]) -> str:
    # JSON strings are YAML scalars: names with colons or quotes need no escaping rules of their own
    return f"{key}:\n" + "".join(f"- {json.dumps(v)}\n" for v in values)


def model_card(name: str, folder: str, input_size: int, args: dict, results: Sequence[Dict[str, str]] = (),
               datasets: Sequence[str] = (), license: str = "mit", source: Optional[str] = None,
               code_repo: Optional[str] = None, key: str = "model") -> str:
    """README.md of the export of encoder `name`, trained at `input_size`, in `folder` (as the user typed it, for the
    loading code)."""
    datasets = list(datasets) or ([args["data_path"].rstrip("/").rsplit("/", 1)[-1]] if args.get("data_path") else [])
    tags = ["image-feature-extraction", "timm", "dmjd", "masked-image-modeling"]
    front = ("---\n" + "library_name: timm\n" + f"license: {license}\n" + _yaml_list("tags", tags)
             + "pipeline_tag: image-feature-extraction\n" + (_yaml_list("datasets", datasets) if datasets else "")
             + "---\n")
    pretrained = "num_views" in args
    what = ("pre-trained with DMJD (disjoint masking with joint distillation, Ma et al., IEEE TMM 2023, "
            "arXiv 2301.00230)" if pretrained else "fine-tuned or probed from a DMJD encoder")
    teacher = " (the EMA teacher's encoder)" if key == "teacher" else ""
    lines = [front, f"# {name}{teacher}\n", f"A `{name}` encoder {what}, exported by this project's "
             "`export_encoder.py`" + (f" from `{source}`" if source else "") + ".\n"]
    recipe = [f"| `{flag}` | {args[flag]} |" for flag in RECIPE_FLAGS if args.get(flag) not in (None, "")]
    if recipe:
        lines.append("## Training recipe\n\nFrom the checkpoint's saved flags:\n\n| flag | value |\n|---|---|\n"
                     + "\n".join(recipe) + "\n")
        if pretrained:
            lines.append(_targets_sentence(args) + "\n")
    else:
        lines.append("## Training recipe\n\nThe checkpoint did not save its flags.\n")
    if results:
        lines.append("## Results\n\n| task | value |\n|---|---|\n"
                     + "\n".join(f"| {r['task']} | {r['value']} |" for r in results) + "\n")
    lines.append(_usage(name, folder, input_size, code_repo))
    return "\n".join(lines)


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
