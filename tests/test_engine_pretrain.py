"""engine_pretrain.PretrainTask in the training loop's round (training.loop.train_round): placeholders for unreadable
batches, the non-finite
policy, and a steady state that never waits for the host."""
import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch

import models_dmjd  # noqa: F401  (registers the DMJD models)
from helpers import pretrain_config, pretrain_epoch
from models_dmjd import EMATeacher
from training.step import NonFiniteLossError

ROOT = Path(__file__).resolve().parents[1]


def test_a_batch_without_readable_images_still_steps_without_moving_the_weights():
    torch.manual_seed(0)
    model = timm.create_model("dmjd_convit_tiny_patch16_dec1_hog", img_size=64)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    cfg = pretrain_config(lr=0.5, min_lr=0.5, print_freq=10)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    stats = pretrain_epoch(model, [(None, None, 4)], optimizer, cfg)
    assert stats["steps"] == 1 and stats["images"] == 0 and stats["bad_images"] == 4 and stats["empty_batches"] == 1
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key  # the placeholder crop has no weight in the gradient

    images = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    stats = pretrain_epoch(model, [(images, None, 1), (None, None, 2)], optimizer, cfg)
    assert stats["images"] == 2 and stats["bad_images"] == 3 and stats["empty_batches"] == 1
    assert np.isfinite(stats["loss"]) and stats["loss"] > 0  # averaged over the batches with images only
    assert not torch.equal(model.state_dict()["decoder_pred.weight"], before["decoder_pred.weight"])


DDP_STEP_SCRIPT = """
import datetime, json, os
import timm, torch, torch.distributed as dist
import models_dmjd
from helpers import pretrain_config, pretrain_epoch

rank = int(os.environ["RANK"])
dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
torch.manual_seed(0)
model = timm.create_model("dmjd_convit_tiny_patch16_dec1_hog", img_size=64)
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
images = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(rank))
# rank 0 meets a batch without any readable image at its second step; rank 1 never does
batches = [(images, None, 0), (None, None, 2), (images, None, 1)] if rank == 0 else [(images, None, 0)] * 3
stats = pretrain_epoch(torch.nn.parallel.DistributedDataParallel(model), batches, optimizer,
                       pretrain_config(lr=1e-3, min_lr=1e-3, print_freq=1, world_size=2))
print(json.dumps({"stats": stats, "checksum": sum(p.double().sum().item() for p in model.parameters()),
                  "steps": [int(s["step"]) for s in optimizer.state.values()][0]}))
from training.distributed import cleanup_distributed
cleanup_distributed()  # the dropped DDP wrapper freed before the group (a teardown that can hang otherwise)
"""


def test_ddp_ranks_take_the_same_steps_when_one_has_no_readable_image():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")]),
               WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    procs = [subprocess.Popen([sys.executable, "-c", DDP_STEP_SCRIPT], cwd=ROOT, text=True, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, env=dict(env, RANK=str(rank)))
             for rank in range(2)]
    outputs = [p.communicate(timeout=180) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err[-2000:] for _, err in outputs]
    results = [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs]
    assert results[0]["steps"] == results[1]["steps"] == 3
    assert results[0]["checksum"] == results[1]["checksum"]  # the replicas stayed identical
    for result in results:  # counts summed over the ranks
        assert result["stats"]["images"] == 10 and result["stats"]["bad_images"] == 3
        assert result["stats"]["empty_batches"] == 1


class _NaNAfter(torch.nn.Module):
    """Returns finite losses, then NaN from the given step on."""

    def __init__(self, bad_step):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(()))
        self.bad_step, self.calls = bad_step, 0

    def forward(self, images, teacher=None):
        loss = self.weight * images.float().mean() * (float("nan") if self.calls >= self.bad_step else 1.0)
        self.calls += 1
        return loss, {"loss_mask": loss.detach()}


def test_nonfinite_loss_stops_naming_the_step():
    model = _NaNAfter(bad_step=5)
    loader = [(torch.ones(2, 3, 4, 4), torch.zeros(2)) for _ in range(12)]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss at step 5 .*loss_mask nan"):
        pretrain_epoch(model, loader, optimizer, pretrain_config(lr=0.1, min_lr=0, epochs=1, print_freq=4))
    assert model.calls == 8  # detected at the next read-back (every print_freq steps), not at the end


class _NaNAt(torch.nn.Module):
    """Finite losses except at the given calls: a NaN loss, or (grad_only) a finite loss with a NaN gradient."""

    def __init__(self, bad_calls, grad_only=False):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(()))
        self.bad_calls, self.grad_only, self.calls = set(bad_calls), grad_only, 0

    def forward(self, images, teacher=None):
        loss = self.weight * images.float().mean()
        if self.calls in self.bad_calls:
            # sqrt(w - w) is 0 with gradient 0 * inf = NaN
            loss = loss + torch.sqrt(self.weight - self.weight) if self.grad_only else loss * float("nan")
        self.calls += 1
        return loss, {"loss_mask": loss.detach(), "loss_vis": 2 * loss.detach()}


class _CountingTeacher:
    updates = 0

    def update(self, student, momentum):
        self.updates += 1


def _skip_config(skip_nonfinite, accum_iter=1):
    return pretrain_config(lr=0.1, min_lr=0.1, epochs=1, print_freq=4, ema_momentum=0.9,
                           skip_nonfinite=skip_nonfinite, accum_iter=accum_iter)


@pytest.mark.parametrize("grad_only", [False, True])
def test_skip_nonfinite_skips_the_update_and_the_teacher(grad_only):
    model, teacher = _NaNAt({2, 5}, grad_only), _CountingTeacher()
    loader = [(torch.ones(2, 3, 4, 4), torch.zeros(2), 0) for _ in range(8)]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    stats = pretrain_epoch(model, loader, optimizer, _skip_config(2), teacher=teacher, student=model)
    assert stats["nonfinite_skipped"] == 2 and teacher.updates == 6
    assert torch.isfinite(model.weight) and model.weight.item() == pytest.approx(1 - 6 * 0.1)
    assert np.isfinite(stats["loss"])  # the skipped steps are left out of the means


def test_skip_nonfinite_stops_after_n_naming_the_step_and_both_losses():
    model = _NaNAt({1, 3})
    loader = [(torch.ones(2, 3, 4, 4), torch.zeros(2), 0) for _ in range(8)]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    # One skip was spent in an earlier epoch; accumulation pairs calls 0-1 and 2-3: step 1 is skipped, 3 stops.
    with pytest.raises(NonFiniteLossError, match=r"at step 3 .*loss_mask nan, loss_vis nan; 2 earlier"):
        pretrain_epoch(model, loader, optimizer, _skip_config(2, accum_iter=2), skipped=1)
    assert model.calls == 4 and torch.isfinite(model.weight)  # stopped before the update, not at a later read-back


@pytest.mark.parametrize("vis_target,accum,fused", [("hog", 1, True), ("ema", 2, False)])
def test_steady_state_step_never_waits_for_the_host(vis_target, accum, fused, host_read_recorder):
    """Every iteration but the last (which prints, checks finiteness and sums the epoch) reads nothing back."""
    cfg = pretrain_config(lr=1e-3, min_lr=0.0, warmup_epochs=1, epochs=2, clip_grad=1.0, print_freq=1000,
                          ema_momentum=0.99, accum_iter=accum, vis_target=vis_target)
    torch.manual_seed(0)
    model = timm.create_model("dmjd_convit_tiny_patch16_dec1_hog", img_size=64, vis_target=vis_target)
    teacher = EMATeacher(model.encoder) if model.uses_teacher else None
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95),
                                  **({"fused": True} if fused else {"foreach": True}))
    recorder = host_read_recorder(optimizer)

    def loader():
        for it in range(6):
            recorder.iteration = it
            yield torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8), torch.zeros(2), 0

    class Loader:
        def __iter__(self):
            return loader()

        def __len__(self):
            return 6

    with recorder:
        stats = pretrain_epoch(model, Loader(), optimizer, cfg, teacher=teacher,
                               student=model.encoder if teacher else None)
    assert stats["images"] == 12 and all(math.isfinite(stats[k]) for k in ("loss", "loss_mask", "loss_vis"))
    assert recorder.seen, "the recorder saw nothing: it does not intercept the reads it should"
    early = [(it, op) for it, op in recorder.seen if it < 5]
    assert not early, f"host reads in steady-state iterations: {early}"


@pytest.mark.parametrize("vis_target", ["hog", "ema"])
def test_the_task_owns_the_teacher_its_update_and_its_checkpoint_entry(vis_target):
    from engine_pretrain import PretrainTask
    from models_dmjd import create_from_flags
    from training.errors import RunError

    cfg = pretrain_config(vis_target=vis_target, ema_momentum=0.5)
    model = create_from_flags(cfg.flags())
    task = PretrainTask(model, cfg, torch.device("cpu"))
    saved = task.extra_state()
    if vis_target == "hog":  # no teacher: the entry is still there, None, as every pre-training checkpoint has it
        assert saved == {"teacher": None} and task.teacher is None and set(cfg.schedules(10)) == {"lr"}
        task.after_step({})  # nothing to update
        return
    with torch.no_grad():
        for p in model.encoder.parameters():
            p.add_(1.0)
    before = [t.clone() for t in task.teacher.parameters()]
    task.after_step({"momentum": 0.5})  # the post-step hook: t <- m t + (1 - m) s with m the scheduled momentum
    for t, b, s in zip(task.teacher.parameters(), before, model.encoder.parameters()):
        assert torch.allclose(t, 0.5 * b + 0.5 * s)
    assert task.momentum == 0.5 and set(cfg.schedules(10)) == {"lr", "momentum"}
    assert set(saved) == {"teacher"} and saved["teacher"]
    with pytest.raises(RunError, match="has no EMA teacher; it was not trained with --vis_target ema"):
        task.load_extra_state({"teacher": None}, "old.pth")
