"""The training layer that every script and benchmark shares, between `util/` (pure helpers) and the scripts.

- `training.loop`: the one training loop. `fit` trains a `Task` (what a script trains: its model, loss, evaluation
  and extra state) for a `Schedule` of optimizer steps cut into rounds (epochs, or evaluation intervals) and owns
  resume, stop requests, the non-finite policy, best-score tracking, checkpoints and log.txt; `train_round`,
  `evaluate`, `evaluate_checkpoint`.
- `training.flags`: the flags every script shares and their checks (--data_path's folders too), `flag`, which
  declares with each flag what a resumed run does with it and its range, and main_segment.py's and main_detect.py's
  parsers, importable without torch, so that a script answers --help and flag errors before it imports torch.
- `training.config`: the frozen, typed config that flags are resolved into once.
- `training.step`: `TrainStep`, the optimizer step of every loop (autocast, accumulation with `no_sync`, fp16 grad
  scaler, clipping, a post-step hook, one non-finite policy).
- `training.meters`: losses summed on the device and read every `--print_freq` steps, and the progress lines (ETA,
  images/s, data wait, peak memory).
- `training.data`: loaders whose every sample is seeded from (seed, epoch, index), so that a resumed run sees the
  same crops as an uninterrupted one (by epochs of the data, or by windows of an endless stream for iteration-based
  runs), and exact sharded evaluation.
- `training.distributed`: the process group (torchrun's environment, NCCL on CUDA and gloo on CPU, print on the
  main rank only, teardown), the sums and minima over the processes, and the name of the collective a process waits
  in, reported when it times out.
- `training.output`: the output folder's protocol (lock, crash completion, the checkpoint to resume from, saves
  without non-finite values, log.txt, TensorBoard's writer).
- `training.run`: the run around the loop (process group, seeding, signals, DDP, the loader's position, resume).
- `training.errors`: what ends a run (RunError, FlagError, NonFiniteLossError, Preempted), and the one place that
  turns them into a script's exit (`exits_like_a_script`).
- `training.transfer`: what the dense-transfer scripts (segmentation, detection) share: their common flag checks, the
  lr from --blr, the encoder's dense options, and the model built from the resumed checkpoint or --finetune.
- `training.launch`: torchrun with the requeue status, for SLURM.
- `training.signals`: the stop signals over a process's whole life, from a script's first line: a requeue (75) while
  it starts, the run's stop while it runs, ignored once the run ended.
- `training.sync_batchnorm`: BatchNorm over the batches of all processes, on CUDA (torch's SyncBatchNorm) and on
  the CPU with gloo (one differentiable all-reduce of the statistics).

Nothing here imports a top-level module: models, engines and scripts build on it, not the other way round.
"""
