"""Llama-3.2-3B-Instruct, Reflect-Retry-Reward on xLAM function calling.

Hardware: a TPU v5e-8, FSDP over its 8 chips, 4 micro-batches (one packed group a chip
each). Its eight KV heads make the rollout's cache four times Qwen2.5-3B's, so the recipe
samples in calls of at most 2 GiB of KV cache a chip and prefills each retry's whole
context again instead of keeping the reflections' caches (`rollout.kv_cache_bytes`,
`rollout.retry_prefill`: the same tokens for a seed): the rollout then peaks at 9.5 GiB
per chip and the train step at 12.6, 21.5% of the HBM free (`python
experiments/aot_memory.py --table --rows=llama3p2_3b@v5e-8`); with one-pass calls the
retry alone needs more than a chip. On a larger slice both may be turned off
(`--config.rollout.kv_cache_bytes=0 --config.rollout.retry_prefill=False`). With LoRA
(`--config.lora.rank=16 --config.rollout.kv_cache_bytes=1073741824`: rank 16 on every
projection, rollout calls of at most 1 GiB of KV cache a chip) it fits a v5e-8 too:
the rollout peaks at 4.6 GiB per chip and the train step at 4.8, 70% of
the HBM free (`aot_memory.py --table` with
    --rows=llama3p2_3b:lora.rank=16:grpo.micro_batches=4:rollout.kv_cache_bytes=1073741824@v5e-8
).
Llama's gated weights and the gated Salesforce/xlam-function-calling-60k both need
accepted terms and a Hub login. The 12,000 held-out queries are the evaluation set.
Should reach: no published number is recorded in reflax for this model (the paper lists
it among those trained); read the paper's function-calling table for its figures.
Steps as in README.md's "Training a real model", with --config=configs/llama3p2_3b.py;
`:synthetic` needs no Hub data, `:local` no accelerator.
"""

from ml_collections import ConfigDict

from reflax import recipes
from reflax.config import base_config


def get_config(arg: str | None = None) -> ConfigDict:
    c = base_config()
    c.model.path = "meta-llama/Llama-3.2-3B-Instruct"
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
    # what lets the rollout fit a v5e-8 (docstring); the tokens are the same without them
    c.rollout.kv_cache_bytes = 2 * 2**30
    c.rollout.retry_prefill = True
    c.total_steps = 1000
    c.optim.update(learning_rate=5e-7, warmup_ratio=0.03, min_lr_ratio=0.0)  # cosine to 0
    c.grpo.beta = 0.001
    c.grpo.micro_batches = 4  # one packed group per chip of a v5e-8 per micro-batch
    c.mesh.update(data=1, fsdp=-1, tensor=1)  # FSDP over every chip
    return recipes.variant(c, arg)
