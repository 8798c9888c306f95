#!/bin/bash
# Multi-node CrIBo pretraining under SLURM: one task per GPU, requeued automatically on preemption.
#
#   sbatch run_slurm.sh --config checkpoints/vits16-in_args.json --data_path /datasets/imagenet
#   sbatch --nodes=2 run_slurm.sh --config checkpoints/vitb16-in_args.json --data_path /datasets/imagenet
#   OUTPUT_DIR=runs/vits16-in sbatch run_slurm.sh ...     # a fixed output folder, kept across requeues
#
# Every task reads its rank, world size, local rank and the master address from the SLURM environment
# (cribo_utils/runtime/distributed.py), so no MASTER_ADDR is set here. SLURM sends SIGUSR1 to the tasks 120 s
# before the time limit (--signal below): training writes a checkpoint at the next iteration and exits
# with code 75, this script requeues the job, and the requeued job resumes from $OUTPUT_DIR (the default
# folder name uses the job id, which a requeued job keeps).
# To checkpoint and requeue now: `scancel --batch --signal=USR1 <jobid>` (the trap below forwards it).
# `scancel <jobid>` (SIGTERM to the script and the tasks) also makes training checkpoint and exit with 75,
# but the job is then cancelled, not requeued.
#SBATCH --job-name=cribo
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --mem=0
#SBATCH --time=24:00:00
#SBATCH --signal=USR1@120
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out

set -u
EXIT_PREEMPTED=75
OUTPUT_DIR=${OUTPUT_DIR:-runs/${SLURM_JOB_NAME:-cribo}-${SLURM_JOB_ID:-local}}
export MASTER_PORT=${MASTER_PORT:-$((20000 + ${SLURM_JOB_ID:-0} % 10000))}
export OMP_NUM_THREADS=${SLURM_CPUS_PER_TASK:-8}

# A signal to this script interrupts `wait` (status > 128) and runs the trap; the loop below then waits
# again for the real exit status of srun.
INTERRUPTED=0
CANCELLED=0
trap 'INTERRUPTED=1; echo "caught SIGUSR1, forwarding to the tasks"; kill -USR1 "$SRUN_PID" 2>/dev/null' USR1
trap 'INTERRUPTED=1; CANCELLED=1; echo "caught SIGTERM, forwarding to the tasks"; kill -TERM "$SRUN_PID" 2>/dev/null' TERM

# --kill-on-bad-exit: one task failing stops the others at once. They catch SLURM's SIGTERM like a
# preemption signal, so when every task exits with 75 after the checkpoint the step still reports 75.
srun --kill-on-bad-exit=1 python main_cribo.py --output_dir "$OUTPUT_DIR" "$@" &
SRUN_PID=$!
STATUS=1
while :; do
    INTERRUPTED=0
    wait "$SRUN_PID"
    CODE=$?
    [ "$CODE" -eq 127 ] && break  # already reaped by an earlier `wait`: STATUS holds its exit status
    STATUS=$CODE
    [ "$INTERRUPTED" -eq 1 ] || break
done

if [ "$STATUS" -eq "$EXIT_PREEMPTED" ] && [ "$CANCELLED" -eq 0 ]; then
    echo "training checkpointed on preemption; requeueing job ${SLURM_JOB_ID:?not running under sbatch}"
    scontrol requeue "${SLURM_JOB_ID}"
fi
exit "$STATUS"
