"""The run configuration: defaults, validation, and the objects built from it.

A config file (`configs/*.py`) defines `get_config(arg=None)` that starts from
`base_config()` and changes what its run needs. `validate` checks every value
before any compute and reports all problems in one `ConfigError`.
"""

from __future__ import annotations

import ml_collections
from ml_collections import ConfigDict

from reflax.episodes import DEFAULT_FIXED_REFLECTION, METHODS, RolloutSettings
from reflax.sharding import MESH_AXES
from reflax.trainer import StepConfig

DTYPES = ("float32", "bfloat16", "float16")
LOSS_TYPES = ("token_mean", "seq_mean", "constant")
MODES = ("online", "offline")


class ConfigError(ValueError):
    """A config key does not exist or a value is invalid."""


def base_config() -> ConfigDict:
    c = ConfigDict()
    c.seed = 0
    c.total_steps = 1000

    # Model: a Hugging Face checkpoint (local directory or Hub id), or a random init
    # from `model.init` when `path` is empty (tiny models on a CPU).
    c.model = ConfigDict()
    c.model.path = ""
    c.model.dtype = "bfloat16"  # compute dtype
    c.model.param_dtype = "float32"  # master weights
    c.model.remat = True
    c.model.init = ConfigDict(
        dict(
            model_type="qwen2",
            hidden_size=64,
            intermediate_size=128,
            num_layers=2,
            num_heads=4,
            num_kv_heads=2,
            head_dim=16,
            tie_word_embeddings=True,
            rope_theta=10000.0,
            max_position_embeddings=4096,
        )
    )
    # Tokenizer: `path` (default: model.path) or a character tokenizer over `char_alphabet`
    # (`digit_group` > 1: runs of up to that many digits are one token, as in Llama 3;
    # each of `words` is one token, as BPE makes common words).
    c.tokenizer = ConfigDict(dict(path="", char_alphabet="", digit_group=1, words=()))

    c.task = ConfigDict()
    c.task.name = "countdown"
    c.task.kwargs = ConfigDict()  # passed to reflax.tasks.get(name, **kwargs)
    c.task.train_source = ""  # "" = the task's own generator; else a file or Hub dataset id
    c.task.test_source = ""
    c.task.num_train = 0  # 0 = all

    c.mesh = ConfigDict(dict(data=1, fsdp=-1, tensor=1))

    c.rollout = ConfigDict()
    c.rollout.mode = "offline"  # offline: failure set from collect_failures; online: fresh
    c.rollout.failures = ""  # path written by `python -m reflax.collect_failures`
    c.rollout.attempts_per_query = 8  # collect_failures: first attempts sampled per query
    c.rollout.queries_per_step = 64  # online: first attempts sampled per step
    # online: decode first attempts greedily, so the reflections train on the failures that
    # greedy decoding (the evaluation's) makes rather than on unlucky samples (method
    # first_attempt, plain GRPO, still samples its G attempts; offline failure sets come
    # from collect_failures, which samples)
    c.rollout.greedy_attempts = False
    c.rollout.groups_per_step = 32  # failed attempts per step (U); batch = U * G rows
    c.rollout.group_size = 8  # G reflections per failure (paper: 8-14)
    c.rollout.temperature = 0.9
    c.rollout.top_k = 0
    c.rollout.top_p = 1.0
    c.rollout.max_attempt_tokens = 256
    c.rollout.max_reflection_tokens = 256
    c.rollout.max_retry_tokens = 256
    c.rollout.seq_len = 1024  # train rows: query + attempt + instruction + reflection
    c.rollout.method = "reflect"
    c.rollout.fixed_reflection = DEFAULT_FIXED_REFLECTION
    c.rollout.cache_dtype = "bfloat16"

    c.grpo = ConfigDict()
    c.grpo.beta = 0.001
    # dtype of the KL reference weights (kept when beta or anchor_beta > 0): "bfloat16"
    # halves them and matches the bf16 compute the policy's log-probs use
    c.grpo.ref_dtype = "float32"
    # KL to the reference on the failed first attempt in each row (tokens no reward trains);
    # 0 is the paper. It keeps a shared-weight first attempt from drifting under reflection RL.
    c.grpo.anchor_beta = 0.0
    c.grpo.epsilon = 0.2
    c.grpo.epsilon_high = 0.2
    c.grpo.loss_type = "token_mean"
    c.grpo.mu = 1  # optimisation steps per rollout batch
    c.grpo.micro_batches = 1
    c.grpo.logits_chunk = 128  # sequence positions per LM-head chunk: [B, 128, V] f32 logits

    c.optim = ConfigDict(
        dict(
            learning_rate=5e-7,
            warmup_ratio=0.03,
            min_lr_ratio=0.0,
            weight_decay=0.0,
            b1=0.9,
            b2=0.999,
            eps=1e-8,
            max_grad_norm=1.0,
        )
    )

    # Supervised warm start on the task's reference answers (tiny models with no
    # pretraining); 0 steps = off.
    c.warm_start = ConfigDict(
        dict(
            steps=0,
            batch_size=32,
            learning_rate=1e-3,
            warmup_ratio=0.05,
            seq_len=128,
            answer_template="",  # str.format over the example, e.g. "<answer>{solution}</answer>"
            # share of the train problem families (task.family_key) kept out of the warm start
            # for online RL, so RL meets problems as new as the held-out ones; 0 = all in both
            holdout_fraction=0.0,
        )
    )

    c.log_every = 1
    c.sample_every = 10  # reflections written as text
    c.checkpoint_every = 50
    c.keep_checkpoints = 3
    c.export_hf = True  # HF safetensors in <workdir>/hf at the end

    c.eval = ConfigDict()
    c.eval.num_examples = 1000
    c.eval.batch_size = 64
    c.eval.greedy = True
    c.eval.before = False  # evaluate the initial model before training
    c.eval.after = True
    return c


def validate(c: ConfigDict) -> ConfigDict:
    """Check every value; raise one ConfigError listing all problems. Locks the config."""
    errors = []

    def need(ok: bool, msg: str) -> None:
        if not ok:
            errors.append(msg)

    need(c.total_steps > 0, "total_steps must be > 0")
    need(c.model.dtype in DTYPES, f"model.dtype must be one of {DTYPES}")
    need(c.model.param_dtype in DTYPES, f"model.param_dtype must be one of {DTYPES}")
    need(c.rollout.cache_dtype in DTYPES, f"rollout.cache_dtype must be one of {DTYPES}")
    if not c.model.path:
        need(
            bool(c.tokenizer.path or c.tokenizer.char_alphabet),
            "a model without model.path needs tokenizer.path or tokenizer.char_alphabet",
        )
    unknown = set(c.mesh.keys()) - set(MESH_AXES)
    need(not unknown, f"unknown mesh axes {sorted(unknown)}; use {MESH_AXES}")
    need(sum(v == -1 for v in c.mesh.values()) <= 1, "at most one mesh axis may be -1")
    r = c.rollout
    need(r.mode in MODES, f"rollout.mode must be one of {MODES}")
    need(r.method in METHODS, f"rollout.method must be one of {METHODS}")
    need(r.group_size >= 2, "rollout.group_size must be >= 2")
    need(r.groups_per_step >= 1, "rollout.groups_per_step must be >= 1")
    need(r.queries_per_step >= 1, "rollout.queries_per_step must be >= 1")
    need(r.temperature > 0, "rollout.temperature must be > 0 (GRPO needs samples)")
    need(0 < r.top_p <= 1, "rollout.top_p must be in (0, 1]")
    need(r.top_k >= 0, "rollout.top_k must be >= 0")
    for k in ("max_attempt_tokens", "max_reflection_tokens", "max_retry_tokens", "seq_len"):
        need(r[k] > 0, f"rollout.{k} must be > 0")
    need(
        r.mode == "online" or r.method == "first_attempt" or bool(r.failures),
        "rollout.mode='offline' needs rollout.failures (run reflax.collect_failures) ",
    )
    g = c.grpo
    need(g.loss_type in LOSS_TYPES, f"grpo.loss_type must be one of {LOSS_TYPES}")
    need(g.beta >= 0, "grpo.beta must be >= 0")
    need(g.ref_dtype in DTYPES, f"grpo.ref_dtype must be one of {DTYPES}")
    need(g.anchor_beta >= 0, "grpo.anchor_beta must be >= 0")
    need(g.epsilon > 0 and g.epsilon_high > 0, "grpo.epsilon and epsilon_high must be > 0")
    need(g.mu >= 1, "grpo.mu must be >= 1")
    need(g.micro_batches >= 1, "grpo.micro_batches must be >= 1")
    rows = r.groups_per_step * r.group_size
    need(
        rows % max(g.micro_batches, 1) == 0,
        f"groups_per_step * group_size = {rows} must be divisible by grpo.micro_batches",
    )
    need(c.optim.learning_rate > 0, "optim.learning_rate must be > 0")
    need(0 <= c.optim.warmup_ratio < 1, "optim.warmup_ratio must be in [0, 1)")
    need(c.warm_start.steps >= 0, "warm_start.steps must be >= 0")
    need(0 <= c.warm_start.holdout_fraction < 1, "warm_start.holdout_fraction must be in [0, 1)")
    need(
        not c.warm_start.steps or bool(c.warm_start.answer_template),
        "warm_start.steps > 0 needs warm_start.answer_template",
    )
    need(c.checkpoint_every >= 1 and c.log_every >= 1, "checkpoint_every, log_every must be >= 1")
    need(c.eval.num_examples >= 0 and c.eval.batch_size >= 1, "bad eval sizes")
    if errors:
        raise ConfigError("invalid config:\n  " + "\n  ".join(errors))
    c.lock()
    return c


def rollout_settings(c: ConfigDict) -> RolloutSettings:
    r = c.rollout
    return RolloutSettings(
        group_size=r.group_size,
        temperature=r.temperature,
        top_k=r.top_k,
        top_p=r.top_p,
        max_attempt_tokens=r.max_attempt_tokens,
        max_reflection_tokens=r.max_reflection_tokens,
        max_retry_tokens=r.max_retry_tokens,
        method=r.method,
        fixed_reflection=r.fixed_reflection,
    )


def step_config(c: ConfigDict) -> StepConfig:
    g = c.grpo
    return StepConfig(
        temperature=c.rollout.temperature,
        epsilon=g.epsilon,
        epsilon_high=g.epsilon_high,
        beta=g.beta,
        anchor_beta=g.anchor_beta,
        loss_type=g.loss_type,
        max_len=c.rollout.seq_len,
        micro_batches=g.micro_batches,
        logits_chunk=g.logits_chunk,
        use_old_logprobs=g.mu > 1,
    )


def to_dict(c: ConfigDict) -> dict:
    return c.to_dict() if isinstance(c, ml_collections.ConfigDict) else dict(c)


PRINTABLE = "".join(chr(i) for i in range(32, 127)) + "\n\t"


def paper_config(model_path: str, task: str, arg: str | None = None) -> ConfigDict:
    """The paper's recipe for one model (arXiv 2505.24726, section 4 and appendix).

    GRPO on reflection tokens only; lr 5e-7 with 3% warmup and cosine decay;
    effective batch 256 (32 failures x G=8 reflections); KL beta 0.001;
    temperature 0.9; 1,000 steps (the paper saw a plateau near 1,000 of at most
    ~1,750); offline failure set. `arg`:
      None / "tpu"  the real run (bf16 compute, f32 master weights, remat)
      "local"       the same pipeline on a laptop CPU: a tiny random model with a
                    character tokenizer, online attempts, a few steps
    """
    if task not in ("countdown", "function_calling"):
        raise ValueError(f"unknown task {task!r}")
    c = base_config()
    c.model.path = model_path
    c.task.name = task
    c.rollout.mode = "offline"
    c.rollout.failures = ""  # set with --config.rollout.failures=... after collect_failures
    c.rollout.attempts_per_query = 8
    c.rollout.max_attempt_tokens = 256 if task == "function_calling" else 512
    c.rollout.max_reflection_tokens = 256
    c.rollout.max_retry_tokens = 256 if task == "function_calling" else 512
    c.rollout.seq_len = 2048 if task == "function_calling" else 1024
    c.total_steps = 1000
    c.eval.num_examples = 1000
    # 256 rows of 1-2k tokens: 8 micro-batches fit a v5e-8 with fsdp=8 (experiments/aot_memory.py)
    c.grpo.micro_batches = 8
    if arg in (None, "", "tpu"):
        return c
    if arg != "local":
        raise ValueError(f"unknown variant {arg!r}; use 'local' or nothing")
    c.model.path = ""
    c.model.dtype = c.model.param_dtype = c.rollout.cache_dtype = "float32"
    c.model.remat = False
    c.tokenizer.char_alphabet = PRINTABLE
    c.mesh.fsdp = -1
    c.task.kwargs.synthetic_size = 64
    c.task.num_train = 64
    c.rollout.mode = "online"
    c.rollout.queries_per_step = 4
    c.rollout.groups_per_step = 2
    c.rollout.group_size = 4
    c.rollout.max_attempt_tokens = 16
    c.rollout.max_reflection_tokens = 16
    c.rollout.max_retry_tokens = 16
    c.rollout.seq_len = 2048 if task == "function_calling" else 512
    c.optim.learning_rate = 1e-4
    c.grpo.micro_batches = 1
    c.total_steps = 3
    c.checkpoint_every = 2
    c.eval.num_examples = 8
    c.eval.batch_size = 8
    return c
