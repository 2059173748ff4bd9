"""Console logging for the CLIs: reflax at INFO, libraries (orbax, absl) at WARNING."""

import logging

from absl import logging as absl_logging


def setup(level: int = logging.INFO) -> None:
    absl_logging.set_verbosity(absl_logging.WARNING)
    logging.getLogger().setLevel(logging.WARNING)
    logging.getLogger("reflax").setLevel(level)
    absl_logging.get_absl_handler().setFormatter(
        logging.Formatter("%(asctime)s %(name)s: %(message)s", "%H:%M:%S")
    )
