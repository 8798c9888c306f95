#!/bin/bash
# Multi-node CrIBo pretraining under SLURM: one task per GPU, requeued automatically on preemption.
#
#   sbatch run_slurm.sh --config checkpoints/vits16-in_args.json --data_path /datasets/imagenet
#   sbatch --nodes=2 run_slurm.sh --config checkpoints/vitb16-in_args.json --data_path /datasets/imagenet
#
# Every task reads its rank, world size, local rank and the master address from the SLURM environment
# (cribo_utils/distributed.py), so no MASTER_ADDR is set here. SLURM sends SIGUSR1 to the tasks 120 s
# before the time limit (--signal below); training then writes a checkpoint at the next iteration and
# exits with code 75, this script requeues the job, and the requeued job resumes from --output_dir.
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
export MASTER_PORT=${MASTER_PORT:-$((20000 + ${SLURM_JOB_ID:-0} % 20000))}
export OMP_NUM_THREADS=${SLURM_CPUS_PER_TASK:-8}

# Forward the pre-timeout signal from the batch shell to the training tasks.
trap 'echo "caught pre-timeout signal, forwarding to tasks"; kill -USR1 "$SRUN_PID" 2>/dev/null' USR1 TERM

srun --kill-on-bad-exit=1 python main_cribo.py --output_dir "$OUTPUT_DIR" "$@" &
SRUN_PID=$!
wait "$SRUN_PID"
STATUS=$?
# `wait` returns early (status > 128) when the trap fires: wait again for the tasks to finish saving.
while kill -0 "$SRUN_PID" 2>/dev/null; do
    wait "$SRUN_PID"
    STATUS=$?
done

if [ "$STATUS" -eq "$EXIT_PREEMPTED" ]; then
    echo "training checkpointed on preemption; requeueing job ${SLURM_JOB_ID}"
    scontrol requeue "${SLURM_JOB_ID}"
fi
exit "$STATUS"
