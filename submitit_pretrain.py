"""DMJD pre-training on SLURM through submitit, requeued from the last checkpoint on preemption or timeout.

    python submitit_pretrain.py --nodes 2 --ngpus 8 --partition learn --job_dir /shared/jobs/dmjd_convit_b \
        --data_path /path/to/imagenet

Launcher flags: --nodes --ngpus --timeout --partition --job_dir --use_volta32 --comment (see --help); every other
flag goes to main_pretrain.py. See PRETRAIN.md.
"""
from training.submitit_launch import launch

if __name__ == "__main__":
    launch("main_pretrain", "Submitit for DMJD pre-training")
