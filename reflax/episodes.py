"""Reflect-Retry episodes: attempt -> reflect (G per failure) -> retry -> reward -> train batch.

Token in, token out: every turn is built by concatenating sampled ids with the
tokenized instruction turns (`ChatTokens.close_assistant`, `user_turn_ids`);
sampled text is decoded only to be verified or logged, never re-templated.

A *group* is one failed first attempt (query, attempt) and its G samples. The
training row of sample g is `[query, attempt, reflect-instruction, reflection_g]`
with `loss_mask` 1 exactly on the reflection's sampled ids (its stop token
included: stopping is an action); its reward is the verdict on the retry that
follows it. `anchor_mask` is 1 on the failed attempt's sampled content, which no
reward trains; `grpo.anchor_beta` > 0 keeps it near the reference there. Methods
other than "reflect" exist for ablations:

  reflect           the paper: reward the reflection tokens only
  reflect_retry     reward reflection and retry tokens (the retry is in the row)
  fixed_reflection  a fixed generic reflection; G retries per failure, retry tokens rewarded
  first_attempt     plain GRPO: G first attempts per query, attempt tokens rewarded
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from reflax import grpo
from reflax.batch import Batch
from reflax.config import DEFAULT_FIXED_REFLECTION, METHODS
from reflax.metrics import Timer
from reflax.sampler import SampleOutput, Sampler
from reflax.sampling import SamplingSpec
from reflax.tasks import Task
from reflax.tokenizer import ChatTokens

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class RolloutSettings:
    """A run's rollout choices; `sampling` is the one spec every sampler call uses (greedy
    where a caller asks for greedy decoding)."""

    sampling: SamplingSpec = SamplingSpec(temperature=0.9, logprobs=False)
    group_size: int = 8
    max_attempt_tokens: int = 256
    max_reflection_tokens: int = 256
    max_retry_tokens: int = 256
    method: str = "reflect"
    fixed_reflection: str = DEFAULT_FIXED_REFLECTION
    # decode the retry greedily (method "reflect"): the reward is then a function of the
    # reflection alone, not of the retry's own sampling luck
    greedy_retry: bool = False
    # sample the retry from its whole context, prefilled again, keeping no reflection caches
    retry_prefill: bool = False

    @classmethod
    def from_config(cls, config: Any, tok: ChatTokens) -> RolloutSettings:
        """From a run config's `rollout` section and the run's tokenizer (stop and pad ids)."""
        rollout = config.rollout
        return cls(
            sampling=SamplingSpec.from_config(config, tok),
            group_size=rollout.group_size,
            max_attempt_tokens=rollout.max_attempt_tokens,
            max_reflection_tokens=rollout.max_reflection_tokens,
            max_retry_tokens=rollout.max_retry_tokens,
            method=rollout.method,
            fixed_reflection=rollout.fixed_reflection,
            greedy_retry=rollout.greedy_retry,
            retry_prefill=rollout.retry_prefill,
        )

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose from {METHODS}")
        if self.group_size < 2:
            raise ValueError("group_size must be >= 2 (advantages are normalised within a group)")
        if self.greedy_retry and self.method != "reflect":
            raise ValueError(
                f"greedy_retry needs method 'reflect' ({self.method!r} trains the retry "
                "tokens, which must be sampled)"
            )


@dataclasses.dataclass
class Failure:
    """A failed first attempt: the group key."""

    example: dict
    prompt_ids: list[int]  # rendered first-attempt prompt
    attempt_ids: list[int]  # sampled ids, verbatim (stop token included when sampled)


@dataclasses.dataclass
class Segment:
    ids: list[int]
    trainable: bool = False
    logprobs: list[float] | None = None  # sampler log-probs of `ids` (SamplingSpec.logprobs)
    anchored: bool = False  # sampled but not rewarded: KL to the reference (grpo.anchor_beta)


@dataclasses.dataclass
class Group:
    """G samples of one group; rows are segment lists, rewards in {0, 1}."""

    failure: Failure | None
    rows: list[list[Segment]]
    rewards: list[float]
    texts: dict[str, list[str]] = dataclasses.field(default_factory=dict)


def prompt_ids(tok: ChatTokens, task: Task, example: dict) -> list[int]:
    """The first-attempt prompt; tools go through the template when it renders them."""
    p = task.prompt(example)
    if p.tools and "tools" in (tok.tokenizer.chat_template or ""):
        return tok.encode_prompt(p.messages, tools=p.tools)
    return tok.encode_prompt(p.inline_tools())


def completion_text(tok: ChatTokens, ids: Sequence[int]) -> str:
    """Sampled ids as text for the verifier (stop and special tokens removed)."""
    ids = [i for i in ids if i not in tok.stop_ids]
    return tok.decode(ids, skip_special_tokens=True)


def _seed(rng: jax.Array, i: int) -> jax.Array:
    return jax.random.fold_in(rng, i)


def _logprobs(out: SampleOutput) -> list[list[float] | None]:
    """Each row's completion log-probs; Nones when the spec asked for none."""
    if out.logprobs is None:
        return [None] * len(out.lengths)
    return [lp[:n].tolist() for lp, n in zip(out.logprobs, out.lengths)]


def _verify(
    task: Task, examples: Sequence[dict], texts: Sequence[str], timer: Timer | None
) -> list[bool]:
    with timer("verify") if timer is not None else contextlib.nullcontext():
        return [task.verify(ex, t) for ex, t in zip(examples, texts)]


def first_attempts(
    sampler: Sampler,
    state: Any,
    tok: ChatTokens,
    task: Task,
    examples: Sequence[dict],
    rng: jax.Array,
    settings: RolloutSettings,
    *,
    num_samples: int = 1,
    greedy: bool = False,
    timer: Timer | None = None,
) -> tuple[list[list[int]], list[list[int]], list[list[float] | None], list[bool]]:
    """Sample attempts; returns (prompts, attempts, attempt log-probs, passed) per row
    (log-probs None unless `settings.sampling.logprobs`).

    Row e * num_samples + k is sample k of example e.
    """
    prompts = [prompt_ids(tok, task, ex) for ex in examples]
    out = sampler.sample(
        state,
        prompts,
        settings.sampling.with_greedy(greedy),
        max_new_tokens=settings.max_attempt_tokens,
        rng=rng,
        num_samples=num_samples,
        keep_cache=False,  # attempts are continued from their ids, not this cache
    )
    attempts = out.completions()
    lps = _logprobs(out)
    passed = _verify(
        task,
        [examples[i // num_samples] for i in range(len(attempts))],
        [completion_text(tok, a) for a in attempts],
        timer,
    )
    rows = [p for p in prompts for _ in range(num_samples)]
    return rows, attempts, lps, passed


def reflect_and_retry(
    sampler: Sampler,
    state: Any,
    tok: ChatTokens,
    task: Task,
    failures: Sequence[Failure],
    rng: jax.Array,
    settings: RolloutSettings,
    *,
    num_samples: int | None = None,
    greedy: bool = False,
    timer: Timer | None = None,
) -> list[Group]:
    """For each failure: G reflections sharing one prefill, one retry each, verified."""
    if not failures:
        return []
    G = settings.group_size if num_samples is None else num_samples
    spec = settings.sampling.with_greedy(greedy)
    # [prompt, attempt content (sampled: anchored), attempt close + reflect instruction]
    prefix_parts = []
    for f in failures:
        turn = tok.close_assistant(f.attempt_ids)
        turn = turn + tok.user_turn_ids(task.reflection_instruction(f.example))
        content = _content(tok, f.attempt_ids)
        if turn[: len(content)] != content:  # a template that rewrites content: anchor nothing
            content = []
        prefix_parts.append([f.prompt_ids, content, turn[len(content) :]])
    if settings.method == "fixed_reflection":
        fixed = tok.encode(settings.fixed_reflection)
        for parts in prefix_parts:
            parts[2] = parts[2] + tok.close_assistant(fixed)
    prefixes = [sum(parts, []) for parts in prefix_parts]
    if settings.method == "fixed_reflection":
        retry_turns = [tok.user_turn_ids(task.retry_instruction(f.example)) for f in failures]
        retry = sampler.sample(
            state,
            [p + r for p, r in zip(prefixes, retry_turns)],
            spec,
            max_new_tokens=settings.max_retry_tokens,
            rng=_seed(rng, 1),
            num_samples=G,
            keep_cache=False,
        )
        reflections = [fixed] * (len(failures) * G)
        refl_lps = [None] * len(reflections)
        turns = [retry_turns[i // G] for i in range(len(failures) * G)]
    else:
        refl = sampler.sample(
            state,
            prefixes,
            spec,
            max_new_tokens=settings.max_reflection_tokens,
            rng=_seed(rng, 0),
            num_samples=G,
            keep_cache=not settings.retry_prefill,
        )
        reflections = refl.completions()
        refl_lps = _logprobs(refl)
        turns = [
            retry_turn(tok, task, failures[i // G].example, r) for i, r in enumerate(reflections)
        ]
        retry_spec = spec.with_greedy(settings.greedy_retry)
        kw = dict(max_new_tokens=settings.max_retry_tokens, rng=_seed(rng, 1), keep_cache=False)
        if settings.retry_prefill:  # the whole context again: the same rows, no kept cache
            contexts = [
                prefixes[i // G] + r + t for i, (r, t) in enumerate(zip(reflections, turns))
            ]
            retry = sampler.sample(state, contexts, retry_spec, **kw)
        else:  # the reflection's cache continued with the retry turn
            retry = sampler.continue_rows(state, refl.cached, turns, retry_spec, **kw)
    retries = retry.completions()
    retry_lps = _logprobs(retry)
    retry_texts = [completion_text(tok, r) for r in retries]
    verdicts = _verify(task, [f.example for f in failures for _ in range(G)], retry_texts, timer)
    groups = []
    for u, f in enumerate(failures):
        rows, rewards, texts = [], [], {"reflection": [], "retry": []}
        for g in range(G):
            i = u * G + g
            rewards.append(float(verdicts[i]))
            texts["reflection"].append(completion_text(tok, reflections[i]))
            texts["retry"].append(retry_texts[i])
            prompt, attempt, closing_turn = prefix_parts[u]
            prefix = [Segment(prompt), Segment(attempt, anchored=True), Segment(closing_turn)]
            if settings.method == "reflect":
                row = [*prefix, Segment(reflections[i], True, refl_lps[i])]
            elif settings.method == "reflect_retry":
                row = [
                    *prefix,
                    Segment(reflections[i], True, refl_lps[i]),
                    Segment(turns[i]),
                    Segment(retries[i], True, retry_lps[i]),
                ]
            else:  # fixed_reflection
                row = [*prefix, Segment(turns[i]), Segment(retries[i], True, retry_lps[i])]
            rows.append(row)
        groups.append(Group(f, rows, rewards, texts))
    return groups


def _content(tok: ChatTokens, ids: Sequence[int]) -> list[int]:
    return list(ids[:-1]) if ids and ids[-1] in tok.stop_ids else list(ids)


def retry_turn(tok: ChatTokens, task: Task, example: dict, reflection: Sequence[int]) -> list[int]:
    """The ids that follow a sampled `reflection` before the retry: its assistant turn
    closed and the task's retry instruction as a user turn, minus what was sampled
    (`after_sampled`). Rollout, evaluation and the warm start's rows all build it here."""
    turn = tok.close_assistant(reflection) + tok.user_turn_ids(task.retry_instruction(example))
    return after_sampled(tok, reflection, turn)


def after_sampled(tok: ChatTokens, sampled: Sequence[int], turn: Sequence[int]) -> list[int]:
    """`turn` = close_assistant(sampled) + next user turn, minus the ids already sampled.

    The cache already holds the sampled ids. close_assistant keeps the content and
    replaces a sampled stop id by the template's suffix; when the suffix starts
    with that same id the sampled copy serves, otherwise (say eos where the
    template closes with an end-of-turn id) the sampled id stays in the context
    the model saw and the whole suffix follows it.
    """
    content = _content(tok, sampled)
    rest = list(turn[len(content) :])
    if len(sampled) > len(content) and rest and rest[0] == sampled[-1]:
        return rest[1:]
    return rest


def first_attempt_groups(
    sampler: Sampler,
    state: Any,
    tok: ChatTokens,
    task: Task,
    examples: Sequence[dict],
    rng: jax.Array,
    settings: RolloutSettings,
    *,
    timer: Timer | None = None,
) -> list[Group]:
    """Plain GRPO on first attempts: G samples per query, attempt tokens rewarded."""
    G = settings.group_size
    prompts, attempts, lps, passed = first_attempts(
        sampler, state, tok, task, examples, rng, settings, num_samples=G, timer=timer
    )
    groups = []
    for e in range(len(examples)):
        rows = [
            [Segment(prompts[e * G + g]), Segment(attempts[e * G + g], True, lps[e * G + g])]
            for g in range(G)
        ]
        texts = {"attempt": [completion_text(tok, attempts[e * G + g]) for g in range(G)]}
        groups.append(Group(None, rows, [float(p) for p in passed[e * G : (e + 1) * G]], texts))
    return groups


def own_tokens_bound(s: RolloutSettings, seq_len: int) -> int:
    """The most tokens a train row holds past the prefix its group shares (a packed row's
    suffix region): the rewarded completion, which is all a sample adds to the shared
    [query, attempt, instruction] (`reflect`; `fixed_reflection`, whose fixed reflection
    and retry instruction are shared; `first_attempt`, whose prompt is). `reflect_retry`
    adds the retry instruction turn too, whose length no setting bounds: `seq_len`."""
    return {
        "reflect": s.max_reflection_tokens,
        "fixed_reflection": s.max_retry_tokens,
        "first_attempt": s.max_attempt_tokens,
    }.get(s.method, seq_len)


@dataclasses.dataclass
class BatchStats:
    groups: int
    padding_groups: int
    dropped_too_long: int
    mean_reward: float
    zero_variance_frac: float
    loss_tokens: int


def build_batch(
    groups: Sequence[Group], *, num_groups: int, group_size: int, seq_len: int, pad_id: int
) -> tuple[Batch, BatchStats]:
    """Fixed-shape [num_groups * group_size, seq_len] batch; missing groups are padding.

    A group with any row longer than seq_len is dropped (counted), never truncated:
    a truncated row would train on a context the model did not see. `old_logprobs` holds
    the sampler's log-probs where the segments carry them (`SamplingSpec.logprobs`), else
    zeros: a run samples none, and the train step computes its own when grpo.mu > 1.
    """
    B = num_groups * group_size
    tokens = np.full((B, seq_len), pad_id, np.int32)
    mask = np.zeros((B, seq_len), bool)
    loss_mask = np.zeros((B, seq_len), np.float32)
    anchor_mask = np.zeros((B, seq_len), np.float32)
    old_lp = np.zeros((B, seq_len), np.float32)
    rewards = np.zeros((num_groups, group_size), np.float32)
    valid = np.zeros((num_groups,), bool)
    dropped = 0
    u = 0
    for grp in groups:
        if u == num_groups:
            break
        if len(grp.rows) != group_size:
            raise ValueError(f"group has {len(grp.rows)} rows, expected {group_size}")
        if any(sum(len(sg.ids) for sg in row) > seq_len for row in grp.rows):
            dropped += 1
            continue
        for g, row in enumerate(grp.rows):
            b, t = u * group_size + g, 0
            for sg in row:
                n = len(sg.ids)
                tokens[b, t : t + n] = sg.ids
                if sg.trainable:
                    loss_mask[b, t : t + n] = 1.0
                    if sg.logprobs is not None:
                        old_lp[b, t : t + n] = sg.logprobs
                elif sg.anchored:
                    anchor_mask[b, t : t + n] = 1.0
                t += n
            mask[b, :t] = True
        rewards[u] = grp.rewards
        valid[u] = True
        u += 1
    if dropped:
        log.warning("dropped %d groups longer than seq_len=%d", dropped, seq_len)
    if group_size > 1:
        adv = np.asarray(grpo.group_advantages(rewards, valid)[0], np.float32).reshape(B)
    else:  # no group to normalise against (supervised rows): the caller sets advantages
        adv = np.zeros((B,), np.float32)
    positions = np.broadcast_to(np.arange(seq_len, dtype=np.int32), (B, seq_len)).copy()
    batch = Batch(
        tokens=tokens,
        positions=positions,
        mask=mask,
        loss_mask=loss_mask,
        anchor_mask=anchor_mask,
        advantages=adv,
        old_logprobs=old_lp,
    )
    n_valid = int(valid.sum())
    zero_var = float(np.mean([rewards[i].std() == 0 for i in range(n_valid)])) if n_valid else 0.0
    return batch, BatchStats(
        groups=n_valid,
        padding_groups=num_groups - n_valid,
        dropped_too_long=dropped,
        mean_reward=float(rewards[valid].mean()) if n_valid else 0.0,
        zero_variance_frac=zero_var,
        loss_tokens=int(loss_mask.sum()),
    )
