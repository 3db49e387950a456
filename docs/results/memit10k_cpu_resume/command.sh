#!/usr/bin/env bash
# The 10,000-edit MEMIT job of docs/readme/reproduce.md ("10,000 edits on CPU: the resume path"), from the repository
# root. Run it, kill it (kill -9), run it again with resume=true: the z already on disk are not recomputed.
#   CF_REDUCED=/path/to/counterfact_reduced_train.json bash docs/results/memit10k_cpu_resume/command.sh [resume=true]
cd "$(dirname "$0")/../../.."
export WANDB_MODE=${WANDB_MODE:-offline} TOKENIZERS_PARALLELISM=false
exec .venv/bin/python edit.py method=memit data=counterfact_reduced data.path="${CF_REDUCED:?set CF_REDUCED}" \
    data.num_edits=10000 eval.pre=false logger=csv output_dir=outputs/memit10k_cpu \
    method.z_cache_dir=outputs/memit10k_cpu_z "$@"
