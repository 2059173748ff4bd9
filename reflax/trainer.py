"""The GRPO update: train state, one compiled sharded train step, log-prob passes.

`train_step(state, batch, ref_params) -> (state, metrics)` is a pure function
jitted once with in/out shardings; the state is donated. A batch is a pytree of
fixed-shape arrays (`reflax.batch.Batch`); micro-batches are scanned inside the step. The
loss's normalisers (the loss_type's denominator and the anchor's token count) depend
on the masks only, so they are counted over the whole batch before the scan and every
micro-batch's objective is divided by them: accumulation is exact.

Sharding: a batch's rows (unpacked rows; packed, its groups) are split over the batch mesh
axes (data, fsdp) in contiguous blocks, and micro-batches are strided (`split_micro`), so
every micro-batch spans every batch shard: a device runs the prefix of its own groups and
their G suffixes, and the weights, not the activations, are gathered over fsdp (the
compiled packed step's HLO on a (2, 2, 2) mesh, tests/test_packing.py). A micro-batch
with fewer groups than batch shards (say 32 groups in 8 micro-batches on 8-16 shards)
cannot give every shard a prefix: `reflax.sharding.constrain` leaves its rows whole and
shards the hidden dimension over fsdp, and the compiled program (fake fsdp=8 mesh, 4
groups) then gathers whole prefix activations around the matmuls; micro-batches of a
multiple of data x fsdp groups avoid that (the paper configs hold one group per batch
shard), and `train` logs `micro_batch_warning` when a config does not.

A step with no loss tokens and no anchor tokens (no failures this step, or every group
dropped as too long) has nothing to learn from: it leaves the state untouched (AdamW's
moments and count, hence the learning-rate schedule, and `step`) and reports
`applied=False, empty=True`, as a non-finite loss does with `finite=False`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable, Sequence
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from reflax import grpo
from reflax.batch import Batch, batch_shardings, layout
from reflax.config import DEFAULT_LOGITS_BYTES
from reflax.models import lora
from reflax.sharding import (
    constrain,
    local_size,
    named_sharding,
    param_logical_axes,
    param_shardings,
)


class TrainState(flax.struct.PyTreeNode):
    step: jax.Array  # [] int32
    params: Any  # nnx.State of the decoder
    opt_state: Any


@dataclasses.dataclass(frozen=True)
class StepConfig:
    """Static settings of the compiled step (a change recompiles)."""

    temperature: float = 1.0
    epsilon: float = 0.2
    epsilon_high: float | None = None
    beta: float = 0.001
    anchor_beta: float = 0.0  # KL to the reference on anchor_mask tokens (the first attempt)
    loss_type: str = "token_mean"
    max_len: int | None = None
    micro_batches: int = 1
    logits_chunk: int = 0  # LM-head chunk positions; 0: the largest within logits_bytes
    logits_bytes: int = DEFAULT_LOGITS_BYTES  # f32 logits of one chunk, per device
    use_old_logprobs: bool = False  # mu > 1: ratio against the stored old log-probs

    def __post_init__(self):
        # "constant" divides by rows * max_len; left to each layout, max_len would be T - 1
        # unpacked and a bucketed suffix length packed: one batch, two losses
        if self.loss_type == "constant" and self.max_len is None:
            raise ValueError(
                "loss_type='constant' needs max_len (its per-sample length normaliser, the "
                "run's rollout.seq_len), so that packed and unpacked batches agree"
            )

    @classmethod
    def from_config(cls, c: Any) -> StepConfig:
        """From a run config's `grpo` section (and the rollout's temperature and length)."""
        g = c.grpo
        return cls(
            temperature=c.rollout.temperature,
            epsilon=g.epsilon,
            epsilon_high=g.epsilon_high,
            beta=g.beta,
            anchor_beta=g.anchor_beta,
            loss_type=g.loss_type,
            max_len=c.rollout.seq_len,
            micro_batches=g.micro_batches,
            logits_chunk=g.logits_chunk,
            logits_bytes=g.logits_bytes,
            use_old_logprobs=g.mu > 1,
        )


def _sequence_logprobs(graphdef, params, batch: Batch, cfg: StepConfig):
    """log p(tokens[t] | what precedes it) and entropy, aligned to tokens: [B, T] (0 where
    nothing predicts the token: position 0, padding; a packed suffix's first token is
    predicted by the prefix's last slot)."""
    model = nnx.merge(graphdef, params)
    head = model.lm_head_kernel()
    scored = (batch.loss_mask > 0) | (batch.anchor_mask > 0)  # [B, T]

    def score(hidden, targets, mask):  # the hidden state at t predicts targets[t]
        # Vocabulary-parallel LM head: the vocabulary is split over the devices that shard
        # the parameters, and each chunk of positions gathers its hidden states (every row
        # of the data replica) onto them, so no device holds the [D, V] head or its float32
        # gradient whole (Llama-3.2-3B's 128k vocabulary: 1.56 GiB less a v5e-8 chip); the
        # log-softmax adds the slices' sums with small all-reduces. A vocabulary those
        # devices do not divide keeps each device on its own rows and gathers the head.
        V, head_dt = head.shape[1], head.astype(hidden.dtype)
        rows_hint = logits_hint = None
        if local_size(V, "vocab_shards") < V:
            head_dt = constrain(head_dt, (None, "vocab_shards"))
            rows_hint = lambda x: constrain(x, ("data_rows",) + (None,) * (x.ndim - 1))
            logits_hint = lambda z: constrain(z, ("data_rows", None, "vocab_shards"))
            rows, vocab = local_size(hidden.shape[0], "data_rows"), local_size(V, "vocab_shards")
        else:
            rows, vocab = local_size(hidden.shape[0], "batch"), local_size(V, "vocab")
        chunk = cfg.logits_chunk or grpo.logits_chunk(rows, vocab, cfg.logits_bytes)
        with jax.named_scope("lm_head"):  # names its collectives (tests/test_packing.py)
            lp, ent = grpo.token_logprobs_and_entropy(
                hidden,
                head_dt,
                targets,
                temperature=cfg.temperature,
                chunk_size=chunk,
                mask=mask,
                chunk_rows=rows_hint,
                chunk_logits=logits_hint,
            )
        return constrain(lp, ("batch", None)), constrain(ent, ("batch", None))

    if not batch.packed:
        hidden, _ = model.hidden_states(batch.tokens, batch.positions, batch.mask)
        lp, ent = score(hidden[:, :-1], batch.tokens[:, 1:], scored[:, 1:])
        pad = jnp.zeros_like(lp[:, :1])
        return jnp.concatenate([pad, lp], 1), jnp.concatenate([pad, ent], 1)

    B = batch.tokens.shape[0]
    Lp, G = batch.prefix_len, batch.group_size
    h_prefix, h_suffix = model.packed_hidden_states(
        batch.tokens, batch.positions, batch.mask, Lp, G
    )  # [B, Lp, D], [B * G, Ls, D]
    lp_p, ent_p = score(h_prefix[:, :-1], batch.tokens[:, 1:Lp], scored[:, 1:Lp])
    # the prefix's last slot (left padding puts it at Lp - 1) predicts every suffix's first
    # token: G copies of one hidden state, whose gradient sums the G samples'
    last = jnp.repeat(h_prefix[:, -1:], G, axis=0)  # [B * G, 1, D]
    h_pred = jnp.concatenate([last, h_suffix[:, :-1]], 1)  # [B * G, Ls, D]
    rows = batch.sample_rows
    lp_s, ent_s = score(h_pred, rows(batch.tokens), rows(scored))
    pad = jnp.zeros_like(lp_p[:, :1])
    lp = jnp.concatenate([pad, lp_p, lp_s.reshape(B, -1)], 1)
    ent = jnp.concatenate([pad, ent_p, ent_s.reshape(B, -1)], 1)
    return lp, ent


def split_micro(x: jax.Array, m: int) -> jax.Array:
    """[B, ...] -> [m, B / m, ...]: micro-batch i holds rows i, i + m, i + 2m, ...

    Strided, not contiguous: the batch arrives with its rows in contiguous blocks over the
    batch mesh axes, so each block holds rows of every micro-batch, and the [B / m, m]
    reshape leaves the row blocks where they are. The micro axis, which the step scans
    over, is unsharded and every micro-batch spans every batch shard (a contiguous split
    would put micro-batch i on shards i * S / m ... only and scan over a sharded axis).
    """
    if x.shape[0] % m:
        raise ValueError(f"batch size {x.shape[0]} is not divisible by micro_batches={m}")
    micro = x.reshape(x.shape[0] // m, m, *x.shape[1:]).swapaxes(0, 1)
    return constrain(micro, (None, "batch") + (None,) * (x.ndim - 1))


def micro_batch_warning(rows: int, micro_batches: int, mesh: Mesh, packed: bool) -> str | None:
    """A warning when a micro-batch's rows (packed: its groups) do not fill the batch mesh
    axes (data x fsdp) evenly: such a micro-batch leaves its rows whole and shards the
    hidden dimension, so the compiled step gathers whole activations around the matmuls
    (module docstring). None when they fill them."""
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    per_micro = rows // micro_batches
    if per_micro % shards == 0:
        return None
    unit = "packed groups" if packed else "rows"
    return (
        f"a micro-batch holds {per_micro} {unit} against {shards} batch shards (data x fsdp):"
        f" the train step gathers whole activations; choose grpo.micro_batches so each"
        f" micro-batch holds a multiple of {shards} {unit}"
    )


def step_normalisers(batch: Batch, cfg: StepConfig) -> tuple[jax.Array, jax.Array]:
    """(the loss_type's denominator, the anchor's token count) of a whole step: from the
    masks alone (parameter-free), equal for a batch and its packed form."""
    den = grpo.loss_denominator(
        batch.sample_rows(batch.loss_mask), loss_type=cfg.loss_type, max_len=cfg.max_len
    )
    anchor_tokens = sum(
        w * jnp.sum((part > 0).astype(jnp.float32))
        for part, w in batch.anchor_parts(batch.anchor_mask)
    )
    return den, anchor_tokens


def make_grad_fn(graphdef: Any, cfg: StepConfig, ref_graphdef: Any = None) -> Callable:
    """`(params, batch, ref_params) -> (grads, loss, metric sums, (den, anchor_tokens))`:
    the step's objective and its gradient, accumulated exactly over the micro-batches.

    LoRA (`ref_graphdef`, the base model's graph, given): `params` are the adapters and
    `ref_params` the frozen base; the policy is the two together, the reference the base
    alone, and gradients are taken for the adapters only."""

    def loss_fn(params, mb: Batch, ref_params, norm):
        # norm: (den, anchor_tokens) of the whole step; the objective is this micro-batch's
        # share of num / den + anchor_beta * anchor_kl_sum / anchor_tokens
        if ref_graphdef is not None and ref_params is None:
            raise ValueError("a LoRA step needs the frozen base weights as its ref_params")
        policy = params if ref_graphdef is None else lora.join(ref_params, params)
        lp, ent = _sequence_logprobs(graphdef, policy, mb, cfg)
        ref_lp = None
        anchored = cfg.anchor_beta != 0.0 and ref_params is not None
        if anchored or (cfg.beta != 0.0 and ref_params is not None):
            ref_lp, _ = _sequence_logprobs(ref_graphdef or graphdef, ref_params, mb, cfg)
            ref_lp = jax.lax.stop_gradient(ref_lp)
        rows = mb.sample_rows
        loss_mask = rows(mb.loss_mask)
        num, _, sums = grpo.grpo_loss(
            rows(lp),
            rows(mb.old_logprobs) if cfg.use_old_logprobs else None,
            None if ref_lp is None else rows(ref_lp),
            mb.advantages.reshape(-1),
            loss_mask,
            epsilon=cfg.epsilon,
            epsilon_high=cfg.epsilon_high,
            beta=cfg.beta,
            loss_type=cfg.loss_type,
            max_len=cfg.max_len,
        )
        sums = dict(sums)
        objective = grpo.safe_divide(num, norm[0])
        if anchored:
            kl_sum = 0.0
            parts = zip(
                mb.anchor_parts(lp), mb.anchor_parts(ref_lp), mb.anchor_parts(mb.anchor_mask)
            )
            for (lp_part, w), (ref_part, _), (mask_part, _) in parts:
                kl_sum = kl_sum + w * grpo.anchor_kl(lp_part, ref_part, mask_part)[0]
            objective = objective + cfg.anchor_beta * grpo.safe_divide(kl_sum, norm[1])
            sums["anchor_kl_sum"] = jax.lax.stop_gradient(kl_sum)
        sums["entropy_sum"] = grpo.masked_sum(rows(ent), loss_mask > 0)
        sums["logprob_sum"] = grpo.masked_sum(rows(lp), loss_mask > 0)
        return objective, sums

    value_and_grad = jax.value_and_grad(loss_fn, has_aux=True)
    # Gradients laid out as their parameters: the accumulator and the update then keep the
    # state's layout, whatever layout the loss computed them in (a vocabulary-parallel
    # head's gradient would otherwise carry its layout into the update, gathering the
    # tied embedding whole on a mesh with data or tensor parallelism).
    like_params = lambda tree: jax.tree_util.tree_map_with_path(
        lambda path, x: constrain(x, param_logical_axes(path, x.ndim)), tree
    )

    def grad_fn(params, batch: Batch, ref_params: Any = None):
        micro = jax.tree.map(lambda x: split_micro(x, cfg.micro_batches), batch)
        norm = step_normalisers(batch, cfg)

        def accumulate(carry, mb):
            grads, loss, sums = carry
            (o, s), g = value_and_grad(params, mb, ref_params, norm)
            g = like_params(g)
            add = lambda a, b: jax.tree.map(jnp.add, a, b)
            return (add(grads, g), loss + o, add(sums, s)), None

        zeros = like_params(jax.tree.map(jnp.zeros_like, params))
        first = jax.tree.map(lambda x: x[0], micro)
        _, sums_shape = jax.eval_shape(loss_fn, params, first, ref_params, norm)
        sums0 = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), sums_shape)
        init = (zeros, jnp.zeros((), jnp.float32), sums0)
        (grads, loss, sums), _ = jax.lax.scan(accumulate, init, micro)
        return grads, loss, sums, norm

    return grad_fn


def make_train_step(
    graphdef: Any, tx: optax.GradientTransformation, cfg: StepConfig, ref_graphdef: Any = None
) -> Callable:
    """The pure step; jit it with `jit_train_step` (or plain jax.jit on one device).

    LoRA: `ref_graphdef` is the base model's graph, the state holds the adapters and their
    optimizer state, and `ref_params` is the frozen base (`make_grad_fn`)."""
    grad_fn = make_grad_fn(graphdef, cfg, ref_graphdef)

    def train_step(state: TrainState, batch: Batch, ref_params: Any = None):
        anchored = cfg.anchor_beta != 0.0 and ref_params is not None
        grads, loss, sums, (_, anchor_tokens) = grad_fn(state.params, batch, ref_params)
        grad_norm = optax.tree.norm(grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        # A non-finite loss or gradient leaves the state untouched; the loop stops on the flag.
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        # Nothing to learn from: AdamW would still decay its moments, move the parameters
        # along the old momentum and advance the schedule, so the state stays as it is.
        empty = (sums["num_tokens"] == 0) & ((anchor_tokens == 0) | (not anchored))
        applied = finite & ~empty
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(applied, a, b), new, old)
        new_state = TrainState(
            step=state.step + applied.astype(jnp.int32),
            params=keep(params, state.params),
            opt_state=keep(opt_state, state.opt_state),
        )
        metrics = dict(grpo.finalize_metrics(sums))
        metrics.update(
            loss=loss,
            grad_norm=grad_norm,
            finite=finite,
            applied=applied,
            empty=empty,
            entropy=grpo.safe_divide(sums["entropy_sum"], sums["num_tokens"]),
            logprob=grpo.safe_divide(sums["logprob_sum"], sums["num_tokens"]),
            param_norm=optax.tree.norm(new_state.params),
        )
        if "anchor_kl_sum" in sums:
            metrics["anchor_kl"] = grpo.safe_divide(sums["anchor_kl_sum"], anchor_tokens)
        return new_state, metrics

    return train_step


def make_logprob_fn(graphdef: Any, cfg: StepConfig) -> Callable:
    """params, batch -> log-probs [B, T] aligned to tokens (for old/ref log-probs and checks)."""

    def fn(params, batch: Batch):
        return _sequence_logprobs(graphdef, params, batch, cfg)[0]

    return fn


def opt_state_shardings(opt_state: Any, mesh: Mesh) -> Any:
    """Optimizer moments follow their parameter's sharding; scalars are replicated."""

    def one(path, x):
        if getattr(x, "ndim", 0) == 0:
            return NamedSharding(mesh, PartitionSpec())
        try:
            axes = param_logical_axes(path, x.ndim)
        except (KeyError, ValueError):
            return NamedSharding(mesh, PartitionSpec())
        return named_sharding(mesh, axes, x.shape)

    return jax.tree_util.tree_map_with_path(one, opt_state)


def state_shardings(abstract_state: TrainState, mesh: Mesh) -> TrainState:
    return TrainState(
        step=NamedSharding(mesh, PartitionSpec()),
        params=param_shardings(abstract_state.params, mesh),
        opt_state=opt_state_shardings(abstract_state.opt_state, mesh),
    )


def init_state(
    params: Any, tx: optax.GradientTransformation, mesh: Mesh | None = None
) -> TrainState:
    """Train state around already-placed params; optimizer state created in its shards."""

    def init(params):
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))

    if mesh is None:
        return jax.jit(init)(params)
    abstract = jax.eval_shape(init, params)
    return jax.jit(init, out_shardings=state_shardings(abstract, mesh))(params)


def jit_train_step(
    train_step: Callable,
    state: TrainState,
    batch: Batch,
    mesh: Mesh | None,
    with_ref: bool,
    ref: Any = None,
) -> Callable:
    """jax.jit with explicit in/out shardings and the state donated. The reference is laid
    out as the state's parameters, or as `ref` (its parameters or their abstract shapes)
    when given: LoRA's frozen base, which the state's adapters are not shaped like."""
    if mesh is None:
        return jax.jit(train_step, donate_argnums=(0,))
    s = state_shardings(jax.eval_shape(lambda x: x, state), mesh)
    b = batch_shardings(batch, mesh)
    r = None
    if with_ref:
        r = s.params if ref is None else param_shardings(jax.eval_shape(lambda x: x, ref), mesh)
    return jax.jit(
        train_step,
        in_shardings=(s, b, r),
        out_shardings=(s, NamedSharding(mesh, PartitionSpec())),
        donate_argnums=(0,),
    )


def jit_logprob_fn(logprob_fn: Callable, params: Any, batch: Batch, mesh: Mesh | None) -> Callable:
    """jax.jit of a `make_logprob_fn` function with explicit in/out shardings: parameters as
    the train state's, the batch as the train step's, log-probs [B, T] as its old_logprobs."""
    if mesh is None:
        return jax.jit(logprob_fn)
    p = param_shardings(jax.eval_shape(lambda x: x, params), mesh)
    b = batch_shardings(batch, mesh)
    return jax.jit(logprob_fn, in_shardings=(p, b), out_shardings=b.old_logprobs)


class CompiledSteps:
    """The train step (and, for mu > 1, the old-log-prob pass), compiled ahead of time once
    per batch layout: one for unpacked rows, one per (prefix, suffix) size pair when packed.

    `precompile(layouts)` compiles every layout a run can meet before its first step and
    seals the set: a batch of another layout is then an error, never a compile inside a
    timed step. Unsealed, `step(batch)` or `logprobs(batch)` on a new layout compiles it.

    LoRA (`ref_graphdef` given, `make_train_step`): `ref_params` is the frozen base, and the
    old-log-prob pass takes the whole policy, `lora.join(base, state.params)`.
    """

    def __init__(
        self,
        graphdef: Any,
        tx: optax.GradientTransformation,
        cfg: StepConfig,
        state: TrainState,
        ref_params: Any,
        mesh: Mesh | None,
        with_logprobs: bool = False,
        ref_graphdef: Any = None,
    ):
        self._step = make_train_step(graphdef, tx, cfg, ref_graphdef)
        self._logprob = make_logprob_fn(graphdef, cfg) if with_logprobs else None
        self._state = jax.eval_shape(lambda x: x, state)
        self._ref = None if ref_params is None else jax.eval_shape(lambda x: x, ref_params)
        self._policy = self._state.params
        if ref_graphdef is not None:
            self._policy = jax.eval_shape(lora.join, self._ref, self._state.params)
        self._mesh = mesh
        self._programs: dict[Any, tuple[Callable, Callable | None]] = {}
        self._sealed = False

    def precompile(self, layouts: Sequence[Batch]) -> float:
        """Compile every one of `layouts` and accept no other from now on; returns the
        seconds it took."""
        start = time.perf_counter()
        for abstract in layouts:
            self.compile(abstract)
        self._sealed = True
        return time.perf_counter() - start

    def compile(self, abstract: Batch) -> tuple[Callable, Callable | None]:
        key = (abstract.tokens.shape, abstract.prefix_len, abstract.group_size)
        if key not in self._programs:
            if self._sealed:
                raise ValueError(
                    f"batch layout (shape, prefix_len, group_size) {key} is not one of the "
                    f"{len(self._programs)} compiled before the loop"
                )
            mesh, state, ref = self._mesh, self._state, self._ref
            step = jit_train_step(self._step, state, abstract, mesh, ref is not None, ref)
            logprob = None
            with contextlib.ExitStack() as stack:
                if mesh is not None:
                    stack.enter_context(jax.set_mesh(mesh))
                step = step.lower(state, abstract, ref).compile()
                if self._logprob is not None:
                    logprob = jit_logprob_fn(self._logprob, self._policy, abstract, mesh)
                    logprob = logprob.lower(self._policy, abstract).compile()
            self._programs[key] = (step, logprob)
        return self._programs[key]

    @property
    def num_programs(self) -> int:
        return len(self._programs)

    def step(self, batch: Batch) -> Callable:
        return self.compile(layout(batch))[0]

    def logprobs(self, batch: Batch) -> Callable:
        fn = self.compile(layout(batch))[1]
        if fn is None:
            raise ValueError("CompiledSteps built without with_logprobs")
        return fn
