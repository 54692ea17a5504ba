"""hubconf.py: torch.hub.load(checkout, encoder name, weights=...) returns the encoder with the weights loaded."""
import importlib.util
import os
import subprocess
import sys

import pytest
import torch

from dmjd_encoders import ENCODER_ARCHS
from dmjd_encoders.models_convvit import ConvViT
from export_encoder import export_encoder
from helpers import ROOT, encoder_checkpoint

NAME = "convvit_tiny_patch16"


def hub_load(name, **kwargs):
    return torch.hub.load(str(ROOT), name, source="local", trust_repo=True, **kwargs)


def test_every_encoder_is_an_entry_point_and_the_dependencies_are_declared():
    spec = importlib.util.spec_from_file_location("hubconf_under_test", ROOT / "hubconf.py")
    hubconf = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hubconf)
    entries = sorted(n for n in dir(hubconf) if callable(getattr(hubconf, n)) and not n.startswith("_"))
    assert entries == sorted(ENCODER_ARCHS)  # what torch.hub.list shows
    assert hubconf.dependencies == ["torch", "timm", "safetensors"]
    assert NAME in getattr(hubconf, NAME).__doc__


@pytest.mark.parametrize("name", [NAME, "vit_test_patch16_gap_sincos"])
def test_hub_load_gives_the_exported_weights_at_their_size(tmp_path, name):
    trained = encoder_checkpoint(tmp_path / "ft.pth", name)
    export_encoder(str(tmp_path / "ft.pth"), str(tmp_path / "export"))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = trained(x)
        for weights in ("export", "export/model.safetensors", "ft.pth"):
            kwargs = {} if weights == "export" else {"img_size": 64}  # a folder says its size itself
            encoder = hub_load(name, weights=str(tmp_path / weights), **kwargs).eval()
            torch.testing.assert_close(encoder(x), expected, msg=lambda m: f"{weights}: {m}")
    classifier = hub_load(name, weights=str(tmp_path / "export"), num_classes=5, fc_norm=True)
    assert classifier(x).shape == (2, 5)  # timm's arguments reach the model


def test_hub_load_without_weights_is_a_fresh_encoder_and_wrong_weights_are_named(tmp_path):
    fresh = hub_load(NAME, img_size=32)
    assert isinstance(fresh, ConvViT) and fresh.img_size == (32, 32)
    with pytest.raises(FileNotFoundError, match="not found"):
        hub_load(NAME, weights=str(tmp_path / "missing"))
    encoder_checkpoint(tmp_path / "vit.pth", "vit_test_patch16_gap_sincos")
    export_encoder(str(tmp_path / "vit.pth"), str(tmp_path / "vit"))
    with pytest.raises(ValueError, match="holds a vit_test_patch16_gap_sincos encoder, not convvit_tiny_patch16"):
        hub_load(NAME, weights=str(tmp_path / "vit"))


def test_hub_load_leaves_a_users_own_util_package_alone(tmp_path):
    """The hub imports hubconf with the checkout on sys.path; it needs the package only, so a program's own `util`
    (a common name) is still the one it imports, before and after."""
    (tmp_path / "util").mkdir()
    (tmp_path / "util" / "__init__.py").write_text("MINE = True\n")
    code = (f"import torch\nencoder = torch.hub.load({str(ROOT)!r}, {NAME!r}, source='local', img_size=32)\n"
            "import util\nassert getattr(util, 'MINE', False), util.__file__\nprint(type(encoder).__name__)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                          env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert proc.returncode == 0 and proc.stdout.strip() == "ConvViT", proc.stderr[-2000:]


def test_hub_load_adapts_rgb_weights_to_other_input_channels(tmp_path):
    """in_chans reaches timm, which adapts the export's RGB first conv (adapt_input_conv) as for its own models."""
    import timm
    trained = encoder_checkpoint(tmp_path / "ft.pth", NAME)
    export_encoder(str(tmp_path / "ft.pth"), str(tmp_path / "export"))
    for weights in ("export", "ft.pth"):
        encoder = hub_load(NAME, weights=str(tmp_path / weights), in_chans=1, img_size=64).eval()
        torch.testing.assert_close(encoder.patch_embed1.proj.weight,
                                   timm.models.adapt_input_conv(1, trained.patch_embed1.proj.weight))
        assert encoder(torch.randn(2, 1, 64, 64)).shape == (2, trained.num_features)
