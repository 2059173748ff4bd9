"""What a run is made of, built from its config: mesh, tokenizer, model, task, sampler."""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh
from ml_collections import ConfigDict

from reflax import tasks
from reflax.models import ModelConfig, create
from reflax.models.gguf import load_gguf
from reflax.models.hf import load_pretrained
from reflax.sampler import Sampler
from reflax.sharding import make_mesh
from reflax.tokenizer import ChatTokens, char_tokenizer, is_gguf, load_tokenizer


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


def build(c: ConfigDict, *, model_path: str | None = None) -> tuple[Runtime, Any]:
    """(the run's Runtime, the model's initial weights as an nnx.State in their shards)."""
    mesh = make_mesh(dict(c.mesh))
    tok = build_tokenizer(c)
    graphdef, params = nnx.split(build_model(c, mesh, len(tok.tokenizer), model_path))
    return Runtime.create(c, mesh, tok, graphdef), params


def load_examples(rt: Runtime, split: str, num: int | None = None, seed: int = 0) -> list[dict]:
    c = rt.config
    source = (c.task.train_source if split == "train" else c.task.test_source) or None
    return rt.task.load(split, source=source, num=num or None, seed=seed)


def checkpoint_dir(workdir: str) -> str:
    return os.path.join(workdir, "checkpoints")


def restore_params(
    rt: Runtime, like: Any, workdir: str, step: int | None = None
) -> tuple[Any, int]:
    """Parameters of a run's latest (or given) checkpoint, restored into the shards of
    `like` (parameters of the same model, e.g. its initial weights)."""
    from reflax.checkpoint import Checkpointer, CheckpointError
    from reflax.optim import make_optimizer
    from reflax.trainer import init_state, state_shardings

    ckpt = Checkpointer(checkpoint_dir(workdir))
    step = ckpt.latest_step() if step is None else step
    if step is None:
        raise CheckpointError(f"no checkpoint in {checkpoint_dir(workdir)}")
    tx, _ = make_optimizer(total_steps=rt.config.total_steps * rt.config.grpo.mu, **rt.config.optim)
    abstract = jax.eval_shape(lambda p: init_state(p, tx), like)
    shardings = state_shardings(abstract, rt.mesh)
    target = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
    )
    state, _ = ckpt.restore(state_to_dict(target), step)
    ckpt.close()
    return state["params"], step


def state_to_dict(state: Any) -> dict[str, Any]:
    """The checkpointed form of a TrainState (plain dict for orbax)."""
    return {"step": state.step, "params": state.params, "opt_state": state.opt_state}
