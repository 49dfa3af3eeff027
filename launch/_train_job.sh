#!/usr/bin/env bash
# The body shared by launch/train_*.sh, sourced inside an sbatch job after the caller set
# DEFAULT_CONFIG. One srun step runs one training rank per task; ranks read SLURM_PROCID /
# SLURM_NTASKS / SLURM_JOB_NODELIST (ddpm_dist/distributed.py), so the same script runs NCCL
# on GPU nodes and gloo on CPU-only ones (DDPM_OVERRIDES="device=cpu engine=ddp").
#
# Environment (all optional):
#   DDPM_REPO       checkout to run in            (default: the directory sbatch was called from)
#   DDPM_CONFIG     YAML config                   (default: $DEFAULT_CONFIG)
#   DDPM_OUT_DIR    run folder: checkpoints, metrics.jsonl, TensorBoard events (default: runs/<config name>)
#   DDPM_DATA       data.source: a shard folder or s3://bucket/prefix/  (default: the config's)
#   DDPM_OVERRIDES  more key=value settings, space-separated; arguments after the script
#                   name on the sbatch line are appended to them. All of these are resolved
#                   once, at the job's first start, into OUT_DIR/slurm-job-<id>-config.yaml,
#                   which every requeue of the job trains with.
#   DDPM_CONFIG_SNAPSHOT  a resolved config to train with unchanged, instead of all of the above
#                   (launch/sbatch.py sets it: the settings resolved when the job was submitted)
#   DDPM_PYTHON     interpreter                   (default: python on PATH, e.g. the active venv)
#
#   DDPM_MAX_FAULT_REQUEUES  requeues after storage outages (status 4) or a hung or dead rank
#                            (status 6)                                    (default: 3)
#
# Exit status of train.py: 0 finished, 2 config/data/checkpoint error, 4 data storage
# unavailable after the retries, 3 stopped on a signal
# (USR2 from --signal or scancel, or SIGTERM) with a complete checkpoint: then this job
# requeues itself and the next run resumes from that checkpoint. 4 (storage outage) and 6 (a
# rank died or hung: a collective timed out, or no step finished within train.hang_timeout):
# the job requeues and resumes from the last checkpoint, at most DDPM_MAX_FAULT_REQUEUES times
# over its restarts. 5: a checkpoint could not be written (disk full, not writable; the older
# checkpoints are kept): not requeued, since a requeued run would fail the same way.
set -uo pipefail

cd "${DDPM_REPO:-${SLURM_SUBMIT_DIR:-$PWD}}" || exit 2
# checked here, before srun, so a typo fails in a second with one line in the job log
if [ ! -f ddpm_dist/train.py ]; then
  echo "error: $PWD is not the ddpm-dist checkout (run sbatch from the checkout or set DDPM_REPO)" >&2
  exit 2
fi
if [ -n "${DDPM_CONFIG_SNAPSHOT:-}" ] && [ -z "${DDPM_RESOLVE_ONLY:-}" ]; then
  # resolved when the job was submitted (launch/sbatch.py): trained with as it is
  snapshot=$DDPM_CONFIG_SNAPSHOT
  if [ ! -f "$snapshot" ] || [ "$#" -gt 0 ]; then
    echo "error: DDPM_CONFIG_SNAPSHOT '$snapshot' is not a file from $PWD, or key=value arguments came with it" \
         "(they are resolved into it at submission: launch/sbatch.py)" >&2
    exit 2
  fi
  described="$snapshot (resolved at submission)"
else
  config=${DDPM_CONFIG:-$DEFAULT_CONFIG}
  if [ ! -f "$config" ]; then
    echo "error: config '$config' not found from $PWD (run sbatch from the checkout or set DDPM_REPO)" >&2
    exit 2
  fi
  out_dir=${DDPM_OUT_DIR:-runs/$(basename "$config" .yaml)}
  overrides=("out_dir=$out_dir")
  [ -n "${DDPM_DATA:-}" ] && overrides+=("data.source=$DDPM_DATA")
  read -r -a extra <<< "${DDPM_OVERRIDES:-}"
  overrides+=("${extra[@]}" "$@")

  # The settings are resolved once, when the job first starts, into a file of the job's own;
  # every run of the job (requeues included) trains with that file, so an edit of the YAML file
  # does not reach a job that is already training (launch/sbatch.py resolves them earlier, at
  # submission, and runs this script outside a job with DDPM_RESOLVE_ONLY=<a name of its own>
  # to do so: the file's path is printed and nothing else is done).
  snapshot="$out_dir/slurm-job-${SLURM_JOB_ID:-0}-config.yaml"
  [ -n "${DDPM_RESOLVE_ONLY:-}" ] && snapshot="$out_dir/slurm-submit-$DDPM_RESOLVE_ONLY-config.yaml"
  if [ ! -f "$snapshot" ]; then
    "${DDPM_PYTHON:-python}" -m ddpm_dist.launch.config_snapshot \
      --config "$config" --out "$snapshot" "${overrides[@]}" || exit 2
  fi
  if [ -n "${DDPM_RESOLVE_ONLY:-}" ]; then
    case $snapshot in /*) echo "$snapshot" ;; *) echo "$PWD/$snapshot" ;; esac
    exit 0
  fi
  described="$config ${overrides[*]} (resolved in $snapshot)"
fi

# one intra-op thread pool per rank, sized to its CPUs, or ranks sharing a node oversubscribe
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}
echo "[$(date -Is)] job ${SLURM_JOB_ID:-?} run $(( ${SLURM_RESTART_COUNT:-0} + 1 )): ${SLURM_NTASKS:-1} tasks on" \
     "${SLURM_JOB_NODELIST:-?}: $described"

# Slurm 22.05-23.02 srun does not inherit --cpus-per-task from sbatch: pass it, or each rank
# (and its data workers) is confined to one CPU where cores are bound. --wait: 60 s after the
# first rank exits srun ends the step and returns, instead of waiting for the exit of the tasks
# of a lost node, which may never come (its exit message is lost with its network).
srun --wait=60 ${SLURM_CPUS_PER_TASK:+--cpus-per-task="$SLURM_CPUS_PER_TASK"} \
  "${DDPM_PYTHON:-python}" -m ddpm_dist.train --config "$snapshot"
rc=$?
if { [ "$rc" = 4 ] || [ "$rc" = 6 ]; } && [ "${SLURM_RESTART_COUNT:-0}" -lt "${DDPM_MAX_FAULT_REQUEUES:-3}" ]; then
  echo "[$(date -Is)] status $rc (storage outage or a dead or hung rank); requeueing job $SLURM_JOB_ID to resume"
  rc=3
fi
if [ "$rc" = 3 ]; then
  # train.py stopped at a step boundary and wrote a checkpoint; a requeued job keeps its id,
  # out_dir and this log (--open-mode=append), and resumes from that checkpoint.
  echo "[$(date -Is)] stopped with a checkpoint; requeueing job $SLURM_JOB_ID"
  scontrol requeue "$SLURM_JOB_ID" && exit 0
  echo "error: scontrol requeue $SLURM_JOB_ID failed; resubmit to resume" >&2
fi
if [ "$rc" = 5 ]; then
  echo "[$(date -Is)] could not save a checkpoint; not requeueing: free space in the run folder and resubmit" >&2
fi
exit "$rc"
