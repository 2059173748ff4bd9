"""Qwen2.5-7B-Instruct, Countdown: Reflect, Retry, Reward with the paper's recipe.

Hardware: TPU v5p-8 or v4-8, fsdp over all chips.
Should reach: vanilla 31.7 first try -> trained 41.6 / above 50.

    W=$WORKDIR
    # 1. failure set: failing first attempts of the initial model
    python -m reflax.collect_failures --config=configs/qwen2p5_7b.py \\
        --output=$W/failures.jsonl
    # 2. GRPO on the reflections
    python -m reflax.train --config=configs/qwen2p5_7b.py --workdir=$W \\
        --config.rollout.failures=$W/failures.jsonl
    # 3. the paper's table, vanilla against trained
    python -m reflax.evaluate --config=configs/qwen2p5_7b.py --checkpoint=$W --baseline

Data: the task's generator by default. The paper's data is TinyZero's Countdown-
Tasks-3to4: --config.task.train_source=Jiayi-Pan/Countdown-Tasks-3to4
--config.task.test_source=Jiayi-Pan/Countdown-Tasks-3to4 (15,000 held out).
`:local` runs the same pipeline on a laptop CPU with a tiny random model (a few
minutes).
"""

from reflax.config import paper_config


def get_config(arg: str | None = None):
    return paper_config("Qwen/Qwen2.5-7B-Instruct", "countdown", arg)
