"""reflax: teach language models to reflect on their failures (Reflect, Retry, Reward) in JAX.

>>> import reflax
>>> model, tokenizer = reflax.load("Qwen/Qwen2.5-1.5B-Instruct", dtype="bfloat16")
>>> logits = reflax.logits(model, [[151644, 872, 198]])
>>> reflax.save(model, "/tmp/export", tokenizer)
"""

from reflax.api import load, logits, save

__version__ = "0.1.0"
__all__ = ["load", "logits", "save", "__version__"]
