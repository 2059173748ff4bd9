"""Qwen2-7B-Instruct, function calling: Reflect, Retry, Reward with the paper's recipe.

Hardware: TPU v5p-8 or v4-8 (32 GiB HBM per chip or more), fsdp over all chips.
Should reach: vanilla 66.4 first try -> trained 72.2 / 77.3, above vanilla Qwen2-72B's
76.6 second try.

    W=$WORKDIR
    # 1. failure set: failing first attempts of the initial model
    python -m reflax.collect_failures --config=configs/qwen7b.py \\
        --output=$W/failures.jsonl
    # 2. GRPO on the reflections
    python -m reflax.train --config=configs/qwen7b.py --workdir=$W \\
        --config.rollout.failures=$W/failures.jsonl
    # 3. the paper's table, vanilla against trained
    python -m reflax.evaluate --config=configs/qwen7b.py --checkpoint=$W --baseline

Data: the synthetic generator of the xLAM schema by default. The paper's data is
Salesforce/xlam-function-calling-60k (gated: accept its terms on the Hub), set as
--config.task.train_source and --config.task.test_source (12,000 held out).
`:local` runs the same pipeline on a laptop CPU with a tiny random model (a few
minutes).
"""

from reflax.config import paper_config


def get_config(arg: str | None = None):
    return paper_config("Qwen/Qwen2-7B-Instruct", "function_calling", arg)
