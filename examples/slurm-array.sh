#!/bin/bash
# A batch manifest rendered by 4 GPU tasks as a Slurm job array.
#
# Each task renders the items whose id hashes to its index, taken from SLURM_ARRAY_TASK_ID (relative to
# SLURM_ARRAY_TASK_MIN and _STEP) with SLURM_ARRAY_TASK_COUNT shards. Outputs go to a shared file system;
# each task writes its own results-<I>-of-4.jsonl, and submitting the script again skips every finished
# clip and retries the rest. Change --array to 0-(N-1) for N shards.
#
#   mkdir -p logs && sbatch --export=ALL,MANIFEST=$PWD/manifest.jsonl,OUT=$PWD/out examples/slurm-array.sh
#SBATCH --job-name=kinetoscope-batch
#SBATCH --array=0-3
#SBATCH --gres=gpu:1
#SBATCH --cpus-per-task=8
#SBATCH --mem=64G
#SBATCH --time=12:00:00
#SBATCH --output=logs/%x-%A_%a.out

set -euo pipefail

MANIFEST=${MANIFEST:?set MANIFEST to the manifest (JSON Lines) on the shared file system}
OUT=${OUT:?set OUT to the output folder on the shared file system}
MODEL=${MODEL:-Wan-AI/Wan2.1-T2V-1.3B-Diffusers}

# Exits non-zero when any item of this task failed, so `sacct` shows which tasks to look at.
exec kinetoscope batch "$MANIFEST" --out "$OUT" --model "$MODEL"
