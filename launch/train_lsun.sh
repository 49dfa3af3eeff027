#!/usr/bin/env bash
# Train the paper's LSUN Church 256² model (configs/lsun_church.yaml): 1 node x 8 GPUs, DDP.
#
#   sbatch -p PARTITION -A ACCOUNT launch/train_lsun.sh               # from the checkout
#   DDPM_DATA=s3://bucket/lsun_church/ DDPM_OUT_DIR=/scratch/runs/church sbatch launch/train_lsun.sh
#   DDPM_CONFIG=configs/lsun_bedroom.yaml sbatch --nodes=2 launch/train_lsun.sh train.total_steps=2400000
#   python launch/sbatch.py -p PARTITION launch/train_lsun.sh   # the settings resolved now, not at the start
#
# Every #SBATCH line below is a default: options on the sbatch command line win over
# SBATCH_* environment variables (SBATCH_PARTITION, SBATCH_ACCOUNT, SBATCH_TIMELIMIT, ...),
# which win over these lines. Keep --ntasks-per-node equal to --gpus-per-node (one rank per GPU).
# DDPM_* variables and trailing key=value arguments are documented in launch/_train_job.sh.
#
# CPU-only cluster (tests): sbatch --gpus-per-node=0 --ntasks-per-node=2 --cpus-per-task=1 \
#     --export=ALL,DDPM_CONFIG=configs/demo_digits.yaml,DDPM_OVERRIDES="device=cpu engine=ddp" launch/train_lsun.sh
#
#SBATCH --job-name=ddpm-lsun
#SBATCH --nodes=1
#SBATCH --gpus-per-node=8
#SBATCH --ntasks-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --time=24:00:00
#SBATCH --requeue
#SBATCH --signal=USR2@300
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out
# --time: a run stops at the limit and requeues itself, so a short limit only costs restarts.
# --signal: USR2 to every rank 300 s before the limit (Slurm may send it up to 60 s earlier):
#   enough to finish the step and write a ~2 GB checkpoint; no B: prefix, the ranks need it.
# --requeue + --open-mode=append: one job id and one log over all restarts.
DEFAULT_CONFIG=configs/lsun_church.yaml
source "${DDPM_REPO:-${SLURM_SUBMIT_DIR:-$PWD}}/launch/_train_job.sh"
