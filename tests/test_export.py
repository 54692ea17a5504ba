"""The model card (README.md) of every folder export: the hub's front matter, the recipe from the checkpoint's saved
flags, the results given to the export, and loading code that runs as it is written."""
import json
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
                   key="model", datasets=["imagenet"])  # the hub's name of the data: --dataset (no default)
    card = (tmp_path / "export" / "README.md").read_text()
    meta = front_matter(card)
    for line in ("library_name: timm", "license: mit", "pipeline_tag: image-feature-extraction",
                 'datasets:\n- "imagenet"', '- "timm"', '- "dmjd"', '- "arxiv:2301.00230"'):
        assert line in meta, line
    assert "# convvit_tiny_patch16" in card and "DMJD" in card and "from `pre.pth`" in card
    assert "A `convvit_tiny_patch16` encoder pre-trained with DMJD (" in card
    assert "These weights were pre-trained with DMJD ([arXiv 2301.00230](https://arxiv.org/abs/2301.00230))" in card
    assert "model-index" not in meta  # the result gives no task, dataset and metric ids
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
    config = json.loads((tmp_path / "export" / "config.json").read_text())
    assert config["pretrained_cfg"]["license"] == "cc-by-nc-4.0"  # the weights' license, as the card says


def test_a_malformed_result_is_an_error_before_anything_is_written(tmp_path):
    encoder_checkpoint(tmp_path / "ft.pth", "convvit_tiny_patch16")
    with pytest.raises(ValueError, match="NAME=VALUE"):
        export_encoder(str(tmp_path / "ft.pth"), str(tmp_path / "export"), results=["83.2"])
    assert not (tmp_path / "export").exists()


def test_the_card_says_only_what_the_checkpoint_records(tmp_path):
    """Weights without a DMJD pre-training record (saved by hand, MAE's, the authors' release: no training script's
    flags) are not called DMJD's; a fine-tuning or probing run says what it started from; the citation is there
    either way, for the code."""
    import safetensors.torch
    import timm

    import main_finetune
    import main_linprobe
    safetensors.torch.save_file(timm.create_model("convvit_tiny_patch16", img_size=64).state_dict(),
                                str(tmp_path / "random.safetensors"))
    finetune_flags = vars(main_finetune.get_args_parser().parse_args([]))
    probe_flags = vars(main_linprobe.get_args_parser().parse_args(["--finetune", "pre.pth"]))
    cases = {
        "random.safetensors": "whose checkpoint does not record how it was trained (no saved flags of a training "
                              "script of this project)",
        "scratch.pth": "fine-tuned for classification by this project's `main_finetune.py`, from a random "
                       "initialisation (no `--finetune`)",
        "ft.pth": "fine-tuned for classification by this project's `main_finetune.py`, starting from `pre.pth`",
        "probe.pth": "from a linear probe of this project's `main_linprobe.py`, which keeps the encoder frozen: the "
                     "weights of `pre.pth`",
    }
    encoder_checkpoint(tmp_path / "scratch.pth", "convvit_tiny_patch16", **dict(finetune_flags, finetune=""))
    encoder_checkpoint(tmp_path / "ft.pth", "convvit_tiny_patch16", **dict(finetune_flags, finetune="pre.pth"))
    encoder_checkpoint(tmp_path / "probe.pth", "convvit_tiny_patch16", **probe_flags)
    for name, said in cases.items():
        out = tmp_path / name.replace(".", "_")
        export_encoder(str(tmp_path / name), str(out), model_name="convvit_tiny_patch16")
        card = (out / "README.md").read_text()
        assert f"A `convvit_tiny_patch16` encoder {said}, exported" in card, (name, card[:900])
        for claim in ("pre-trained with DMJD", "from a DMJD encoder", '"dmjd"', "masked-image-modeling"):
            assert claim not in card, (name, claim)
        assert "## Citation" in card and "eprint        = {2301.00230}" in card
        assert "cite it for the code, and the weights' own origin for the weights" in card
        config = json.loads((out / "config.json").read_text())["pretrained_cfg"]
        assert "paper_ids" not in config and config["license"] == "mit"  # no paper the checkpoint does not record
    pretrained = tmp_path / "pre.pth"
    encoder_checkpoint(pretrained, "convvit_tiny_patch16", **RECIPE)
    export_encoder(str(pretrained), str(tmp_path / "dmjd"))
    config = json.loads((tmp_path / "dmjd" / "config.json").read_text())["pretrained_cfg"]
    assert config["paper_ids"] == "arXiv:2301.00230"


def test_without_dataset_the_card_names_none_but_the_data_folder(tmp_path):
    """The name of the run's data folder (here `cls`) is not the hub's name of a dataset: the metadata names none,
    the text says the folder."""
    encoder_checkpoint(tmp_path / "pre.pth", "convvit_tiny_patch16", **dict(RECIPE, data_path="/data/demo/cls/"))
    export_encoder(str(tmp_path / "pre.pth"), str(tmp_path / "export"))
    card = (tmp_path / "export" / "README.md").read_text()
    assert "datasets:" not in front_matter(card)
    assert "The run read its images from a folder named `cls`; the metadata names no dataset" in card


def test_results_with_their_ids_make_the_model_index_the_hub_reads(tmp_path):
    """`[TASK, DATASET, METRIC] NAME=VALUE` results enter the model-index (read back with huggingface_hub's own
    parser, as the hub reads it), every result the results table; malformed ids are an error."""
    from huggingface_hub import ModelCard
    encoder_checkpoint(tmp_path / "pre.pth", "convvit_tiny_patch16", **RECIPE)
    export_encoder(str(tmp_path / "pre.pth"), str(tmp_path / "export"), results=[
        "[image-classification, imagenet-1k, accuracy] ImageNet-1K fine-tune top-1=85.2",
        "[image-segmentation, scene_parse_150, mean_iou] ADE20K mIoU=48.1 (single scale)", "k-NN: top-1=60"])
    card = ModelCard((tmp_path / "export" / "README.md").read_text(), ignore_metadata_errors=False)
    assert card.data.model_name == "convvit_tiny_patch16"
    found = [(r.task_type, r.dataset_type, r.dataset_name, r.metric_type, r.metric_value, r.metric_name)
             for r in card.data.eval_results]
    assert found == [("image-classification", "imagenet-1k", "imagenet-1k", "accuracy", 85.2,
                      "ImageNet-1K fine-tune top-1"),
                     ("image-segmentation", "scene_parse_150", "scene_parse_150", "mean_iou", "48.1 (single scale)",
                      "ADE20K mIoU")]
    for row in ("| ImageNet-1K fine-tune top-1 | 85.2 |", "| ADE20K mIoU | 48.1 (single scale) |",
                "| k-NN: top-1 | 60 |"):
        assert row in card.content
    with pytest.raises(ValueError, match=r"three ids, \[TASK, DATASET, METRIC\]"):
        export_encoder(str(tmp_path / "pre.pth"), str(tmp_path / "other"), results=["[accuracy] top-1=1"])


def test_key_teacher_of_a_run_without_a_teacher_says_that_run_had_none(tmp_path, capsys):
    """A pre-training run without an EMA teacher saves teacher=None: --key teacher says the run trained none (not
    that the entry is missing while it is listed), and the command prints it as its error line."""
    from dmjd_encoders.export import main
    from util.checkpoint import save_checkpoint
    model = encoder_checkpoint(tmp_path / "enc.pth", "convvit_tiny_patch16")
    save_checkpoint({"model": {f"encoder.{k}": v for k, v in model.state_dict().items()}, "teacher": None,
                     "args": dict(RECIPE, model="dmjd_convit_tiny_patch16_dec1_hog", vis_target="hog")},
                    str(tmp_path / "pre.pth"))
    with pytest.raises(KeyError) as missing:
        export_encoder(str(tmp_path / "pre.pth"), str(tmp_path / "export"), key="teacher")
    message = missing.value.args[0]
    assert message == ("the checkpoint's 'teacher' entry is empty: the run trained no EMA teacher (pre-training "
                       "trains one with --vis_target ema); its encoder is the student's, key 'model'")
    with pytest.raises(SystemExit) as exited:
        main([str(tmp_path / "pre.pth"), str(tmp_path / "export"), "--key", "teacher"])
    assert str(exited.value) == f"error: {message}"
    export_encoder(str(tmp_path / "pre.pth"), str(tmp_path / "export"))  # the student exports


def test_the_command_names_itself_in_its_help(monkeypatch, capsys):
    """The usage line names the program as it was started (export_encoder.py here, dmjd-export-encoder installed:
    tests/test_package.py), and the description comes below it, not in the name's place."""
    from dmjd_encoders.export import main
    monkeypatch.setattr(sys, "argv", [str(ROOT / "export_encoder.py"), "--help"])
    with pytest.raises(SystemExit) as exited:
        main()
    usage = capsys.readouterr().out
    assert exited.value.code == 0 and usage.startswith("usage: export_encoder.py "), usage[:300]
    assert "\nexport the encoder of a checkpoint: a folder in timm's hub layout" in usage
