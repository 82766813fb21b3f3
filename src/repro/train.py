"""`repro-train`: training.

Not built yet (issue #4); the command refuses to run rather than pretend.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from repro.cli import CONFIG_DIR, HYDRA_VERSION_BASE, fail
from repro.config import register_configs


@hydra.main(version_base=HYDRA_VERSION_BASE, config_path=CONFIG_DIR, config_name="train")
def _train(cfg: DictConfig) -> None:
    """Refuse to run: this command lands with issue #4."""
    fail("repro-train is not implemented yet (training lands with issue #4); "
         "for now use repro-summary for model complexity")


def main() -> None:
    """Console entry point of `repro-train`."""
    register_configs()
    _train()


if __name__ == "__main__":
    main()
