"""Qwen2.5-3B-Instruct on Countdown, between the paper's 1.5B and 7B Countdown runs.

Data: Jiayi-Pan/Countdown-Tasks-3to4, 15,000 problems held out (fixed hash of target and
numbers) as the evaluation. Hardware: a TPU
v5e-8, FSDP over its 8 chips, 4 micro-batches, LM-head chunks of 64 MiB: the rollout
peaks at 11.2 GiB per chip and the train step at 10.9, 29.9% of the HBM free (`python
experiments/aot_memory.py --table --rows=qwen2p5_3b@v5e-8`).
Should reach: reflax's notes carry no published figure for this model; the paper's
Countdown table has it. Steps: README.md, "Training a real model", with
--config=configs/qwen2p5_3b.py (`--num_queries` on collect_failures bounds the failure set
to what 1,000 steps of 32 failures use).
`:synthetic` for machines without the Hub, `:local` for a CPU smoke run.
"""

from ml_collections import ConfigDict

from reflax import recipes
from reflax.config import base_config


def get_config(arg: str | None = None) -> ConfigDict:
    c = base_config()
    c.model.path = "Qwen/Qwen2.5-3B-Instruct"
    c.task.name = "countdown"
    c.task.train_source = "Jiayi-Pan/Countdown-Tasks-3to4"  # TinyZero's set
    c.task.test_source = "Jiayi-Pan/Countdown-Tasks-3to4"
    c.task.kwargs.test_size = 15_000  # problems held out, as in the paper
    c.eval.num_examples = 15_000
    # failure set: 64 first attempts sampled per train query, one failing attempt kept
    c.rollout.mode = "offline"
    c.rollout.attempts_per_query = 64
    c.rollout.group_size = 8  # G reflections per failure
    c.rollout.groups_per_step = 32  # failures per step: 256 rows
    c.rollout.max_attempt_tokens = 512  # room for working before the <answer>
    c.rollout.max_reflection_tokens = 256
    c.rollout.max_retry_tokens = 512
    c.rollout.seq_len = 1024
    c.total_steps = 1000
    c.optim.update(learning_rate=5e-7, warmup_ratio=0.03, min_lr_ratio=0.0)  # cosine to 0
    c.grpo.beta = 0.001
    c.grpo.micro_batches = 4  # one packed group per chip of a v5e-8 per micro-batch
    c.grpo.logits_bytes = 64 * 2**20  # LM-head chunks of 64 MiB (the measured setting)
    c.mesh.update(data=1, fsdp=-1, tensor=1)  # FSDP over every chip
    return recipes.variant(c, arg)
