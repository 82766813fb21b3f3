"""`repro-tables`: the papers' tables and figures.

Not built yet (issue #5); the command refuses to run rather than pretend.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from repro.cli import CONFIG_DIR, HYDRA_VERSION_BASE, fail
from repro.config import register_configs


@hydra.main(version_base=HYDRA_VERSION_BASE, config_path=CONFIG_DIR, config_name="tables")
def _tables(cfg: DictConfig) -> None:
    """Refuse to run: this command lands with issue #5."""
    fail("repro-tables is not implemented yet (the papers' tables and figures lands with issue #5); "
         "for now use repro-summary for model complexity")


def main() -> None:
    """Console entry point of `repro-tables`."""
    register_configs()
    _tables()


if __name__ == "__main__":
    main()
