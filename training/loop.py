"""The one training loop: a script describes its task (training.task.Task), and `fit` trains it.

    task = MyTask(...)                                   # builds what it trains; turns a batch into losses
    with Run(cfg) as run:
        fit(run, task, cfg, train_loader, val_loader, Schedule.of_epochs(cfg.epochs, len(train_loader), cfg.accum_iter))

The loop counts optimizer steps. A `Schedule` cuts them into rounds: an evaluation, a checkpoint and a log.txt line
end each round. An epoch-based script's round is an epoch of its data; an iteration-based one's (segmentation,
detection) is --eval_interval steps. The config's schedules (lr, and e.g. the EMA teacher's momentum: functions of
the optimizer step from util.schedules) are read at each step. `fit` owns what is the same for every task: resume,
stop requests (a checkpoint of the current step, then Preempted), the non-finite policy (NonFiniteLossError, raised),
best-score tracking, checkpoints and log.txt. `train_round` trains one round's micro-batches, `evaluate` is the one
evaluation loop (every task's `predict` and Evaluator over a loader) and `evaluate_checkpoint` is --eval.
"""
from dataclasses import dataclass
from typing import Dict, Optional

import torch

from training.config import TrainConfig
from training.distributed import all_reduce_sum
from training.errors import RunError
from training.meters import Progress, log_window
from training.checkpointing import CheckpointState
from training.run import Run
from training.step import TrainStep, autocast_context
from training.task import Scores, Task


@dataclass(frozen=True)
class Schedule:
    """The run in optimizer steps: `steps` of them, in rounds of `round_steps` (the last one shorter when they do not
    divide), each step of `accum_iter` micro-batches. `unit` is what the script calls a round: "epoch" (TensorBoard's
    axis is then MAE's epoch x 1000) or "iteration" (a round is --eval_interval optimizer steps; the axis counts
    steps)."""
    steps: int
    round_steps: int
    accum_iter: int
    unit: str = "epoch"

    @classmethod
    def of_epochs(cls, epochs: int, batches_per_epoch: int, accum_iter: int) -> "Schedule":
        """Epochs of a loader's batches; an incomplete last accumulation window of an epoch is not taken."""
        per_epoch = batches_per_epoch // accum_iter
        return cls(epochs * per_epoch, per_epoch, accum_iter)

    @property
    def rounds(self) -> int:
        return -(-self.steps // self.round_steps)

    @property
    def round_batches(self) -> int:
        """Micro-batches of a full round."""
        return self.round_steps * self.accum_iter

    def last_step(self, round_index: int) -> int:
        """The optimizer step a round ends at (its steps are those after the previous round's last)."""
        return min((round_index + 1) * self.round_steps, self.steps)

    def batches_in(self, round_index: int) -> int:
        """Micro-batches of round `round_index` (the last one may be shorter)."""
        return (self.last_step(round_index) - round_index * self.round_steps) * self.accum_iter

    def batches_after(self, round_index: int) -> int:
        """Micro-batches of the rounds after `round_index` (for the run's ETA)."""
        return (self.steps - self.last_step(round_index)) * self.accum_iter

    def axis(self, round_index: int, batches_done: int) -> int:
        """TensorBoard's x of a point `batches_done` micro-batches into a round."""
        if self.unit == "epoch":
            return int((round_index + batches_done / self.round_batches) * 1000)  # comparable across batch sizes
        return (round_index * self.round_batches + batches_done) // self.accum_iter

    @property
    def round_name(self) -> str:
        return "epoch" if self.unit == "epoch" else "evaluation interval"

    def label(self, round_index: int) -> str:
        """The round as the script reports it: "epoch 3", or "iteration 48000" (the step it ends at)."""
        return f"epoch {round_index}" if self.unit == "epoch" else f"iteration {self.last_step(round_index)}"

    def span(self, round_index: int) -> str:
        if self.unit == "epoch":
            return f"epoch {round_index}"
        return f"iterations {round_index * self.round_steps}-{self.last_step(round_index)}"

    def header(self, round_index: int) -> str:
        return f"Epoch [{round_index}]" if self.unit == "epoch" else self.span(round_index).capitalize()


def train_round(task: Task, step: TrainStep, loader, progress: Progress, round_index: int, schedule: Schedule,
                writer=None) -> Dict[str, float]:
    """Trains the micro-batches of a round that `progress` tracks (all of them, or the rest of an interrupted round,
    until a stop is agreed); returns the round's mean losses, scheduled values (lr, ...) and counts, summed over all
    ranks."""
    task.trained.train()
    skipped_before = step.skipped
    first = round_index * schedule.round_batches
    for it, batch in progress.track(loader):
        inputs, targets, num_bad = batch if len(batch) == 3 else (*batch, 0)  # (inputs, targets[, unreadable])
        weight = 1.0
        if inputs is None or len(inputs) == 0:  # every file of the batch was unreadable (each named in a warning)
            (inputs, targets), weight = task.placeholder(), 0.0
        inputs, targets, readable = task.prepare(inputs, targets)
        progress.count(readable if weight else 0, bad_images=num_bad, empty_batches=int(weight == 0))
        # the schedules' position is in optimizer steps: the lr of a window is set at its first micro-batch
        losses = step(lambda: task.loss(inputs, targets), (first + it) / schedule.accum_iter, first + it, weight)
        if losses is not None:
            progress.losses.add(*losses)
        if progress.due(it):
            log_window(step, progress, it, schedule.axis(round_index, it + 1), writer)

    stats = {"bad_images": 0, "empty_batches": 0, **progress.totals()}
    stats.update(step.scheduled, steps=progress.total // schedule.accum_iter,
                 nonfinite_skipped=step.skipped - skipped_before)
    summary = "  ".join(f"{n} {stats[n]:.4f}" for n in task.loss_names) + f"  {stats['images']} images"
    if stats["bad_images"]:
        summary += (f", {stats['bad_images']} unreadable {task.samples} skipped ({stats['empty_batches']} batches had "
                    f"none readable)")
    if stats["nonfinite_skipped"]:
        summary += f", {stats['nonfinite_skipped']} non-finite steps skipped"
    print(f"{progress.header} {'stopped' if progress.stopped else 'done'}: {summary}; {progress.summary()}", flush=True)
    return stats


@torch.no_grad()
def evaluate(task: Task, loader, device: torch.device, print_freq: int,
             amp_dtype: Optional[torch.dtype] = None) -> Scores:
    """The one evaluation loop: the task's `predict` on every batch the loader gives this process (under autocast
    with `amp_dtype`; the task's Evaluator takes the outputs after it), progress lines, the batches' unreadable files
    counted, and the scores reduced over the processes (each sample once when the loader shards without padding),
    with the counts `images` and `bad_images`. Batches are (inputs, targets, unreadable files); inputs None when
    none of a batch's files could be read. No sample read on any process raises RunError on every process alike:
    there is no score to report."""
    task.model.eval()
    progress = Progress("Test", len(loader), print_freq, device)
    evaluator = task.evaluator()
    counts = torch.zeros(2, dtype=torch.float64)  # samples evaluated, unreadable files
    for it, (inputs, targets, num_bad) in progress.track(loader):
        counts[1] += num_bad
        if inputs is not None:
            progress.count(len(inputs))
            counts[0] += len(inputs)
            with autocast_context(device, amp_dtype):
                outputs = task.predict(inputs, targets)
            evaluator.update(outputs, targets)
        if progress.due(it):
            progress.line(it, evaluator.running())
    images, bad = (int(n) for n in all_reduce_sum(counts.to(device), what="the evaluation's counts").tolist())
    if images == 0:  # every process has the same sums: all stop alike
        raise RunError(f"no image of {task.evaluation_set} could be read in this evaluation ({bad} unreadable files "
                       f"skipped, see the warnings above): there is no score to report")
    scores = evaluator.scores()
    scores.update(images=images, bad_images=bad)
    return scores


def evaluate_checkpoint(run: Run, task: Task, loader, label: str) -> Scores:
    """--eval: the weights of --resume (if given, else the model as it is) on `loader`; the scores are printed
    (`task.report`), written to log.txt as a record of `label` (fsync'd, as the run's lines) and returned."""
    run.resume(None, task.model, auto=False)
    scores = evaluate(task, loader, run.device, run.cfg.print_freq, run.cfg.amp_dtype)
    print(task.report(scores))
    if run.is_main:
        task.evaluated(scores, label)
        run.append_log({"eval": label, **task.scores_record(scores)})
    return scores


def best_entry(key: Optional[str], best: Optional[float]) -> Dict[str, object]:
    """The checkpoint's entry of the best score so far ({"best_<score>": value}; none for a task without a score)."""
    return {key: best} if key else {}


def fit(run: Run, task: Task, cfg: TrainConfig, train_loader, val_loader, schedule: Schedule) -> Scores:
    """Trains `task` for the schedule's rounds: wraps its model for DDP, takes its optimizer and the config's
    schedules (`cfg.schedules`: functions of the optimizer step), resumes the newest good checkpoint, and after each
    round evaluates on `val_loader` (if given), tracks the best score and writes the round's checkpoints and log.txt
    line. Returns the last evaluation's scores (or the last round's training record)."""
    task.trained = run.wrap(task.model)
    optimizer = task.optimizer()
    step = TrainStep.for_run(task.trained, optimizer, cfg, run.rank, cfg.schedules(schedule.round_steps),
                             schedule.round_batches, loss_names=task.loss_names, after_step=task.after_step)
    state = CheckpointState(task.model, optimizer, step, task)
    start = run.resume(state)
    best_key = f"best_{task.best}" if task.best else None
    best = run.saved.get(best_key) if best_key else None
    result: Dict[str, object] = {}
    for r in run.rounds(start, schedule.rounds, train_loader, schedule.round_name):
        progress = run.progress(r, schedule.batches_in(r), task.loss_names, header=schedule.header(r),
                                later_iters=schedule.batches_after(r))
        stats = train_round(task, step, train_loader, progress, r, schedule, run.writer)
        run.stop_if_requested(state, r, progress, **best_entry(best_key, best))
        if stats["images"] == 0:  # every rank agrees: the counts are summed over ranks
            raise RunError(f"no image of {schedule.span(r)} could be read ({stats['bad_images']} files failed, see "
                           f"the warnings above); check --data_path {cfg.data_path}")
        record = {} if schedule.unit == "epoch" else {"iteration": schedule.last_step(r)}
        record.update({f"train_{k}": v for k, v in task.round_stats(stats).items()})
        result, is_best = stats, False
        if val_loader is not None:
            result = evaluate(task, val_loader, run.device, cfg.print_freq, cfg.amp_dtype)
            is_best = best is None or result[task.best] > best
            best = result[task.best] if is_best else best
            print(f"{schedule.label(r)}: {task.report(result)}; best {task.best} {best:.2f}")
            if run.writer is not None:
                task.log_scores(run.writer, result, schedule.axis(r + 1, 0))
            if run.is_main:
                task.evaluated(result, schedule.label(r))
            record.update(task.scores_record(result), **{best_key: best})
        if run.is_main:
            task.end_round(r, run.writer)
        run.end_round(state, r, record, best=is_best, **best_entry(best_key, best))
    if best is not None:
        print(f"best {task.best} {best:.2f}")
    return result
