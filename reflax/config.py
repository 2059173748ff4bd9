"""The run configuration: defaults, validation, and the objects built from it.

A config file (`configs/*.py`) defines `get_config(arg=None)` that starts from
`base_config()` and changes what its run needs (the paper configs take their
variants from `reflax.recipes`). `validate` checks every value, and that every key
is one `base_config` declares, before any compute and reports all problems in one
`ConfigError`.
"""

from __future__ import annotations

from typing import Literal, get_args

from ml_collections import ConfigDict

# its only reflax import: sharding imports no reflax
from reflax.sharding import LORA_TARGETS, MESH_AXES

# the modules that build objects from a config (episodes.RolloutSettings, trainer.StepConfig)
# take their choices from here
METHODS = ("reflect", "reflect_retry", "fixed_reflection", "first_attempt")
DEFAULT_FIXED_REFLECTION = (
    "My previous answer was wrong. I will read the task again carefully, check every "
    "requirement, and make sure my new answer satisfies all of them."
)
# the LM head's float32 logits one device holds at a time (grpo.logits_bytes)
DEFAULT_LOGITS_BYTES = 256 * 2**20
DTYPES = ("float32", "bfloat16", "float16")
# the policy loss's normaliser (reflax.grpo)
LossType = Literal["token_mean", "seq_mean", "constant"]
LOSS_TYPES: tuple[str, ...] = get_args(LossType)
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

    # across_hosts: the axis split first between hosts ("" = jax's order: data outermost)
    c.mesh = ConfigDict(dict(data=1, fsdp=-1, tensor=1, across_hosts=""))
    # Multi-host (reflax.distributed): how long joining may take, and how long a silent peer
    # is waited for before the others stop with an error.
    c.cluster = ConfigDict(dict(init_timeout_s=300, heartbeat_timeout_s=100))

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
    # decode each retry greedily (method "reflect" only): the reward then depends on the
    # reflection alone, not on the retry's sampling
    c.rollout.greedy_retry = False
    c.rollout.fixed_reflection = DEFAULT_FIXED_REFLECTION
    # KV cache dtype: "auto" = bfloat16 on TPU, the compute dtype elsewhere (reflax.sampler)
    c.rollout.cache_dtype = "auto"
    # KV cache bytes a device may hold per sampler call: more rows are sampled in chunks of
    # whole groups (same tokens as one pass for a seed); 0 = every call in one pass
    c.rollout.kv_cache_bytes = 0
    # sample each retry from its whole context (prompt, attempt, reflection, retry turn),
    # prefilled again, instead of continuing the reflection calls' KV caches: no cache is
    # kept between the two calls (the same tokens for a seed; a second prefill's compute)
    c.rollout.retry_prefill = False

    c.grpo = ConfigDict()
    c.grpo.beta = 0.001
    # KL to the reference on the failed first attempt in each row (tokens no reward trains);
    # 0 is the paper. It keeps a shared-weight first attempt from drifting under reflection RL.
    # It weighs the mean k3 over the step's anchor tokens, whatever grpo.loss_type is.
    c.grpo.anchor_beta = 0.0
    # dtype of the KL reference's weights (a frozen copy of the initial model). "auto": the
    # compute dtype (model.dtype). The forward casts every weight to it before use, so a
    # reference kept in it gives the same log-probs bit for bit as a float32 one, in half
    # the memory under bfloat16 (tests/test_trainer.py)
    c.grpo.ref_dtype = "auto"
    c.grpo.epsilon = 0.2
    c.grpo.epsilon_high = 0.2
    c.grpo.loss_type = "token_mean"
    c.grpo.mu = 1  # optimisation steps per rollout batch
    c.grpo.micro_batches = 1
    # one row per group, [prefix | reflection_1 .. reflection_G]: the shared prefix is run and
    # differentiated once (same loss and gradients as unpacked rows; reflax.batch)
    c.grpo.pack_groups = True
    # sizes per packed region (the shared prefix; each sample's own tokens), the largest of
    # reflax.batch.bucket_lengths: a run compiles pack_sizes^2 train programs before step 1
    c.grpo.pack_sizes = 3
    # LM-head chunk: sequence positions whose [rows, chunk, V] float32 logits exist at once
    # (per device); 0: the largest chunk within grpo.logits_bytes (reflax.grpo.logits_chunk)
    c.grpo.logits_chunk = 0
    c.grpo.logits_bytes = DEFAULT_LOGITS_BYTES

    # LoRA (reflax.models.lora): rank 0 trains every weight (full fine-tuning); rank r > 0
    # trains adapters A [in, r], B [r, out] on `targets` (scaled by alpha / r) and freezes the
    # base, which is then also the KL reference (grpo.ref_dtype unused). Checkpoints hold the
    # adapters and their optimizer state; the base is model.path's (or model.init's) again.
    c.lora = ConfigDict(
        dict(
            rank=0,
            alpha=16.0,
            targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
        )
    )

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
            # rows' text: str.format over the example and the task's `warm_start_fields`
            answer_template="",  # the first attempt, e.g. "<answer>{solution}</answer>"
            # share of the rows that are whole episodes after a wrong attempt (0 = answers only)
            episode_fraction=0.0,
            wrong_template="",  # an episode's failed first attempt (context, no loss)
            reflection_template="",  # its reflection (loss)
            retry_template="",  # its retry (loss)
            # share of the steps on reflection rows: after a wrong attempt (wrong_template),
            # the initial model's own reflection, sampled once at rollout.temperature (loss);
            # keeps a pretrained model's reflection turn in its own words (0 = none)
            reflection_fraction=0.0,
            reflection_rows=64,  # how many problems get one sampled reflection each
            # share of the steps on retry rows: a reflection row's context and sampled
            # reflection (no loss), the retry instruction, the reference answer (loss), so
            # that a retry after a reflection is a new attempt, not a copy (0 = none)
            retry_fraction=0.0,
            # share of the train problem families (task.family_key) kept out of the warm start
            # for online RL, so RL meets problems as new as the held-out ones; 0 = all in both
            holdout_fraction=0.0,
        )
    )

    c.log_every = 1
    c.sample_every = 10  # reflections written as text
    c.checkpoint_every = 50
    c.keep_checkpoints = 3
    # A resumed run stops when its recipe (any key but mesh, cluster, eval, logging and
    # export; reflax.runtime.RESUMABLE_KEYS) differs from the checkpoint's; True goes on.
    c.resume_override = False
    c.export_hf = True  # HF safetensors in <workdir>/hf at the end

    c.eval = ConfigDict()
    c.eval.num_examples = 1000
    # "test" for the final table; "validation" to choose a design without touching the test
    # set (generated tasks with a validation fraction, e.g. countdown's
    # task.kwargs.synthetic_validation_fraction)
    c.eval.split = "test"
    c.eval.batch_size = 64
    c.eval.greedy = True
    c.eval.before = False  # evaluate the initial model before training
    c.eval.after = True
    # what the recipe should reach, printed under the final table (a range, with its source)
    c.eval.expected = ""
    return c


# Sub-configs whose keys are options of something else, checked there: the task's
# constructor (reflax.tasks.get), the model's shape (ModelConfig), the mesh axes (below).
FREE_KEYS = ("task.kwargs", "model.init", "mesh")


def ref_dtype(c: ConfigDict) -> str:
    """The KL reference's weight dtype: `grpo.ref_dtype`, "auto" being `model.dtype`."""
    return c.model.dtype if c.grpo.ref_dtype == "auto" else c.grpo.ref_dtype


def undeclared_keys(c: ConfigDict, base: ConfigDict | None = None, prefix: str = "") -> list[str]:
    """Keys of `c` that `base_config()` does not declare (outside `FREE_KEYS`)."""
    base = base_config() if base is None else base
    found = []
    for key, value in c.items():
        path = prefix + key
        if key not in base:
            found.append(path)
        elif isinstance(value, ConfigDict) and path not in FREE_KEYS:
            found += undeclared_keys(value, base[key], path + ".")
    return found


def validate(c: ConfigDict) -> ConfigDict:
    """Check every value; raise one ConfigError listing all problems. Locks the config."""
    errors = []

    def need(ok: bool, msg: str) -> None:
        if not ok:
            errors.append(msg)

    unknown_keys = undeclared_keys(c)
    need(not unknown_keys, f"keys not declared in base_config: {unknown_keys}")
    need(c.total_steps > 0, "total_steps must be > 0")
    need(c.model.dtype in DTYPES, f"model.dtype must be one of {DTYPES}")
    need(c.model.param_dtype in DTYPES, f"model.param_dtype must be one of {DTYPES}")
    need(c.grpo.ref_dtype in ("auto", *DTYPES), f"grpo.ref_dtype must be 'auto' or one of {DTYPES}")
    need(
        c.rollout.cache_dtype in ("auto", *DTYPES),
        f"rollout.cache_dtype must be 'auto' or one of {DTYPES}",
    )
    need(c.rollout.kv_cache_bytes >= 0, "rollout.kv_cache_bytes must be >= 0 (0: one pass)")
    if not c.model.path:
        need(
            bool(c.tokenizer.path or c.tokenizer.char_alphabet),
            "a model without model.path needs tokenizer.path or tokenizer.char_alphabet",
        )
    sizes = {k: v for k, v in c.mesh.items() if k != "across_hosts"}
    unknown = set(sizes) - set(MESH_AXES)
    need(not unknown, f"unknown mesh axes {sorted(unknown)}; use {MESH_AXES}")
    need(sum(v == -1 for v in sizes.values()) <= 1, "at most one mesh axis may be -1")
    need(
        c.mesh.get("across_hosts", "") in ("",) + MESH_AXES,
        f"mesh.across_hosts must be '' or one of {MESH_AXES}",
    )
    r = c.rollout
    need(r.mode in MODES, f"rollout.mode must be one of {MODES}")
    need(r.method in METHODS, f"rollout.method must be one of {METHODS}")
    need(
        not r.greedy_retry or r.method == "reflect",
        "rollout.greedy_retry needs rollout.method='reflect' (other methods train the retry)",
    )
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
    need(g.anchor_beta >= 0, "grpo.anchor_beta must be >= 0")
    need(g.epsilon > 0 and g.epsilon_high > 0, "grpo.epsilon and epsilon_high must be > 0")
    need(g.mu >= 1, "grpo.mu must be >= 1")
    need(g.micro_batches >= 1, "grpo.micro_batches must be >= 1")
    need(g.pack_sizes >= 1, "grpo.pack_sizes must be >= 1")
    need(g.logits_chunk >= 0, "grpo.logits_chunk must be >= 0 (0: from grpo.logits_bytes)")
    need(g.logits_bytes > 0, "grpo.logits_bytes must be > 0")
    rows = r.groups_per_step * r.group_size
    need(
        rows % max(g.micro_batches, 1) == 0,
        f"groups_per_step * group_size = {rows} must be divisible by grpo.micro_batches",
    )
    need(
        not g.pack_groups or r.groups_per_step % max(g.micro_batches, 1) == 0,
        f"grpo.pack_groups splits whole groups: groups_per_step = {r.groups_per_step} must be "
        "divisible by grpo.micro_batches (or set grpo.pack_groups=False)",
    )
    lo = c.lora
    need(
        isinstance(lo.rank, int) and not isinstance(lo.rank, bool) and lo.rank >= 0,
        f"lora.rank must be an integer >= 0 (0: full fine-tuning), got {lo.rank!r}",
    )
    need(
        isinstance(lo.alpha, (int, float)) and lo.alpha > 0,
        f"lora.alpha must be > 0, got {lo.alpha!r}",
    )
    targets = (lo.targets,) if isinstance(lo.targets, str) else tuple(lo.targets)
    need(
        bool(targets) and set(targets) <= set(LORA_TARGETS) and len(set(targets)) == len(targets),
        f"lora.targets must be distinct names among {LORA_TARGETS}, got {targets}",
    )
    need(c.optim.learning_rate > 0, "optim.learning_rate must be > 0")
    need(0 <= c.optim.warmup_ratio < 1, "optim.warmup_ratio must be in [0, 1)")
    need(c.warm_start.steps >= 0, "warm_start.steps must be >= 0")
    need(0 <= c.warm_start.holdout_fraction < 1, "warm_start.holdout_fraction must be in [0, 1)")
    w = c.warm_start
    need(
        not w.steps or bool(w.answer_template),
        "warm_start.steps > 0 needs warm_start.answer_template",
    )
    need(0 <= w.episode_fraction <= 1, "warm_start.episode_fraction must be in [0, 1]")
    need(
        not (w.steps and w.episode_fraction)
        or all((w.wrong_template, w.reflection_template, w.retry_template)),
        "warm_start.episode_fraction > 0 needs warm_start.wrong_template, "
        "reflection_template and retry_template",
    )
    need(
        0 <= w.reflection_fraction <= 1 - w.episode_fraction,
        "warm_start.reflection_fraction must be in [0, 1 - episode_fraction]",
    )
    need(
        0 <= w.retry_fraction <= 1 - w.episode_fraction - w.reflection_fraction,
        "warm_start.retry_fraction must be in [0, 1 - episode_fraction - reflection_fraction]",
    )
    for key in ("reflection_fraction", "retry_fraction"):
        need(
            not (w.steps and w[key]) or (bool(w.wrong_template) and w.reflection_rows >= 1),
            f"warm_start.{key} > 0 needs warm_start.wrong_template and reflection_rows >= 1",
        )
    need(
        c.cluster.init_timeout_s >= 1 and c.cluster.heartbeat_timeout_s >= 1,
        "cluster.init_timeout_s and cluster.heartbeat_timeout_s must be >= 1",
    )
    need(c.checkpoint_every >= 1 and c.log_every >= 1, "checkpoint_every, log_every must be >= 1")
    need(c.eval.num_examples >= 0 and c.eval.batch_size >= 1, "bad eval sizes")
    need(c.eval.split in ("test", "validation"), "eval.split must be 'test' or 'validation'")
    if errors:
        raise ConfigError("invalid config:\n  " + "\n  ".join(errors))
    c.lock()
    return c
