"""The training layer that every script and benchmark shares, between `util/` (pure helpers) and the scripts.

- `training.loop`: the one training loop. `fit` trains a `Task` for a `Schedule` of optimizer steps cut into rounds
  (epochs, or evaluation intervals) and owns resume, stop requests, the non-finite policy, best-score tracking,
  checkpoints and log.txt; `train_round`; `evaluate`, the one evaluation loop of every task; `evaluate_checkpoint`.
- `training.task`: `Task`, what a task writes (its model, optimizer, loss on a batch as a dict of named losses, its
  evaluation step and `Evaluator`), with defaults for the rest driven by a flat dict of scores.
- `training.flags`: the flags' machinery (`flag`, which declares with each flag what a resumed run does with it and
  its range; the checks before torch, --data_path's folders too) and the shared flag groups; importable without
  torch, so that a script answers --help and flag errors before it imports torch. No task's parser lives here.
- `training.config`: the frozen, typed config that flags are resolved into once, and its schedules.
- `training.step`: `TrainStep`, the optimizer step of every loop (autocast, accumulation with `no_sync`, fp16 grad
  scaler, clipping, the schedules of the step, one non-finite policy).
- `training.meters`: losses summed on the device and read every `--print_freq` steps, and the progress lines (ETA,
  images/s, data wait, peak memory).
- `training.data`: loaders whose every sample is seeded from (seed, round, index), so that a resumed run sees the
  same crops as an uninterrupted one (by epochs of the data, or by windows of an endless stream for iteration-based
  runs), and exact sharded evaluation.
- `training.distributed`: the process group and `DistributedContext` (torchrun's environment, NCCL on CUDA and gloo
  on CPU, print on the main rank only, DDP, teardown), the collectives every task uses, and the name of the
  collective a process waits in, reported when it times out.
- `training.checkpointing`: what a checkpoint holds, resume and the flags it must match, the saves of a round and of
  a stop.
- `training.stopping`: the stop signals of a run, the processes' agreement on a stop and the stop itself.
- `training.output`: the output folder's protocol (lock, crash completion, a run folder's file names, the checkpoint
  to resume from, saves without non-finite values, log.txt, TensorBoard's writer).
- `training.run`: `Run`, the run around the loop: the distributed context, checkpoints and stops, seeding, the
  loader's position.
- `training.errors`: what ends a run (RunError, FlagError, NonFiniteLossError, Preempted), and the one place that
  turns them into a script's exit (`exits_like_a_script`).
- `training.classification`: what fine-tuning and probing share (config, loaders that label `val/` with the
  training classes, `ClassificationTask`, top-1 / top-5).
- `training.transfer`: what the transfer scripts share: their common flag checks, the encoder's dense options, and
  the model built from the resumed checkpoint or --finetune.
- `training.launch`: torchrun with the requeue status, for SLURM; `training.submitit_launch`: the same on submitit.
- `training.signals`: the stop signals over a process's whole life, from a script's first line: a requeue (75) while
  it starts, the run's stop while it runs, ignored once the run ended.
- `training.sync_batchnorm`: BatchNorm over the batches of all processes, on CUDA (torch's SyncBatchNorm) and on
  the CPU with gloo (one differentiable all-reduce of the statistics).

Nothing here imports a task (`engine_*`, `main_*`): engines and scripts build on it, not the other way round
(docs/ARCHITECTURE.md).
"""
