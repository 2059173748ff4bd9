"""The vanilla model (pretrained + the config's warm start) on the validation split, with the
reflection turn measured: is it still words?

    python experiments/smollm2/vanilla.py --config=configs/smollm2_135m.py \
        --workdir=/tmp/smollm2/run --output=experiments/smollm2/run/vanilla.json \
        [--config.warm_start.steps=30 ...]

Trains the warm start into <workdir>/warm_start (or restores it from there, so that a
`reflax.train` run on the same workdir starts from the same weights), then evaluates it
on `eval.num_examples` problems of `eval.split` (which must be "validation": settings are
chosen there) twice: greedily (the paper's table) and sampled at the rollout temperature
(what RL sees), every failure's attempt, reflection and retry kept. Per decoding it adds
`reflections`: how many there are, the share holding an `<answer>` tag, their mean length
in tokens, and the share that ran to `rollout.max_reflection_tokens`.
"""

from __future__ import annotations

import os
import sys

from absl import app, flags
from ml_collections import config_flags

from reflax.evaluate import evaluate, table
from reflax.metrics import MetricsWriter
from reflax.results import save_json
from reflax.runtime import Runtime, build, load_examples
from reflax.warm_start import warm_start

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "reflax config file", lock_config=True)
flags.DEFINE_string("workdir", None, "where the warm start is trained or restored from")
flags.DEFINE_string("output", None, "results JSON")
flags.DEFINE_bool("sampled", True, "also evaluate at the rollout temperature")


def reflection_stats(rt: Runtime, samples: list[dict]) -> dict[str, float]:
    """Share of reflections with an `<answer>` tag, mean length in tokens, share at the cap."""
    lengths = [len(rt.tok.encode(s["reflection"])) for s in samples]
    n = len(samples)
    cap = rt.config.rollout.max_reflection_tokens
    return {
        "n": n,
        "answer_tag_share": sum("<answer>" in s["reflection"] for s in samples) / n if n else 0,
        "mean_tokens": sum(lengths) / n if n else 0.0,
        "at_cap_share": sum(k >= cap for k in lengths) / n if n else 0.0,
    }


def main(argv: list[str]) -> None:
    del argv
    c = FLAGS.config
    if c.eval.split != "validation":
        sys.exit("settings are chosen on the validation split: eval.split must be 'validation'")
    rt, params = build(c)
    writer = MetricsWriter(FLAGS.workdir, tensorboard=False)
    params = warm_start(rt, params, FLAGS.workdir, writer)
    writer.close()
    examples = load_examples(rt, c.eval.split, c.eval.num_examples)
    results = {}
    for name, greedy in (("greedy", True), ("sampled", False))[: 1 + FLAGS.sampled]:
        r = evaluate(
            rt,
            params,
            examples,
            batch_size=c.eval.batch_size,
            greedy=greedy,
            seed=c.seed,
            num_samples_kept=len(examples),
        )
        r["reflections"] = reflection_stats(rt, r["samples"])
        results[name] = r
        print(name, r["reflections"], flush=True)
    print(table(results, f"vanilla, {c.eval.split}, n={len(examples)}"))
    results["command"] = " ".join(sys.argv)
    os.makedirs(os.path.dirname(os.path.abspath(FLAGS.output)), exist_ok=True)
    save_json(FLAGS.output, results)


if __name__ == "__main__":
    flags.mark_flags_as_required(["config", "workdir", "output"])
    app.run(main)
