"""What a run is made of, built from its config: mesh, tokenizer, model, task, sampler."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh
from ml_collections import ConfigDict

from reflax import tasks
from reflax.checkpoint import Checkpointer, CheckpointError, abstract_like
from reflax.config import ConfigError, base_config
from reflax.models import Decoder, ModelConfig, create, lora
from reflax.models.gguf import load_gguf
from reflax.models.hf import load_pretrained
from reflax.sampler import Sampler
from reflax.sharding import make_mesh
from reflax.tokenizer import ChatTokens, char_tokenizer, is_gguf, load_tokenizer
from reflax.trainer import TrainState, init_state, state_shardings

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Runtime:
    """What a run's phases share: config, mesh, tokenizer, the model's graph, task, sampler.

    Weights are not part of it: every phase takes the parameters it works on explicitly, so
    no stale copy outlives the phase that needed it.
    """

    config: ConfigDict
    mesh: Mesh
    tok: ChatTokens
    graphdef: Any
    task: tasks.Task
    sampler: Sampler

    @classmethod
    def create(cls, c: ConfigDict, mesh: Mesh, tok: ChatTokens, graphdef: Any) -> Runtime:
        """Around a built mesh, tokenizer and model graph: the config's task and a sampler."""
        task = tasks.get(c.task.name, **dict(c.task.kwargs))
        r = c.rollout
        sampler = Sampler(
            graphdef, mesh, cache_dtype=r.cache_dtype, kv_cache_bytes=r.kv_cache_bytes
        )
        return cls(c, mesh, tok, graphdef, task, sampler)


def build_tokenizer(c: ConfigDict) -> ChatTokens:
    if c.tokenizer.char_alphabet:
        return ChatTokens(
            char_tokenizer(
                c.tokenizer.char_alphabet,
                digit_group=c.tokenizer.digit_group,
                words=tuple(c.tokenizer.words),
            )
        )
    path = c.tokenizer.path or c.model.path
    return ChatTokens(load_tokenizer(path))


def build_model(c: ConfigDict, mesh: Mesh, vocab_size: int, path: str | None = None) -> Any:
    """The decoder from `path` (or model.path: a checkpoint directory, Hub id or GGUF file),
    else a random init from model.init; its vocabulary must hold the tokenizer's
    `vocab_size` ids."""
    kwargs = dict(
        param_dtype=jnp.dtype(c.model.param_dtype),
        dtype=jnp.dtype(c.model.dtype),
        remat=c.model.remat,
    )
    path = path or c.model.path
    if path:
        load = load_gguf if is_gguf(path) else load_pretrained
        model = load(path, mesh=mesh, **kwargs)
    else:
        init = dict(c.model.init)
        model_type = init.pop("model_type", "qwen2")
        cfg = ModelConfig(
            vocab_size=vocab_size, model_type=model_type, qkv_bias=model_type == "qwen2", **init
        )
        model = create(cfg, mesh=mesh, seed=c.seed, **kwargs)
    if model.config.vocab_size < vocab_size:
        raise ValueError(
            f"tokenizer has {vocab_size} tokens but the model's vocabulary is "
            f"{model.config.vocab_size}"
        )
    return model


def add_lora(c: ConfigDict, model: Decoder, mesh: Mesh | None) -> Decoder:
    """`model` with fresh LoRA adapters (A from the run's seed, B zero: the model is
    unchanged) when the config asks for them (lora.rank > 0), else `model` as it is."""
    spec = lora.LoraSpec.from_config(c.lora)
    return model if spec is None else lora.attach(model, spec, seed=c.seed, mesh=mesh)


def build(c: ConfigDict, *, model_path: str | None = None) -> tuple[Runtime, Any]:
    """(the run's Runtime, the model's initial weights as an nnx.State in their shards).
    The run's own model (no `model_path`) carries the config's LoRA adapters, if any."""
    mesh = make_mesh(dict(c.mesh))
    tok = build_tokenizer(c)
    model = build_model(c, mesh, len(tok.tokenizer), model_path)
    graphdef, params = nnx.split(model if model_path else add_lora(c, model, mesh))
    return Runtime.create(c, mesh, tok, graphdef), params


def load_examples(rt: Runtime, split: str, num: int | None = None, seed: int = 0) -> list[dict]:
    c = rt.config
    source = (c.task.train_source if split == "train" else c.task.test_source) or None
    return rt.task.load(split, source=source, num=num or None, seed=seed)


def checkpoint_dir(workdir: str) -> str:
    return os.path.join(workdir, "checkpoints")


def restore_params(like: Any, workdir: str, step: int | None = None) -> tuple[Any, int]:
    """Parameters of a run's latest (or given) checkpoint, restored into the shards of
    `like` (parameters of the same model, e.g. its initial weights, or their abstract
    shapes). Only the `params` subtree is read: the optimizer state, whatever optimizer
    wrote it, is neither needed nor loaded. A LoRA run's checkpoint holds its adapters:
    they are restored and returned beside the base weights of `like`."""
    ckpt = Checkpointer(checkpoint_dir(workdir))
    step = ckpt.latest_step() if step is None else step
    if step is None:
        raise CheckpointError(f"no checkpoint in {checkpoint_dir(workdir)}")
    adapters, base = lora.split(like)
    lora_run = bool(jax.tree.leaves(adapters))
    target = abstract_like(adapters if lora_run else like)
    state, _ = ckpt.restore({"params": target}, step, partial=True)
    ckpt.close()
    return (lora.join(base, state["params"]) if lora_run else state["params"]), step


def restore_state(
    ckpt: Checkpointer, step: int, params: Any, tx: optax.GradientTransformation, mesh: Mesh
) -> tuple[TrainState, dict[str, Any]]:
    """(the train state of checkpoint `step`, its metadata), read straight into the shards
    `init_state` would give: the target is built from abstract shapes, so no second state
    exists while it loads (`params` may itself be abstract)."""
    abstract = jax.eval_shape(lambda p: init_state(p, tx), params)
    target = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
        abstract,
        state_shardings(abstract, mesh),
    )
    restored, meta = ckpt.restore(state_to_dict(target), step)
    return TrainState(**restored), meta


def state_to_dict(state: Any) -> dict[str, Any]:
    """The checkpointed form of a TrainState (plain dict for orbax)."""
    return {"step": state.step, "params": state.params, "opt_state": state.opt_state}


# Keys a resumed run may change: where and how it runs, logs, evaluates and exports. Any
# other key is part of the recipe the checkpoint was trained with.
RESUMABLE_KEYS = (
    "mesh",
    "cluster",
    "eval",
    "log_every",
    "sample_every",
    "checkpoint_every",
    "keep_checkpoints",
    "export_hf",
    "resume_override",
    "model.remat",
    # how the sampler holds its KV caches: the same tokens for a seed (tests/test_episodes.py,
    # tests/test_rollout_chunks.py), so a resumed run may change them to fit its memory
    "rollout.kv_cache_bytes",
    "rollout.retry_prefill",
)


def check_resume(c: ConfigDict, saved: dict[str, Any], where: str) -> None:
    """A `ConfigError` with a one-line diff when the recipe keys of `c` differ from the
    config saved with checkpoint `where` (unless `c.resume_override`). A key the saved
    config lacks counts only when `c` sets it to other than its default."""
    if c.resume_override or "config" not in saved:
        return
    flat = lambda x: _same_reference(_flat(json.loads(json.dumps(x))))
    now, then, default = (flat(x) for x in (c.to_dict(), saved["config"], base_config().to_dict()))
    # a key the checkpoint predates (e.g. lora.*) at its default trains as before it existed
    new = lambda k: k not in then and k in default and now.get(k) == default[k]
    changed = [
        f"{k}: {then.get(k, '(absent)')!r} -> {now.get(k, '(absent)')!r}"
        for k in sorted(set(now) | set(then))
        if now.get(k) != then.get(k) and not _resumable(k) and not new(k)
    ]
    if changed:
        raise ConfigError(
            f"the config differs from the one {where} was trained with: {'; '.join(changed)}. "
            "Relaunch with the checkpoint's values, a fresh workdir, or "
            "--config.resume_override=True to continue with the new ones"
        )


def _same_reference(flat: dict[str, Any]) -> dict[str, Any]:
    """A KL reference kept in float32 or in the compute dtype scores the same, bit for bit
    (every weight is cast to model.dtype before use): both read as "auto", so a run saved
    with grpo.ref_dtype="float32" (the default before "auto") resumes with "auto"."""
    ref, model = flat.get("grpo.ref_dtype"), flat.get("model.dtype")
    if ref in ("float32", model):
        flat["grpo.ref_dtype"] = "auto"
    return flat


def _resumable(key: str) -> bool:
    return any(key == k or key.startswith(k + ".") for k in RESUMABLE_KEYS)


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, dict):
        return {prefix: tree}
    out: dict[str, Any] = {}
    for k, v in tree.items():
        out.update(_flat(v, f"{prefix}{k}" if not prefix else f"{prefix}.{k}"))
    return out
