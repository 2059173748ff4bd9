"""Supervised warm start: next-token training on the task's reference answers.

For models with no pretraining (the CPU toy runs), a short supervised phase
gives basic competence before Reflect-Retry-Reward. It reuses the GRPO step:
with advantage 1 on every answer token, ratio 1 and no KL, the policy-gradient
loss has exactly the gradient of the answer tokens' negative log-likelihood.
The result is checkpointed in <workdir>/warm_start, so a resumed run (and its
KL reference) starts from the same weights.

Four kinds of rows (keys of `warm_start`; templates are str.format over the example
plus the task's `Task.warm_start_fields`, e.g. Countdown's `expression`, `wrong`, `hint`):

  answer      prompt -> `answer_template` (a first attempt)
  episode     prompt -> a wrong attempt (`wrong_template`, context only) -> reflection
              instruction -> `reflection_template` -> retry instruction ->
              `retry_template`; loss on the reflection and the retry. This teaches the
              reflect/retry format, and that a retry follows its reflection, so that
              RL on the reflection tokens has something to steer. A fraction
              `episode_fraction` of the steps are episodes (0 = none).
  reflection  prompt -> a wrong attempt (`wrong_template`, context only) -> reflection
              instruction -> the *initial* model's own reflection, sampled once at the
              rollout temperature (`rollout.max_reflection_tokens`); loss on it alone.
              For a pretrained model: answer rows alone teach every assistant turn to
              be an answer line, the reflection turn too; these rows keep that turn in
              the model's own words (self-distillation: the cross-entropy on the initial
              model's samples estimates the forward KL to it on the reflection turn,
              without a reference forward per step). A fraction `reflection_fraction`
              of the steps, over `reflection_rows` problems; the samples are cached in
              <workdir>/warm_start/reflections.jsonl until the warm start is saved.
  retry       a reflection row's context and sampled reflection (no loss), the retry
              instruction, then `answer_template` (loss). For a pretrained model: after
              answer rows alone the retry repeats the failed attempt word for word, so a
              reflection cannot change it; these rows make the answer turn after a
              reflection a new attempt. The reflections stay the initial model's words,
              none is trained on. A fraction `retry_fraction` of the steps, on the same
              `reflection_rows` problems and samples.

With `holdout_fraction` > 0 the warm start sees only part of the train problem
families and online RL the rest, as a pretrained model meets its failure set:
problems it was never taught.
"""

from __future__ import annotations

import json
import logging
import os
import random
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from reflax import data, distributed, optim, storage
from reflax.batch import shard_batch
from reflax.checkpoint import Checkpointer, CheckpointError, abstract_like
from reflax.episodes import Group, Segment, build_batch, prompt_ids, retry_turn
from reflax.metrics import MetricsWriter, Progress
from reflax.runtime import Runtime, load_examples
from reflax.sampling import SamplingSpec
from reflax.tasks import splits
from reflax.trainer import StepConfig, init_state, jit_train_step, make_train_step

log = logging.getLogger(__name__)
_FAMILY_SALT = "reflax-warm-start-families"
REFLECTIONS_FILE = "reflections.jsonl"  # in <workdir>/warm_start: the sampled reflection rows
KINDS = ("answer", "episode", "reflection", "retry")


def _ended(rt: Runtime, text: str) -> list[int]:
    """`text` as a complete assistant turn's sampled ids, ending in the stop id."""
    end = rt.tok.turn_suffix_ids[:1]
    if not end or end[0] not in rt.tok.stop_ids:
        end = rt.tok.stop_ids[:1]
    return rt.tok.encode(text) + end


def answer_ids(rt: Runtime, example: dict) -> list[int]:
    """The reference answer as a complete assistant turn ending in the stop id."""
    return _ended(rt, rt.config.warm_start.answer_template.format(**example))


def reflection_prefix(rt: Runtime, example: dict) -> list[int]:
    """The context a reflection follows: the prompt, a wrong attempt (`wrong_template`)
    closed as an assistant turn, and the task's reflection instruction."""
    tok, task = rt.tok, rt.task
    wrong = tok.encode(rt.config.warm_start.wrong_template.format(**example))
    return (
        prompt_ids(tok, task, example)
        + tok.close_assistant(wrong)
        + tok.user_turn_ids(task.reflection_instruction(example))
    )


def episode_segments(rt: Runtime, example: dict) -> list[Segment]:
    """A supervised reflect/retry episode: loss on the reflection and the retry."""
    c = rt.config.warm_start
    refl = _ended(rt, c.reflection_template.format(**example))
    retry = _ended(rt, c.retry_template.format(**example))
    return [
        Segment(reflection_prefix(rt, example)),
        Segment(refl, True),
        Segment(retry_turn(rt.tok, rt.task, example, refl)),
        Segment(retry, True),
    ]


def sampled_reflections(
    rt: Runtime, params: Any, examples: Sequence[dict], rng: jax.Array
) -> list[list[Segment]]:
    """Reflection rows, one per example: its `reflection_prefix` (no loss) and the
    reflection `params` (the initial model) samples after it at the rollout's temperature,
    top-k/top-p and reflection length (loss), stop id included when sampled."""
    c = rt.config
    prefixes = [reflection_prefix(rt, ex) for ex in examples]
    out = rt.sampler.sample(
        params,
        prefixes,
        SamplingSpec.from_config(c, rt.tok),
        max_new_tokens=c.rollout.max_reflection_tokens,
        rng=rng,
        keep_cache=False,
    )
    return [[Segment(p), Segment(r, True)] for p, r in zip(prefixes, out.completions())]


def cached_reflections(
    rt: Runtime, params: Any, examples: Sequence[dict], directory: str
) -> list[list[Segment]]:
    """`sampled_reflections` of `examples`, read from `directory`/reflections.jsonl when an
    earlier (interrupted) warm start wrote it, else sampled (rng: the run's seed) and
    written there with their text, for reading what the warm start distils."""
    path = storage.join(directory, REFLECTIONS_FILE)
    if storage.exists(path):
        with storage.open(path) as f:
            lines = [json.loads(line) for line in f if line.strip()]
        log.info("warm-start reflections read from %s", path)
        return [[Segment(r["prefix"]), Segment(r["reflection"], True)] for r in lines]
    rows = sampled_reflections(rt, params, examples, jax.random.key(rt.config.seed + 3))
    if distributed.is_primary():
        with storage.atomic_write(path) as f:
            for prefix, refl in rows:
                text = rt.tok.decode(refl.ids, skip_special_tokens=True)
                record = {"prefix": prefix.ids, "reflection": refl.ids, "text": text}
                f.write(json.dumps(record) + "\n")
    return rows


def retry_rows(
    rt: Runtime, examples: Sequence[dict], reflections: Sequence[list[Segment]]
) -> list[list[Segment]]:
    """Retry rows: each reflection row (`cached_reflections` of `examples`, in order) as
    context, the retry instruction, then the example's reference answer, the only loss."""
    rows = []
    for ex, (prefix, refl) in zip(examples, reflections, strict=True):
        rows.append(
            [
                Segment(prefix.ids),
                Segment(refl.ids),
                Segment(retry_turn(rt.tok, rt.task, ex, refl.ids)),
                Segment(answer_ids(rt, ex), True),
            ]
        )
    return rows


def step_kinds(
    steps: int, episode_fraction: float, reflection_fraction: float, retry_fraction: float = 0.0
) -> list[str]:
    """The row kind of each warm-start step (`KINDS`), each share spread evenly: an episode
    step whenever the running share of episode steps falls behind `episode_fraction`, among
    the other steps a reflection step likewise, and among the rest a retry step, so that
    each fraction of all steps is its kind's; the remaining steps are answer steps."""

    def due(fraction: float, i: int) -> bool:
        # 1e-9: a share like (1/3) / (2/3) is 0.4999... in floats, 2 x it must still reach 1
        return int((i + 1) * fraction + 1e-9) > int(i * fraction + 1e-9)

    # each kind in turn takes its share of the steps the kinds before it left
    fractions = {
        "episode": episode_fraction,
        "reflection": reflection_fraction,
        "retry": retry_fraction,
    }
    levels, left = [], 1.0
    for kind, fraction in fractions.items():
        levels.append((kind, fraction / left if left > 0 else 0.0))
        left -= fraction
    reached = [0] * len(levels)  # steps that got as far as each level
    kinds = []
    for _ in range(steps):
        kind = "answer"
        for level, (name, share) in enumerate(levels):
            reached[level] += 1
            if due(share, reached[level] - 1):
                kind = name
                break
        kinds.append(kind)
    return kinds


def split_families(rt: Runtime, examples: list[dict]) -> tuple[list[dict], list[dict]]:
    """`(warm start's, RL's)` train problems: `warm_start.holdout_fraction` of the families
    (`task.family_key`, by a stable salted hash) go to RL only; with 0 both get all."""
    fraction = rt.config.warm_start.holdout_fraction
    if not fraction:
        return examples, examples
    warm, rl = [], []
    for ex in examples:
        key = rt.task.family_key(ex)
        held = splits.in_test_bucket(key, fraction=fraction, salt=_FAMILY_SALT)
        (rl if held else warm).append(ex)
    if not warm or not rl:
        raise ValueError(
            f"warm_start.holdout_fraction={fraction} leaves {len(warm)} warm-start and "
            f"{len(rl)} RL problems of {len(examples)}; raise task.num_train or change it"
        )
    return warm, rl


def train_problems(rt: Runtime, stage: str) -> list[dict]:
    """The train problems the warm start (`stage="warm_start"`) or online RL (`"rl"`) uses:
    all of them, or with a warm start its side of `split_families`."""
    if stage not in ("warm_start", "rl"):
        raise ValueError(f"stage must be 'warm_start' or 'rl', got {stage!r}")
    c = rt.config
    warm = stage == "warm_start"
    examples = load_examples(rt, "train", c.task.num_train, seed=c.seed + warm)
    if not c.warm_start.steps:
        return examples
    return split_families(rt, examples)[0 if warm else 1]


def warm_start(
    rt: Runtime, params: Any, workdir: str, writer: MetricsWriter, *, restore_only: bool = False
) -> Any:
    """`params` after the supervised phase (trained now, or restored from the workdir)."""
    c = rt.config.warm_start
    ckpt = Checkpointer(os.path.join(workdir, "warm_start"), keep=1)
    if ckpt.latest_step() is not None:
        restored, _ = ckpt.restore(abstract_like({"params": params}))
        ckpt.close()
        log.info("warm start restored from %s", ckpt.directory)
        return restored["params"]
    if restore_only:
        raise CheckpointError(
            f"{ckpt.directory} is missing: the run's checkpoints need the warm start they began "
            "from; start a fresh workdir"
        )
    examples = train_problems(rt, "warm_start")
    rng = random.Random(rt.config.seed + 1)
    kinds = step_kinds(c.steps, c.episode_fraction, c.reflection_fraction, c.retry_fraction)
    rows: dict[str, list[list[Segment]]] = {kind: [] for kind in KINDS}
    enriched = []
    for ex in examples:
        ex = {**ex, **rt.task.warm_start_fields(ex, rng)}
        try:
            rows["answer"].append(
                [Segment(prompt_ids(rt.tok, rt.task, ex)), Segment(answer_ids(rt, ex), True)]
            )
            if c.episode_fraction > 0:
                rows["episode"].append(episode_segments(rt, ex))
            sampled = "reflection" in kinds or "retry" in kinds
            if sampled and len(enriched) < c.reflection_rows:
                reflection_prefix(rt, ex)  # every template's field is there
                enriched.append(ex)
        except KeyError as e:
            raise ValueError(
                f"a warm_start template needs field {e} which the examples lack"
            ) from None
    if enriched:  # sampled by the initial model, before any step changes it
        rows["reflection"] = cached_reflections(rt, params, enriched, ckpt.directory)
        rows["retry"] = retry_rows(rt, enriched, rows["reflection"])
    # Each kind's rows go in their own batches, padded only to their own length (a multiple
    # of 32, at most seq_len): one compiled shape per kind, far fewer pad tokens.
    used = sorted(set(kinds), key=KINDS.index)
    cursors = {k: data.Cursor(len(rows[k]), rt.config.seed + 1 + KINDS.index(k)) for k in used}
    lengths = {
        k: min(c.seq_len, -(-max(sum(len(sg.ids) for sg in r) for r in rows[k]) // 32) * 32)
        for k in used
    }
    tx, _ = optim.make_optimizer(
        total_steps=c.steps,
        learning_rate=c.learning_rate,
        warmup_ratio=c.warmup_ratio,
        max_grad_norm=1.0,
    )
    state = init_state(params, tx, rt.mesh)
    del params  # the state holds them now
    step_fn = make_train_step(rt.graphdef, tx, StepConfig(temperature=1.0, beta=0.0))
    compiled: dict[str, Any] = {}
    progress = Progress(c.steps, desc="warm start")
    with jax.set_mesh(rt.mesh):
        for step, kind in enumerate(kinds):
            groups = [
                Group(None, [r], [1.0])
                for r in data.select(rows[kind], cursors[kind].take(c.batch_size))
            ]
            host, stats = build_batch(
                groups,
                num_groups=c.batch_size,
                group_size=1,
                seq_len=lengths[kind],
                pad_id=rt.tok.pad_id,
            )
            if stats.dropped_too_long == len(groups):
                raise ValueError(
                    f"warm start step {step + 1}: every {kind} row is longer than "
                    f"warm_start.seq_len={c.seq_len}; raise it"
                )
            # group_size 1 gives zero advantages; supervised rows all get advantage 1
            host = host.replace(
                advantages=np.ones_like(host.advantages) * (host.loss_mask.sum(1) > 0)
            )
            batch = shard_batch(host, rt.mesh)
            if kind not in compiled:
                compiled[kind] = jit_train_step(step_fn, state, batch, rt.mesh, with_ref=False)
            state, m = compiled[kind](state, batch, None)
            nll = -float(m["logprob"])
            if not np.isfinite(nll):
                raise FloatingPointError(f"warm start diverged at step {step} (nll={nll})")
            progress.update(1, nll=nll)
            writer.write_scalars(
                step + 1,
                {f"warm_start/nll_{kind}": nll, "warm_start/dropped": stats.dropped_too_long},
            )
    progress.close()
    ckpt.save(c.steps, {"params": state.params}, {"steps": c.steps})
    ckpt.wait()
    ckpt.close()
    return state.params
