"""What a script trains, as the one loop (training.loop) sees it: a `Task`, and its `Evaluator`.

A task writes four things: its model (`model`), its optimizer (`optimizer()`), its loss on a batch (`loss`: a dict of
named losses, "loss" the one to minimise) and, when it is evaluated, its evaluation step on a batch (`predict`) with
an `Evaluator` that sums the batches' results and reduces them to scores over the processes. The loop does the rest
for every task: the steps, progress lines, unreadable batches, autocast, the evaluation's image counts, best-score
tracking, checkpoints and log.txt.

Scores are a flat dict: a float is a score (acc1, mIoU, bbox_AP; None where it has no value), an int a count
(images, bad_images), and a dict of floats a score per class (IoU by class name). Presentation has defaults driven by
it: the line printed after an evaluation (`report`), the log.txt entries (`scores_record`: test_<name>) and
TensorBoard (`log_scores`: test/<name>, test_<name>/<class>). A task overrides what it shows otherwise, and has hooks
where it needs more: `evaluated` (e.g. a per-class table, a results file), `end_round` (e.g. a picture), and the
checkpoint's entries of its own (`extra_state` / `load_extra_state`).
"""
from typing import Dict, Optional, Tuple

import torch

Scores = Dict[str, object]


class Evaluator:
    """The sums of one evaluation on this process: `update(outputs, targets)` takes a batch's outputs (after the
    loop's autocast: compute in fp32 here); `running()` gives this process's figures so far for the progress lines;
    `scores()` reduces the sums over the processes (every process calls it: it may run collectives) to a flat scores
    dict, raising RunError when there is no score to report (e.g. no labelled pixel)."""

    def update(self, outputs, targets) -> None:
        raise NotImplementedError

    def running(self) -> Dict[str, float]:
        return {}

    def scores(self) -> Scores:
        raise NotImplementedError


class Task:
    """What a script trains. Subclasses set `model` (saved as the checkpoint's "model"; `trained` is what `loss`
    calls: the model in DDP once the loop wrapped it) and write:

    - `optimizer()`; `loss(inputs, targets)`: a dict of named losses ("loss" and the parts named in `loss_names`), or
      the loss tensor alone;
    - `prepare(inputs, targets)` -> (inputs, targets, readable): a training batch on the device, `readable` its real
      samples. A batch whose every file was unreadable arrives as `placeholder()` and trains with weight 0 (every DDP
      rank must take each step);
    - with an evaluation (`best`: the score whose highest value marks checkpoint-best.pth): `predict(inputs,
      targets)`, a batch's outputs (run under the loop's autocast and no_grad), and `evaluator()`, a fresh Evaluator;
      `evaluation_set` names the evaluated data in messages.

    The hooks (defaults do nothing, or present the flat scores dict): `after_step(scheduled)` after each applied
    optimizer step, with the values of the config's schedules other than the lr at that step (e.g. the EMA
    teacher's momentum); `round_stats`, `report`, `scores_record`, `log_scores`, `evaluated`, `end_round`,
    `extra_state` / `load_extra_state`.
    """
    loss_names: Tuple[str, ...] = ("loss",)
    best: Optional[str] = None
    samples = "images"  # what a sample is, in messages ("pairs" of image and annotation)
    evaluation_set = "the evaluation set"
    model: torch.nn.Module
    _trained: Optional[torch.nn.Module] = None

    @property
    def trained(self) -> torch.nn.Module:
        """The model as the loss calls it: wrapped in DDP by the loop when the run is distributed."""
        return self._trained if self._trained is not None else self.model

    @trained.setter
    def trained(self, module: torch.nn.Module) -> None:
        self._trained = module

    # -- what a task writes -------------------------------------------------------------------------------------------
    def optimizer(self) -> torch.optim.Optimizer:
        raise NotImplementedError

    def placeholder(self) -> Tuple[object, object]:
        raise NotImplementedError

    def prepare(self, inputs, targets) -> Tuple[object, object, int]:
        raise NotImplementedError

    def loss(self, inputs, targets):
        raise NotImplementedError

    def predict(self, inputs, targets):
        raise NotImplementedError

    def evaluator(self) -> Evaluator:
        raise NotImplementedError

    # -- hooks ---------------------------------------------------------------------------------------------------------
    def after_step(self, scheduled: Dict[str, float]) -> None:
        pass

    def round_stats(self, stats: Dict[str, float]) -> Dict[str, float]:
        """The training record of a round: `stats` (losses, lr, counts over all ranks) as the script reports it."""
        return stats

    def report(self, scores: Scores) -> str:
        """The line of an evaluation: its scores, then its counts."""
        shown = "  ".join(f"{k} {'n/a' if v is None else format(v, '.2f')}" for k, v in scores.items()
                          if v is None or isinstance(v, float))
        return f"{shown} on {scores['images']} {self.samples}" + (
            f" ({scores['bad_images']} unreadable {self.samples} skipped)" if scores.get("bad_images") else "")

    def scores_record(self, scores: Scores) -> dict:
        """The log.txt entries of an evaluation."""
        return {f"test_{k}": v for k, v in scores.items()}

    def log_scores(self, writer, scores: Scores, x: int) -> None:
        """TensorBoard's scalars of an evaluation at `x`: test/<score>, and test_<score>/<class> of a per-class
        score (counts and scores without a value are left out)."""
        for name, value in scores.items():
            if isinstance(value, float):
                writer.add_scalar(f"test/{name}", value, x)
            elif isinstance(value, dict):
                for part, part_value in value.items():
                    if isinstance(part_value, float):
                        writer.add_scalar(f"test_{name}/{part}", part_value, x)

    def evaluated(self, scores: Scores, label: str) -> None:
        """After each evaluation, on the main process (e.g. a per-class table)."""

    def end_round(self, round_index: int, writer) -> None:
        """After each round, on the main process (e.g. a picture for TensorBoard)."""

    def extra_state(self) -> dict:
        return {}

    def load_extra_state(self, checkpoint: dict, path: str) -> None:
        pass
