#!/bin/bash
#SBATCH --job-name=containers-array
#SBATCH --array=1-8
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=1
#SBATCH --output=slurm-%A_%a.out
#
# One array task = one clone of the dataset and one `datalad containers-run` of
# the image stored in it.  Submit from the directory that is to hold the clones:
#
#   DATASET=/project/analysis sbatch array-job.sh
#
# All tasks use the udocker directory in DATALAD_UDOCKER_DIR (exported by the
# submitting shell, or the default in your home): the container is created once,
# by the first task, and reused by all others.  For a node-local directory, see
# "Shared or node-local udocker directory" in docs/cluster.rst.
set -eu
: "${DATASET:?set DATASET to the dataset (path or URL) that holds the image}"
task=$SLURM_ARRAY_TASK_ID

datalad clone "$DATASET" "task-$task"
cd "task-$task"
datalad containers-run -n busybox -o result.txt \
    "sh -c 'echo task $task ran in \$(cat /etc/hostname) > result.txt'"
