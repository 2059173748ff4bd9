"""The variants every paper config offers, written once.

A paper config (`configs/qwen1p5b.py` and its siblings) spells out its run: model, task, data,
G, groups per step, steps, learning rate and schedule, micro-batches, mesh, eval size and
the failure set. It ends with `return recipes.variant(c, arg)`, which picks what `arg`
(the text after `:` in `--config=configs/<name>.py:<arg>`) asks for:

  (none)      the paper's run on the paper's data, loaded from the Hugging Face Hub
  synthetic   the same run on the project's generators, for machines without the Hub
              (no published figure applies to it)
  local       the pipeline end to end on a laptop CPU in a few minutes: a tiny random model
              with a character tokenizer, generated data, online first attempts, 3 steps

The config files are loaded by path, so they import only the installed `reflax` package
and work from any working directory.
"""

from __future__ import annotations

from ml_collections import ConfigDict

VARIANTS = ("synthetic", "local")
# Queries generated for training by the synthetic variant: the size of xLAM-60k's train
# split once the paper's 12,000 are held out.
SYNTHETIC_TRAIN = 48_000
# Every printable ASCII character: the local variant's character tokenizer reads any prompt.
PRINTABLE = "".join(chr(i) for i in range(32, 127)) + "\n\t"


def synthetic_variant(c: ConfigDict) -> ConfigDict:
    """The same run on the task's generator instead of the Hub data (same eval size)."""
    c.task.train_source = ""
    c.task.test_source = ""
    c.task.num_train = SYNTHETIC_TRAIN
    return c


def local_variant(c: ConfigDict) -> ConfigDict:
    """The pipeline on a laptop CPU: tiny random model, generated data, a few online steps."""
    synthetic_variant(c)
    c.model.path = ""
    c.model.dtype = c.model.param_dtype = c.rollout.cache_dtype = "float32"
    c.model.remat = False
    c.tokenizer.char_alphabet = PRINTABLE
    c.mesh.update(data=1, fsdp=-1, tensor=1)
    c.task.kwargs.synthetic_size = 64
    c.task.num_train = 64
    c.rollout.mode = "online"  # no failure set to collect first
    c.rollout.queries_per_step = 4
    c.rollout.groups_per_step = 2
    c.rollout.group_size = 4
    c.rollout.max_attempt_tokens = 16
    c.rollout.max_reflection_tokens = 16
    c.rollout.max_retry_tokens = 16
    c.optim.learning_rate = 1e-4
    c.grpo.micro_batches = 1
    c.total_steps = 3
    c.checkpoint_every = 2
    c.eval.num_examples = 8
    c.eval.batch_size = 8
    return c


def variant(c: ConfigDict, arg: str | None) -> ConfigDict:
    """`c` as the variant `arg` names (module docstring); the paper's run for none."""
    if not arg:
        return c
    if arg == "synthetic":
        return synthetic_variant(c)
    if arg == "local":
        return local_variant(c)
    raise ValueError(f"unknown variant {arg!r}; use one of {VARIANTS} or nothing")
