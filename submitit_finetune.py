"""Fine-tuning on SLURM through submitit, requeued from the last checkpoint on preemption or timeout.

    python submitit_finetune.py --nodes 4 --ngpus 8 --job_dir /shared/jobs/ft_convit_b \
        --finetune /shared/out/dmjd_convit_b/checkpoint-399.pth --data_path /path/to/imagenet

Launcher flags as submitit_pretrain.py; every other flag goes to main_finetune.py.
"""
from training.submitit_launch import launch

if __name__ == "__main__":
    launch("main_finetune", "Submitit for fine-tuning")
