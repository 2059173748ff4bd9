"""Forgetting suite: general benchmarks before and after training, through EleutherAI's
lm-evaluation-harness (``lm_eval``, ``pip install 'reflax[eval]'``).

    python -m reflax.evaluate --config=configs/qwen2p5_1p5b.py --checkpoint=WORKDIR \\
        --suite=forgetting [--forgetting_limit=200]

runs the paper's Table 3 benchmarks (MMLU-Pro, GSM8K, HellaSwag, MATH as lm_eval's
``minerva_math``) on the config's initial model and on the checkpoint, and prints them side
by side against the paper's claim of under one point of degradation on each.

`ReflaxLM` is the harness's model class (registered as ``"reflax"``) on reflax's own
forward and sampler, on the run's mesh:

* ``loglikelihood`` (multiple choice, e.g. HellaSwag): context + continuation, tokenized
  as the harness does (``TemplateLM``), left-truncated to ``max_length``; batches of
  ``batch_size`` rows sorted by length, left-padded to bucketed lengths (one program per
  bucket), one jitted forward each. Only the last ``C`` positions (C: the longest
  continuation of the batch, bucketed) go through the LM head, in chunks of
  ``logits_chunk`` positions, so no ``[B, T, V]`` logits exist. Returns the summed
  log-probs and whether every continuation token is the argmax.
* ``loglikelihood_rolling`` (perplexity tasks): the harness's rolling windows, scored as
  above.
* ``generate_until`` (GSM8K, MMLU-Pro, MATH): `reflax.sampler.Sampler.sample`, greedy
  unless the task samples; it stops on the tokenizer's stop ids or ``max_gen_toks``, and the
  text is cut at the first of the task's ``until`` strings afterwards (the sampler has no
  stop strings, so a model that never emits a stop id decodes ``max_gen_toks`` tokens).

Tasks are named as lm_eval names them; ``include_path`` adds a directory of task YAMLs
(e.g. a local dataset with ``dataset_path: json``), which is how the tests run offline.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh
from lm_eval import simple_evaluate
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import (
    handle_stop_sequences,
    normalize_gen_kwargs,
    postprocess_generated_text,
)
from lm_eval.tasks import TaskManager

from reflax import distributed, storage
from reflax.grpo import token_logprobs_and_entropy
from reflax.models.decoder import positions_from_mask
from reflax.results import save_json
from reflax.runtime import Runtime, build, restore_params
from reflax.sampler import BucketSpec, Sampler, bucket_size, left_pad
from reflax.sampling import SamplingSpec
from reflax.sharding import batch_sharding, fetch, put
from reflax.tokenizer import ChatTokens


@dataclasses.dataclass(frozen=True)
class Benchmark:
    task: str  # lm_eval task or group name
    metric: str  # key in lm_eval's results: "<metric>,<filter>"
    label: str


# The paper's Table 3, in lm_eval's names and its headline metrics.
SUITE = (
    Benchmark("mmlu_pro", "exact_match,custom-extract", "MMLU-Pro"),
    Benchmark("gsm8k", "exact_match,strict-match", "GSM8K"),
    Benchmark("hellaswag", "acc_norm,none", "HellaSwag"),
    Benchmark("minerva_math", "exact_match,none", "MATH"),
)
PAPER_CLAIM = "paper: < 1 point of degradation on each benchmark"
MAX_DEGRADATION = 0.01  # the paper's claim, as a fraction
# metrics tried, in order, for a task outside SUITE
_PREFERRED_METRICS = ("acc_norm", "acc", "exact_match", "math_verify", "f1", "bleu")


# Logits divided by this are the zero-temperature limit: log-probs are 0 at the argmax and
# about -(gap) * 2**100 elsewhere. A power of two keeps the scaling exact in float32.
_COLD = 2.0**-100


def _score_continuations(
    graphdef: Any,
    state: Any,
    tokens: jax.Array,  # [B, T] int32, left-padded inputs (the sequence minus its last id)
    mask: jax.Array,  # [B, T] bool
    targets: jax.Array,  # [B, C] int32, C <= T: the ids that the last C input positions predict
    target_mask: jax.Array,  # [B, C] bool: continuation ids (right-aligned)
    *,
    chunk: int,
) -> tuple[jax.Array, jax.Array]:
    """(summed log-prob of the continuation [B], every continuation id is the argmax [B]).

    Only the last C positions go through the LM head, `chunk` positions at a time
    (`grpo.token_logprobs_and_entropy`). The argmax test is the same log-prob at
    temperature `_COLD`: a target is the argmax exactly when its cold log-prob is 0 (a tie
    for the maximum counts as not greedy).
    """
    model = nnx.merge(graphdef, state)
    hidden, _ = model.hidden_states(tokens, positions_from_mask(mask), mask)
    h = hidden[:, -targets.shape[1] :]  # [B, C, D]: left padding puts the last ids at the end
    kernel = model.lm_head_kernel().astype(h.dtype)  # [D, V]
    score = functools.partial(
        token_logprobs_and_entropy, h, kernel, targets, chunk_size=chunk, mask=target_mask
    )
    logprobs, _ = score()  # [B, C], 0 outside the continuation
    cold, _ = score(temperature=_COLD)
    return jnp.sum(logprobs, axis=-1), jnp.all(cold == 0.0, axis=-1)


@register_model("reflax")
class ReflaxLM(TemplateLM):
    """lm_eval's model interface on a reflax decoder (see the module docstring).

    `state` is the model's parameters (`nnx.State`, placed on `mesh` when there is one);
    `sampler` defaults to a new `Sampler` on the mesh. `max_length` (default: the model's
    `max_position_embeddings`) bounds context + continuation; `max_gen_toks` is the
    generation budget of tasks that set none. `add_bos_token` None encodes as the
    tokenizer does by default (Llama adds its BOS, Qwen adds nothing). `compiler_options` go
    to the scoring program's `jax.jit`, as `Sampler`'s do.
    """

    def __init__(
        self,
        graphdef: Any,
        state: Any,
        tok: ChatTokens,
        *,
        mesh: Mesh | None = None,
        sampler: Sampler | None = None,
        batch_size: int | str | None = 16,
        max_length: int | None = None,
        max_gen_toks: int = 256,
        logits_chunk: int = 128,
        length_buckets: BucketSpec = 64,
        add_bos_token: bool | None = None,
        seed: int = 0,
        compiler_options: dict[str, Any] | None = None,
        **harness_kwargs: Any,  # max_batch_size, device: lm_eval passes them to every model
    ) -> None:
        super().__init__()
        del harness_kwargs
        if batch_size in (None, "auto"):
            batch_size = 16
        self.graphdef, self.state, self.tok = graphdef, state, tok
        self.tokenizer = tok.tokenizer
        self.mesh = mesh
        self.sampler = sampler or Sampler(graphdef, mesh)
        self.config = nnx.merge(graphdef, state).config
        self.batch_size = int(batch_size)
        self._max_length = int(max_length or self.config.max_position_embeddings)
        self.max_gen_toks = int(max_gen_toks)
        self.logits_chunk = int(logits_chunk)
        self.length_buckets = length_buckets
        self.add_bos_token = add_bos_token
        self.seed = seed
        self._score = jax.jit(
            functools.partial(_score_continuations, graphdef),
            static_argnames="chunk",
            compiler_options=compiler_options,
        )

    @classmethod
    def from_runtime(cls, rt: Runtime, state: Any, **kwargs: Any) -> ReflaxLM:
        """The harness model of a run's `Runtime` with weights `state`."""
        return cls(rt.graphdef, state, rt.tok, mesh=rt.mesh, sampler=rt.sampler, **kwargs)

    # ------------------------------------------------------------------ tokenization
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        # conditions an empty context, as transformers' models do in the harness
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.eot_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer.name_or_path.replace("/", "__")

    def tok_encode(
        self, string: str, add_special_tokens: bool | None = None, **kwargs: Any
    ) -> list[int]:
        if add_special_tokens is None:
            add_special_tokens = self.add_bos_token
        bos = self.tokenizer.bos_token
        if add_special_tokens is None and bos and string.startswith(bos):
            add_special_tokens = False  # the text carries its BOS already
        special = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
        return self.tokenizer.encode(string, **special)

    def apply_chat_template(
        self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True
    ) -> str:
        return self.tokenizer.apply_chat_template(
            chat_history, tokenize=False, add_generation_prompt=add_generation_prompt
        )

    # ------------------------------------------------------------------ device calls
    def _put(self, x: np.ndarray) -> jax.Array:
        if self.mesh is None:
            return jnp.asarray(x)
        return put(x, batch_sharding(self.mesh, x.shape))

    def _score_batch(self, rows: Sequence[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """(context ids, continuation ids) rows, at most batch_size -> (log-prob, is greedy)."""
        inputs, targets = [], []
        for context, continuation in rows:
            whole = (context + continuation)[-(self.max_length + 1) :]
            n = min(len(continuation), len(whole) - 1)
            inputs.append(whole[:-1])
            targets.append(whole[len(whole) - n :])
        T = bucket_size(max(len(x) for x in inputs), self.length_buckets)
        # a power of two, at most the input bucket (every target is predicted by an input)
        C = min(bucket_size(max(len(t) for t in targets), None), T)
        chunk = min(C, max(self.logits_chunk, 1))
        tokens, mask = left_pad(inputs, T, self.tok.pad_id, rows=self.batch_size)
        target_ids, target_mask = left_pad(targets, C, 0, rows=self.batch_size)
        args = [self._put(a) for a in (tokens, mask, target_ids, target_mask)]
        if self.mesh is not None:
            with jax.set_mesh(self.mesh):
                out = self._score(self.state, *args, chunk=chunk)
        else:
            out = self._score(self.state, *args, chunk=chunk)
        logprob, greedy = fetch(out)
        return [(float(logprob[i]), bool(greedy[i])) for i in range(len(rows))]

    def _loglikelihood_tokens(
        self, requests: list[tuple[Any, list[int], list[int]]], disable_tqdm: bool = False, **_
    ) -> list[tuple[float, bool]]:
        """Harness requests (cache key, context ids, continuation ids), longest first in
        batches, answered in the original order."""
        order = sorted(range(len(requests)), key=lambda i: -len(requests[i][1] + requests[i][2]))
        out: list[tuple[float, bool] | None] = [None] * len(requests)
        for start in range(0, len(order), self.batch_size):
            batch = order[start : start + self.batch_size]
            scores = self._score_batch([(requests[i][1], requests[i][2]) for i in batch])
            for i, score in zip(batch, scores):
                out[i] = score
                if requests[i][0] is not None:
                    self.cache_hook.add_partial("loglikelihood", requests[i][0], score)
        return out  # type: ignore[return-value]

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of whole texts over the harness's disjoint rolling windows."""
        windows: list[tuple[None, list[int], list[int]]] = []
        owners: list[int] = []
        for r, (text,) in enumerate(req.args for req in requests):
            for context, continuation in map(
                lm_utils.make_disjoint_window,
                lm_utils.get_rolling_token_windows(
                    token_list=self.tok_encode(text),
                    prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length,
                    context_len=1,
                ),
            ):
                windows.append((None, context, continuation))
                owners.append(r)
        totals = [0.0] * len(requests)
        for r, (logprob, _) in zip(owners, self._loglikelihood_tokens(windows)):
            totals[r] += logprob
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        """Sampler completions cut at the first `until` string, batched per gen_kwargs."""
        out: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(json.dumps(req.args[1], sort_keys=True, default=str), []).append(i)
        eos = self.tokenizer.decode([self.eot_token_id])
        for members in groups.values():
            kwargs = normalize_gen_kwargs(requests[members[0]].args[1], self.max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
            max_new = int(kwargs.pop("max_gen_toks"))
            spec = SamplingSpec(
                temperature=float(kwargs.get("temperature") or 1.0),
                top_p=float(kwargs.get("top_p") or 1.0),
                top_k=int(kwargs.get("top_k") or 0),
                greedy=not kwargs.get("do_sample") or not kwargs.get("temperature"),
                stop_ids=self.tok.stop_ids,
                pad_id=self.tok.pad_id,
                logprobs=False,
            )
            budget = self.max_length - max_new
            if budget < 1:
                raise ValueError(
                    f"max_gen_toks={max_new} leaves no room for a context in max_length="
                    f"{self.max_length}"
                )
            contexts = {i: self.tok_encode(requests[i].args[0])[-budget:] for i in members}
            members = sorted(members, key=lambda i: -len(contexts[i]))
            for start in range(0, len(members), self.batch_size):
                batch = members[start : start + self.batch_size]
                sampled = self.sampler.sample(
                    self.state,
                    [contexts[i] or [self.prefix_token_id] for i in batch],
                    spec,
                    max_new_tokens=max_new,
                    rng=jax.random.fold_in(jax.random.key(self.seed), start),
                    keep_cache=False,
                )
                for i, ids in zip(batch, sampled.completions()):
                    ids = [t for t in ids if t not in self.tok.stop_ids]
                    text = self.tok.decode(ids, skip_special_tokens=True)
                    out[i] = postprocess_generated_text(text, until, None)
                    self.cache_hook.add_partial("generate_until", requests[i].args, out[i])
        return out  # type: ignore[return-value]


# ------------------------------------------------------------------------------ the suite
@functools.lru_cache(maxsize=4)
def _task_manager(include_path: str | None, include_defaults: bool) -> Any:
    # indexing lm_eval's thousands of task YAMLs takes seconds: once per process
    return TaskManager(include_path=include_path, include_defaults=include_defaults)


def run_suite(
    lm: ReflaxLM,
    tasks: Sequence[str],
    *,
    limit: int | float | None = None,
    include_path: str | None = None,
    include_defaults: bool = True,
    log_samples: bool = False,
    **kwargs: Any,
) -> dict[str, Any]:
    """lm_eval's `simple_evaluate` of `lm` on `tasks`; its results dict (JSON-ready)."""
    results = simple_evaluate(
        model=lm,
        tasks=list(tasks),
        limit=limit,
        task_manager=_task_manager(include_path, include_defaults),
        log_samples=log_samples,
        **kwargs,
    )
    return json.loads(json.dumps(results, default=str))  # numpy scalars, dtypes -> JSON


def headline(results: dict[str, Any], task: str) -> tuple[str, float]:
    """(metric key, value) of a task: SUITE's metric, else the first preferred metric found."""
    scores = results["results"].get(task, {})
    wanted = [b.metric for b in SUITE if b.task == task]
    wanted += [k for m in _PREFERRED_METRICS for k in scores if k.split(",")[0] == m]
    for key in wanted:
        value = scores.get(key)
        if isinstance(value, int | float):
            return key, float(value)
    return "", float("nan")


def forgetting_table(runs: dict[str, dict[str, Any]], tasks: Sequence[str]) -> str:
    """Benchmarks as rows, one column per run, and the change of the last run from the first
    (points) against the paper's claim."""
    names = list(runs)
    labels = {b.task: b.label for b in SUITE}
    width = max(14, *(len(n) for n in names))
    lines = [
        PAPER_CLAIM,
        f"{'benchmark':<14} {'metric':<28}"
        + "".join(f" {n:>{width}}" for n in names)
        + f" {'change':>8}  within claim",
    ]
    for task in tasks:
        values = [headline(runs[n], task) for n in names]
        metric = next((k for k, _ in values if k), "")
        row = f"{labels.get(task, task):<14} {metric:<28}"
        row += "".join(f" {100 * v:>{width}.1f}" for _, v in values)
        change = values[-1][1] - values[0][1]
        if len(names) > 1 and not math.isnan(change):
            verdict = "yes" if change > -MAX_DEGRADATION else "NO"
            row += f" {100 * change:>+8.1f}  {verdict}"
        lines.append(row)
    return "\n".join(lines)


def compare(
    rt: Runtime,
    params: Any,
    *,
    checkpoint: str | None = None,
    hf: str | None = None,
    tasks: Sequence[str] = tuple(b.task for b in SUITE),
    **kwargs: Any,
) -> dict[str, dict[str, Any]]:
    """`run_suite` (kwargs) on the config's initial model ("vanilla"), then on the run's
    latest checkpoint and/or a Hugging Face checkpoint: {model name: lm_eval results}."""
    lm_keys = ("batch_size", "max_length", "max_gen_toks", "logits_chunk", "add_bos_token")
    lm_kwargs = {k: kwargs.pop(k) for k in lm_keys if k in kwargs}
    runs = {"vanilla": run_suite(ReflaxLM.from_runtime(rt, params, **lm_kwargs), tasks, **kwargs)}
    if checkpoint:
        trained, step = restore_params(params, checkpoint)
        lm = ReflaxLM.from_runtime(rt, trained, **lm_kwargs)
        runs[f"trained (step {step})"] = run_suite(lm, tasks, **kwargs)
    if hf:
        other, other_params = build(rt.config, model_path=hf)
        name = os.path.basename(os.path.normpath(hf)) or hf
        lm = ReflaxLM.from_runtime(other, other_params, **lm_kwargs)
        runs[name] = run_suite(lm, tasks, **kwargs)
    return runs


def run(
    rt: Runtime,
    params: Any,
    *,
    checkpoint: str | None = None,
    hf: str | None = None,
    tasks: Sequence[str] | None = None,
    limit: float | None = None,
    include_path: str | None = None,
    batch_size: int = 16,
    chat_template: bool = False,
    output: str | None = None,
) -> dict[str, dict[str, Any]]:
    """`python -m reflax.evaluate --suite=forgetting`: `compare` on `tasks` (default: SUITE),
    printed and saved as JSON (`output`, else <checkpoint>/forgetting.json when there is a
    checkpoint). `limit` is examples per task, or a fraction of each when below 1."""
    tasks = list(tasks or (b.task for b in SUITE))
    runs = compare(
        rt,
        params,
        checkpoint=checkpoint,
        hf=hf,
        tasks=tasks,
        limit=int(limit) if limit is not None and limit >= 1 else limit,
        include_path=include_path,
        batch_size=batch_size,
        apply_chat_template=chat_template,
    )
    if distributed.is_primary():
        print(forgetting_table(runs, tasks))
    output = output or (storage.join(checkpoint, "forgetting.json") if checkpoint else None)
    if output:
        save_json(output, {"tasks": tasks, "claim": PAPER_CLAIM, "runs": runs})
    return runs
