"""`repro-summary`: parameters and mult-adds of a model, per layer (cf. ResNet Table 1) and by layer type
(cf. MobileNet Table 2)."""

from __future__ import annotations

import json

import hydra
from omegaconf import DictConfig, OmegaConf

from repro.cli import CONFIG_DIR, HYDRA_VERSION_BASE, check_overrides, fail, save_run_info
from repro.config import register_configs
from repro.models import create_model_from_config
from repro.report.complexity import format_table, summarize


@hydra.main(version_base=HYDRA_VERSION_BASE, config_path=CONFIG_DIR, config_name="summary")
def _summary(cfg: DictConfig) -> None:
    """Print the model's complexity and keep it, with the resolved config, in the run dir."""
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    if not 8 <= model_cfg["resolution"] <= 4096:
        fail(f"model.resolution={model_cfg['resolution']} is not valid; give the input side in pixels "
             f"(e.g. 224, 192, 160, 128 for ImageNet models, 32 for CIFAR)")
    try:
        model = create_model_from_config(model_cfg)
    except ValueError as e:
        fail(str(e))
    # Count every conv and fc layer on one image at the model's resolution.
    summary = {"model": model_cfg, **summarize(model, model_cfg["resolution"])}
    out = save_run_info(cfg)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    if cfg.format == "json":
        print(json.dumps(summary))
    else:
        title = f"{model_cfg['name']} at {model_cfg['resolution']}x{model_cfg['resolution']}"
        print(format_table(summary, title))


def main() -> None:
    """Console entry point of `repro-summary`."""
    register_configs()
    check_overrides("summary")
    _summary()


if __name__ == "__main__":
    main()
