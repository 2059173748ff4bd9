"""Llama-3.2-3B-Instruct, Reflect-Retry-Reward on xLAM function calling.

Hardware: a TPU v5e-8, FSDP over its 8 chips, with three memory settings that leave the
recipe's tokens as they are (`--config.grpo.logits_bytes=67108864
--config.rollout.kv_cache_bytes=2147483648 --config.rollout.retry_prefill=True`): the
rollout then peaks at 10.2 GiB per chip and the train step (4 micro-batches) at 14.8, 7.4%
of the HBM free (`aot_memory.py --table` with
    --rows=llama3p2_3b:grpo.logits_bytes=67108864:rollout.kv_cache_bytes=2147483648:rollout.retry_prefill=True@v5e-8
). As it is, a v5e-8 does not fit it: its eight KV heads make the rollout's cache four
times Qwen2.5-3B's, and the one-pass retry needs 24.8 GiB of temporaries per chip
(`--rows=llama3p2_3b@v5e-8`); a v5e-16's rollout peaks at 16.2 (`@v5e-16`). With LoRA
(`--config.lora.rank=16 --config.rollout.kv_cache_bytes=1073741824`: rank 16 on every
projection, rollout calls of at most 1 GiB of KV cache a chip) the smallest slice
measured to fit is a v5e-8: the rollout peaks at 11.2 GiB per chip (7 of them the
reflections' caches kept for the retry) and the train step at 5.1, 30% of the HBM free
(`aot_memory.py --table` with
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
    c.total_steps = 1000
    c.optim.update(learning_rate=5e-7, warmup_ratio=0.03, min_lr_ratio=0.0)  # cosine to 0
    c.grpo.beta = 0.001
    c.grpo.micro_batches = 4  # one packed group per chip of a v5e-8 per micro-batch
    c.mesh.update(data=1, fsdp=-1, tensor=1)  # FSDP over every chip
    return recipes.variant(c, arg)
