#!/usr/bin/env bash
# Train the paper's CIFAR-10 32² model (configs/cifar10.yaml): 1 node x 8 GPUs.
#
#   sbatch -p PARTITION -A ACCOUNT launch/train_cifar10.sh            # from the checkout
#   DDPM_DATA=s3://bucket/cifar10/ sbatch --gpus-per-node=4 --ntasks-per-node=4 launch/train_cifar10.sh
#
# Same options and variables as launch/train_lsun.sh (see there and launch/_train_job.sh).
#
#SBATCH --job-name=ddpm-cifar10
#SBATCH --nodes=1
#SBATCH --gpus-per-node=8
#SBATCH --ntasks-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --time=24:00:00
#SBATCH --requeue
#SBATCH --signal=USR2@180
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out
# --signal: a 36M-parameter checkpoint takes seconds; 180 s covers Slurm's 60 s of slack.
DEFAULT_CONFIG=configs/cifar10.yaml
source "${DDPM_REPO:-${SLURM_SUBMIT_DIR:-$PWD}}/launch/_train_job.sh"
