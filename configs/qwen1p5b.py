"""Qwen2-1.5B-Instruct learns to reflect on failed xLAM function calls (the paper's headline
function-calling run).

    python -m reflax.collect_failures --config=configs/qwen1p5b.py --output=$W/failures.jsonl
    python -m reflax.train --config=configs/qwen1p5b.py --workdir=$W \\
        --config.rollout.failures=$W/failures.jsonl
    python -m reflax.evaluate --config=configs/qwen1p5b.py --checkpoint=$W --baseline

Data: Salesforce/xlam-function-calling-60k from the Hub (gated: accept its CC-BY-4.0 terms
and `huggingface-cli login` first); the 12,000 held-out queries (a fixed hash split on the
query text) are the evaluation, the other 48,000 build the failure set. Hardware: a TPU
v5e-8 (16 GiB per chip), FSDP over its 8 chips, 4 micro-batches of 8 packed groups (one
a chip): the rollout peaks at 11.1 GiB per chip and the train step at 6.5, 30% of the HBM
free (`python experiments/aot_memory.py --table --rows=qwen1p5b@v5e-8`).
Should reach, on those 12,000 queries (first / second try, %): vanilla 32.6 / 34.8 ->
trained 48.6 / 52.9.
`:synthetic` trains and evaluates on reflax's xLAM-schema generator instead (no Hub;
the paper has no figure for it), `:local` is a minutes-long CPU run of the same pipeline.
"""

from ml_collections import ConfigDict

from reflax import recipes
from reflax.config import base_config


def get_config(arg: str | None = None) -> ConfigDict:
    c = base_config()
    c.model.path = "Qwen/Qwen2-1.5B-Instruct"
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
