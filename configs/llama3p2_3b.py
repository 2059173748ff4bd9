"""Llama-3.2-3B-Instruct, function calling: Reflect, Retry, Reward with the paper's recipe.

Hardware: TPU v5e-8 (fsdp=8) with micro-batching, or v5p-8.
Should reach: a gain on both tries (the paper's function-calling table).

    W=$WORKDIR
    # 1. failure set: failing first attempts of the initial model
    python -m reflax.collect_failures --config=configs/llama3p2_3b.py \\
        --output=$W/failures.jsonl
    # 2. GRPO on the reflections
    python -m reflax.train --config=configs/llama3p2_3b.py --workdir=$W \\
        --config.rollout.failures=$W/failures.jsonl
    # 3. the paper's table, vanilla against trained
    python -m reflax.evaluate --config=configs/llama3p2_3b.py --checkpoint=$W --baseline

Data: the synthetic generator of the xLAM schema by default. The paper's data is
Salesforce/xlam-function-calling-60k (gated: accept its terms on the Hub), set as
--config.task.train_source and --config.task.test_source (12,000 held out).
`:local` runs the same pipeline on a laptop CPU with a tiny random model (a few
minutes).
"""

from reflax.config import paper_config


def get_config(arg: str | None = None):
    return paper_config("meta-llama/Llama-3.2-3B-Instruct", "function_calling", arg)
