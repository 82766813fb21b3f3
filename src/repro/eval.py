"""`repro-eval`: evaluation under the papers' test protocols.

Not built yet (issue #3); the command refuses to run rather than pretend.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from repro.cli import CONFIG_DIR, HYDRA_VERSION_BASE, fail
from repro.config import register_configs


@hydra.main(version_base=HYDRA_VERSION_BASE, config_path=CONFIG_DIR, config_name="eval")
def _eval(cfg: DictConfig) -> None:
    """Refuse to run: this command lands with issue #3."""
    fail("repro-eval is not implemented yet (evaluation under the papers' test protocols lands with issue #3); "
         "for now use repro-summary for model complexity")


def main() -> None:
    """Console entry point of `repro-eval`."""
    register_configs()
    _eval()


if __name__ == "__main__":
    main()
