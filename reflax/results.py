"""Result files a command leaves beside its checkpoints: eval.json, forgetting.json and
`--output` files, local or in a bucket (`reflax.storage`), written whole by the primary
process. Exported directories (the HF checkpoint in hf/) go through `storage.staged_dir`.
"""

from __future__ import annotations

import os
from typing import Any

from reflax import distributed, storage


def save_json(path: str | os.PathLike, results: dict[str, Any]) -> None:
    """Write the results (on the primary process only: one file for the whole cluster)."""
    if distributed.is_primary():
        storage.write_json(path, results, indent=2)  # a local path or a URL, written whole
