"""SLURM launch through submitit for any training script with `get_args_parser()` and `main(args)`.

    python -m training.submitit_launch --ngpus 8 --job_dir /shared/jobs/seg main_segment.py --finetune ... \
        --data_path /path/to/ADEChallengeData2016 --output_dir /shared/out/seg

takes the launcher's flags, then the script, then the script's flags (submitit_pretrain.py and submitit_finetune.py
are this for their script).

The job runs one task per GPU and turns submitit's job environment into torchrun's variables (RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR, MASTER_PORT), which training.distributed.init_distributed reads. When SLURM preempts the
job or its time runs out, submitit calls `Trainer.checkpoint()`, which resubmits the same arguments with `--resume`
set to the run's real `<output_dir>/checkpoint-last.pth`, so the requeued job continues from the last finished
epoch.
"""
import argparse
import copy
import importlib
import os
import signal
import sys
import zlib
from pathlib import Path

import submitit

from training.errors import is_script_error
from training.output import last_checkpoint_path

REQUEUE_EXIT_CODE = 75  # training.run.Preempted's status: stopped on a signal after saving, to be continued

REPO_ROOT = Path(__file__).resolve().parents[1]


def launcher_parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description, epilog="All other flags are passed to the training script.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                allow_abbrev=False)  # a training flag must never be read as a launcher one
    p.add_argument("--nodes", default=1, type=int, help="number of nodes")
    p.add_argument("--ngpus", default=8, type=int, help="GPUs (and tasks) per node")
    p.add_argument("--timeout", default=4320, type=int, help="job duration in minutes (requeued when it runs out)")
    p.add_argument("--partition", default=None, type=str, help="SLURM partition")
    p.add_argument("--job_dir", default="", type=str,
                   help="submitit's logs and pickles; %%j is the job id (empty: <output_dir>/submitit)")
    p.add_argument("--use_volta32", action="store_true", help="ask for 32 GB V100s (constraint volta32gb)")
    p.add_argument("--comment", default="", type=str, help="SLURM comment")
    p.add_argument("--cpus_per_task", default=10, type=int, help="CPU cores per task (data-loading workers)")
    p.add_argument("--mem_gb_per_gpu", default=40, type=int, help="host memory per GPU")
    p.add_argument("--max_requeues", default=30, type=int, help="give up after this many timeouts")
    p.add_argument("--cluster", default=None, choices=["slurm", "local", "debug"],
                   help="submitit executor (none: slurm when available, else local)")
    return p


def distributed_env(job_env) -> dict:
    """torchrun's variables from a submitit JobEnvironment (job_id, global_rank, local_rank, num_tasks, hostnames).

    The port is derived from the job id, so that two jobs sharing a node do not collide and a requeued job (same
    id) uses the same one.
    """
    port = 20000 + zlib.crc32(str(job_env.job_id).encode()) % 20000
    return {"RANK": str(job_env.global_rank), "LOCAL_RANK": str(job_env.local_rank),
            "WORLD_SIZE": str(job_env.num_tasks), "MASTER_ADDR": job_env.hostnames[0], "MASTER_PORT": str(port)}


class Trainer:
    """The callable that submitit pickles: runs `<module>.main(args)` in each task of the job."""

    def __init__(self, module_name: str, args: argparse.Namespace):
        self.module_name = module_name
        self.args = args

    def __call__(self):
        job_env = submitit.JobEnvironment()
        # A job-dependent output folder (%j) stays the same on requeue: SLURM keeps the job id.
        self.args.output_dir = self.args.output_dir.replace("%j", str(job_env.job_id))
        os.environ.update(distributed_env(job_env))
        print(f"{job_env}: running {self.module_name}.main, output_dir {self.args.output_dir}", flush=True)
        module = importlib.import_module(self.module_name)
        args = copy.deepcopy(self.args)  # main may change its args; checkpoint() resubmits these
        # submitit's own signal (SLURM sends it before the time limit) also ends the run after its current step
        preempt = signal.Signals["SIG" + submitit.JobEnvironment.USR_SIG]
        if submitit.JobEnvironment.USR_SIG not in args.stop_signals.split(","):
            args.stop_signals = f"{args.stop_signals},{submitit.JobEnvironment.USR_SIG}"
        try:
            return module.main(args)
        except SystemExit as stop:
            if stop.code != REQUEUE_EXIT_CODE:
                raise
            # The run saved its last step and stopped on a signal: submitit's handler, back in place now, resubmits
            # the job (checkpoint() below) and requeues it, as it would have on the signal itself.
            print(f"{self.module_name} stopped on a signal after saving its last step: requeuing", flush=True)
            signal.raise_signal(preempt)
            return None

    def checkpoint(self) -> submitit.helpers.DelayedSubmission:
        """Called by submitit on preemption or timeout (rank 0 only): resubmit, resuming from the last checkpoint."""
        args = copy.deepcopy(self.args)
        last = last_checkpoint_path(args.output_dir)
        if os.path.isfile(last):
            args.resume = last
        print(f"requeuing {self.module_name}: resume from {args.resume or 'the start (no checkpoint yet)'}", flush=True)
        return submitit.helpers.DelayedSubmission(type(self)(self.module_name, args))


def parse_args(module, description: str, argv=None):
    """Splits the command line into launcher options and the training script's own arguments."""
    opts, rest = launcher_parser(description).parse_known_args(argv)
    train_parser = module.get_args_parser()
    train_parser.set_defaults(output_dir=None)  # to tell whether --output_dir was given
    args = train_parser.parse_args(rest)
    if opts.nodes < 1 or opts.ngpus < 1:
        raise SystemExit(f"error: --nodes and --ngpus must be >= 1, got {opts.nodes} and {opts.ngpus}")
    if args.output_dir is None and not opts.job_dir:
        raise SystemExit("error: give --output_dir (checkpoints, on a shared file system) or --job_dir")
    if args.output_dir is None:  # as in MAE: the job folder is the output folder
        args.output_dir = opts.job_dir
    if not opts.job_dir:
        opts.job_dir = os.path.join(args.output_dir, "submitit")
    try:  # bad flags fail now, not after hours in the queue; derived ones are explicit
        args = module.validate_args(args)
    except Exception as err:  # the command line's error, as argparse's own: the launcher exits here
        if not is_script_error(err):
            raise
        raise SystemExit(f"error: {err}") from None
    return opts, args


def executor_parameters(opts, args) -> dict:
    on_cpu = getattr(args, "device", "auto") == "cpu"
    params = dict(nodes=opts.nodes, tasks_per_node=opts.ngpus, gpus_per_node=0 if on_cpu else opts.ngpus,
                  cpus_per_task=opts.cpus_per_task, mem_gb=opts.mem_gb_per_gpu * opts.ngpus,
                  timeout_min=opts.timeout, name=os.path.basename(os.path.normpath(args.output_dir)) or "dmjd",
                  slurm_signal_delay_s=120)
    if opts.partition:
        params["slurm_partition"] = opts.partition
    if opts.use_volta32:
        params["slurm_constraint"] = "volta32gb"
    if opts.comment:
        params["slurm_comment"] = opts.comment
    return params


def launch(module_name: str, description: str, argv=None):
    """Submits `<module_name>.main` as a requeueable job; returns the submitit job."""
    module = importlib.import_module(module_name)
    opts, args = parse_args(module, description, argv)
    executor = submitit.AutoExecutor(folder=opts.job_dir, cluster=opts.cluster,
                                     slurm_max_num_timeout=opts.max_requeues)
    executor.update_parameters(**executor_parameters(opts, args))
    # The job unpickles Trainer and imports the training script: make the repository importable wherever it runs
    # (sbatch and the local executor both pass the environment on).
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    job = executor.submit(Trainer(module_name, args))
    print(f"submitted job {job.job_id}: logs in {opts.job_dir}, checkpoints in {args.output_dir}")
    return job


def main(argv=None):
    """`[launcher flags] SCRIPT.py [its flags]`: the script of this checkout (main_segment.py, ...) as a job."""
    argv = sys.argv[1:] if argv is None else list(argv)
    at = next((i for i, arg in enumerate(argv) if arg.endswith(".py")), None)
    if at is None and {"-h", "--help"} & set(argv):  # the launcher's own flags; a script's --help follows its name
        launcher_parser("Submitit for a training script of this checkout: [launcher flags] SCRIPT.py "
                        "[its flags]").parse_args(argv)
    if at is None or not os.path.isfile(REPO_ROOT / argv[at]) or os.path.dirname(argv[at]):
        raise SystemExit("error: give a training script of the repository's root after the launcher's flags, e.g. "
                         "`python -m training.submitit_launch --ngpus 8 main_segment.py --data_path ...`")
    script = argv[at]
    return launch(script[:-len(".py")], f"Submitit for {script}", argv[:at] + argv[at + 1:])


if __name__ == "__main__":
    # through the module's own name: the job unpickles training.submitit_launch.Trainer, not __main__'s
    importlib.import_module("training.submitit_launch").main()
