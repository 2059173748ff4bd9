"""Llama-3.1-8B-Instruct taught to reflect on its xLAM function-calling failures.

The largest model the paper trains. Launch with this file as --config in the three steps
of README.md ("Training a real model"): collect_failures, train, evaluate --baseline.
Hardware: a TPU v5e-32, FSDP over its 32 chips, one micro-batch of 32 packed groups:
the rollout peaks at 13.0 GiB per chip (18.7% of the HBM free) and the train step at 8.1
(`python experiments/aot_memory.py --table --rows=llama3p1_8b@v5e-32`). A v5e-16 fits
with rollout calls of at most 2 GiB of KV cache a chip and each retry prefilled again
(`--config.rollout.kv_cache_bytes=2147483648 --config.rollout.retry_prefill=True`, the
same tokens): 10.4 GiB and 15.3, 4.7% free (`aot_memory.py --table` with
    --rows=llama3p1_8b:rollout.kv_cache_bytes=2147483648:rollout.retry_prefill=True@v5e-16
); as it is, its rollout needs 20.6. With LoRA (rank
16, 4 micro-batches, rollout calls of at most 1 GiB of KV cache a chip) it fits a v5e-8
only with `--config.rollout.retry_prefill=True`: the rollout then keeps no reflection
cache for the retry and peaks at 8.0 GiB, the train step at 9.6 (40.1% free); with the
caches kept (8 GiB a chip, eight KV heads) the rollout needs 16.0, 0.1% over a chip
(`aot_memory.py --table` with
    --rows=llama3p1_8b:lora.rank=16:grpo.micro_batches=4:rollout.kv_cache_bytes=1073741824:rollout.retry_prefill=True@v5e-8
).
Data: Salesforce/xlam-function-calling-60k (gated), 12,000 queries held out and evaluated.
Should reach: reflax records no published figure for this model (the design notes list
only the Qwen runs); compare with the paper's function-calling table.
Variants: `:synthetic` (reflax's generator, no Hub), `:local` (CPU, tiny random model).
"""

from ml_collections import ConfigDict

from reflax import recipes
from reflax.config import base_config


def get_config(arg: str | None = None) -> ConfigDict:
    c = base_config()
    c.model.path = "meta-llama/Llama-3.1-8B-Instruct"
    c.task.name = "function_calling"
    c.task.train_source = "Salesforce/xlam-function-calling-60k"
    c.task.test_source = "Salesforce/xlam-function-calling-60k"
    c.task.kwargs.test_size = 12_000  # queries held out, as in the paper
    c.eval.num_examples = 12_000  # all of them
    # failure set: 64 first attempts sampled per train query, one failing attempt kept
    c.rollout.mode = "offline"
    c.rollout.attempts_per_query = 64
    c.rollout.group_size = 8  # G reflections per failure
    c.rollout.groups_per_step = 32  # failures per step: 256 rows
    c.rollout.max_attempt_tokens = 256
    c.rollout.max_reflection_tokens = 256
    c.rollout.max_retry_tokens = 256
    c.rollout.seq_len = 2048  # the tool list makes long prompts
    c.total_steps = 1000
    c.optim.update(learning_rate=5e-7, warmup_ratio=0.03, min_lr_ratio=0.0)  # cosine to 0
    c.grpo.beta = 0.001
    c.grpo.micro_batches = 1  # 32 packed groups: one per chip of a v5e-32
    c.mesh.update(data=1, fsdp=-1, tensor=1)  # FSDP over every chip
    return recipes.variant(c, arg)
