"""Qwen2.5-1.5B-Instruct, Countdown: Reflect, Retry, Reward with the paper's recipe.

Hardware: TPU v5e-8 (fsdp=8).
Should reach: vanilla 6.0 / 10.2 -> trained 34.9 / 45.0 (first / second try, %).

    W=$WORKDIR
    # 1. failure set: failing first attempts of the initial model
    python -m reflax.collect_failures --config=configs/qwen2p5_1p5b.py \\
        --output=$W/failures.jsonl
    # 2. GRPO on the reflections
    python -m reflax.train --config=configs/qwen2p5_1p5b.py --workdir=$W \\
        --config.rollout.failures=$W/failures.jsonl
    # 3. the paper's table, vanilla against trained
    python -m reflax.evaluate --config=configs/qwen2p5_1p5b.py --checkpoint=$W --baseline

Data: the task's generator by default. The paper's data is TinyZero's Countdown-
Tasks-3to4: --config.task.train_source=Jiayi-Pan/Countdown-Tasks-3to4
--config.task.test_source=Jiayi-Pan/Countdown-Tasks-3to4 (15,000 held out).
`:local` runs the same pipeline on a laptop CPU with a tiny random model (a few
minutes).
"""

from reflax.config import paper_config


def get_config(arg: str | None = None):
    return paper_config("Qwen/Qwen2.5-1.5B-Instruct", "countdown", arg)
