"""training.step.TrainStep: accumulation, precision, clipping, schedules, seeding, the post-step hook and the
non-finite policy (the policy's behaviour inside an epoch is in test_engine_pretrain.py)."""
import datetime
import socket

import pytest
import torch
import torch.distributed as dist

from training.step import NonFiniteLossError, TrainStep


def linear(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Linear(4, 1)


def data(seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(8, 4, generator=g), torch.randn(8, 1, generator=g)


def mse(model, x, y):
    return lambda: torch.nn.functional.mse_loss(model(x), y)


def test_accumulated_micro_batches_take_the_step_of_the_whole_batch():
    x, y = data()
    whole, parts = linear(), linear()
    TrainStep(whole, torch.optim.SGD(whole.parameters(), lr=0.1), lambda p: 0.1)(mse(whole, x, y), 0.0, 0)
    step = TrainStep(parts, torch.optim.SGD(parts.parameters(), lr=0.1), lambda p: 0.1, accum_iter=2)
    assert step(mse(parts, x[:4], y[:4]), 0.0, 0) is None  # mid-window: no optimizer step yet
    torch.testing.assert_close(parts.weight, linear().weight)
    losses, count = step(mse(parts, x[4:], y[4:]), 0.0, 1)
    assert count == 2 and losses.shape == (1,)
    torch.testing.assert_close(parts.weight, whole.weight)
    assert all(p.grad is None for p in parts.parameters())  # zeroed after the step


def test_lr_is_set_at_each_windows_first_micro_batch_with_each_groups_scale():
    model = linear()
    optimizer = torch.optim.SGD([{"params": [model.weight], "lr_scale": 0.5}, {"params": [model.bias]}], lr=1.0)
    step = TrainStep(model, optimizer, lambda progress: 10 * progress, accum_iter=2)
    x, y = data()
    step(mse(model, x, y), 0.1, 0)
    step(mse(model, x, y), 0.2, 1)  # same window: the lr of progress 0.1 stays
    assert step.lr == pytest.approx(1.0)
    assert [g["lr"] for g in optimizer.param_groups] == [pytest.approx(0.5), pytest.approx(1.0)]


def test_only_fp16_gets_a_grad_scaler():
    for dtype, scaled in ((torch.float16, True), (torch.bfloat16, False), (None, False)):
        model = linear()
        step = TrainStep(model, torch.optim.SGD(model.parameters(), lr=0.1), lambda p: 0.1, amp_dtype=dtype)
        assert (step.scaler is not None) == scaled


def test_clipping_bounds_the_gradient_norm():
    model = linear()
    before = model.weight.detach().clone()
    step = TrainStep(model, torch.optim.SGD(model.parameters(), lr=1.0), lambda p: 1.0, clip_grad=0.01)
    x, y = data()
    step(lambda: 1e4 * torch.nn.functional.mse_loss(model(x), y), 0.0, 0)
    moved = torch.cat([(model.weight - before).flatten(), (model.bias - linear().bias).flatten()]).detach()
    assert moved.norm().item() == pytest.approx(0.01, rel=1e-4)


def test_seeding_makes_each_index_draw_the_same_whatever_came_before():
    model = linear()
    step = TrainStep(model, torch.optim.SGD(model.parameters(), lr=0.0), lambda p: 0.0, seed=3, rank=0)
    seen = []

    def forward():
        seen.append(torch.rand(2))
        return model(torch.ones(1, 4)).sum()

    for index in (5, 6, 5):
        step(forward, 0.0, index)
    assert torch.equal(seen[0], seen[2]) and not torch.equal(seen[0], seen[1])
    other = TrainStep(model, torch.optim.SGD(model.parameters(), lr=0.0), lambda p: 0.0, seed=3, rank=1)
    other(forward, 0.0, 5)
    assert not torch.equal(seen[3], seen[0])  # every rank draws its own masks


class _Teacher:
    def __init__(self):
        self.momenta = []

    def update(self, student, momentum):
        self.momenta.append(momentum)


def test_after_step_follows_each_optimizer_step_with_the_scheduled_momentum():
    # the post-step hook of a task (pre-training's EMA teacher) gets the schedules at each window's last batch
    model, teacher = linear(), _Teacher()
    step = TrainStep(model, torch.optim.SGD(model.parameters(), lr=0.1),
                     {"lr": lambda p: 0.1, "momentum": lambda p: 0.9 + p}, accum_iter=2,
                     after_step=lambda scheduled: teacher.update(model, scheduled["momentum"]))
    x, y = data()
    for index in range(4):
        step(mse(model, x, y), index / 100, index)
    assert teacher.momenta == [pytest.approx(0.91), pytest.approx(0.93)]  # the progress of each window's last batch


def test_a_nonfinite_loss_is_remembered_without_a_host_read_and_named_with_its_epoch():
    model = linear()
    step = TrainStep(model, torch.optim.SGD(model.parameters(), lr=0.1), lambda p: 0.1,
                     loss_names=("loss", "loss_mask"), iters_per_epoch=10)
    x, y = data()
    step(mse(model, x, y), 0.0, 12)
    step.raise_if_nonfinite()  # all finite so far
    step(lambda: (torch.nn.functional.mse_loss(model(x), y) * float("nan"), {"loss_mask": torch.tensor(1.0)}),
         0.0, 13)
    step(lambda: torch.nn.functional.mse_loss(model(x), y) * float("inf"), 0.0, 14)  # not the first: not named
    with pytest.raises(NonFiniteLossError, match=r"at step 13 \(epoch 1, iteration 3\): loss nan, loss_mask 1\.0"):
        step.raise_if_nonfinite()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_skips_the_gradient_all_reduce_on_all_but_a_windows_last_micro_batch(monkeypatch):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1,
                            timeout=datetime.timedelta(seconds=60))
    try:
        ddp = torch.nn.parallel.DistributedDataParallel(linear())
        entered = []
        real = ddp.no_sync
        monkeypatch.setattr(ddp, "no_sync", lambda: entered.append(True) or real())
        step = TrainStep(ddp, torch.optim.SGD(ddp.parameters(), lr=0.1), lambda p: 0.1, accum_iter=3)
        x, y = data()
        for index in range(6):
            step(mse(ddp, x, y), 0.0, index)
        assert len(entered) == 4  # micro-batches 0, 1, 3 and 4
        del ddp, step
    finally:
        dist.destroy_process_group()
