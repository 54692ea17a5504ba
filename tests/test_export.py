"""The model card (README.md) of every folder export: the hub's front matter, the recipe from the checkpoint's saved
flags, the results given to the export, and loading code that runs as it is written."""
import re
import subprocess
import sys

import pytest
import torch

from export_encoder import export_encoder
from helpers import ROOT, encoder_checkpoint

RECIPE = dict(epochs=800, num_views=2, mask_ratio=0.6, pred_ratio=1.0, pred_type="hog", vis_target="ema",
              mask_type="block", data_path="/datasets/imagenet/")


def front_matter(card: str) -> str:
    match = re.match(r"---\n(.*?)\n---\n", card, re.S)
    assert match, card[:200]
    return match.group(1)


def code_blocks(card: str):
    return re.findall(r"```python\n(.*?)```", card, re.S)


def test_the_card_states_the_encoder_the_recipe_and_the_results(tmp_path):
    encoder_checkpoint(tmp_path / "pre.pth", "convvit_tiny_patch16", **RECIPE)
    export_encoder(str(tmp_path / "pre.pth"), str(tmp_path / "export"), results=["ImageNet top-1=83.2"],
                   key="model")
    card = (tmp_path / "export" / "README.md").read_text()
    meta = front_matter(card)
    for line in ("library_name: timm", "license: mit", "pipeline_tag: image-feature-extraction",
                 'datasets:\n- "imagenet"', '- "timm"'):
        assert line in meta, line
    assert "# convvit_tiny_patch16" in card and "DMJD" in card and "from `pre.pth`" in card
    for flag, value in RECIPE.items():
        if flag != "data_path":
            assert f"| `{flag}` | {value} |" in card, flag
    assert "2 disjoint masked views per image, mask ratio 0.6, prediction rate 1.0" in card
    assert "reconstructs HOG features" in card and "regresses the tokens of an EMA teacher" in card
    assert "| ImageNet top-1 | 83.2 |" in card


def test_the_cards_loading_code_runs_as_written(tmp_path, monkeypatch):
    trained = encoder_checkpoint(tmp_path / "ft.pth", "vit_test_patch16_gap_sincos", epochs=5)
    monkeypatch.chdir(tmp_path)
    export_encoder("ft.pth", "export")  # the card's code names the folder as the command was given it
    timm_code, hub_code, smp_code = code_blocks((tmp_path / "export" / "README.md").read_text())
    assert "tu-vit_test_patch16_gap_sincos" in smp_code and 'file="export/model.safetensors"' in smp_code
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = trained(x)
        names = {}
        exec(timm_code, names)
        torch.testing.assert_close(names["encoder"].eval()(x), expected)
        assert names["classifier"](x).shape == (1, 10)
        exec(hub_code.replace("path/to/dmjd-checkout", str(ROOT)), names)  # a checkout: torch.hub's source="local"
        torch.testing.assert_close(names["encoder"].eval()(x), expected)


def test_command_line_results_datasets_and_license_reach_the_card(tmp_path):
    encoder_checkpoint(tmp_path / "ft.pth", "convvit_tiny_patch16")
    proc = subprocess.run([sys.executable, str(ROOT / "export_encoder.py"), str(tmp_path / "ft.pth"),
                           str(tmp_path / "export"), "--result", "ADE20K mIoU=48.1", "--result", "k-NN: top-1=60",
                           "--dataset", "imagenet-1k", "--license", "cc-by-nc-4.0", "--code_repo", "me/dmjd"],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    card = (tmp_path / "export" / "README.md").read_text()
    assert 'datasets:\n- "imagenet-1k"' in front_matter(card) and "license: cc-by-nc-4.0" in front_matter(card)
    assert "| ADE20K mIoU | 48.1 |" in card and "| k-NN: top-1 | 60 |" in card
    assert "pip install git+https://github.com/me/dmjd" in card and 'torch.hub.load("me/dmjd"' in card
    assert "The checkpoint did not save its flags" not in card  # it saved model and input_size


def test_a_malformed_result_is_an_error_before_anything_is_written(tmp_path):
    encoder_checkpoint(tmp_path / "ft.pth", "convvit_tiny_patch16")
    with pytest.raises(ValueError, match="NAME=VALUE"):
        export_encoder(str(tmp_path / "ft.pth"), str(tmp_path / "export"), results=["83.2"])
    assert not (tmp_path / "export").exists()
