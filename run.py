"""sppx entry point: `python run.py pruner=wanda sparsity=0.75` (any Hydra override; -m for sweeps)."""

import logging
import sys

import hydra
from omegaconf import DictConfig

from sppx.errors import ConfigError

log = logging.getLogger("sppx")


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    from sppx.pipeline import run
    from sppx.summary import print_summary

    try:
        results = run(cfg)
    except ConfigError as err:
        log.error("%s", err)
        print(f"sppx: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    print_summary(results, cfg.paths.output_dir)
    return results["ppl"]["final"]


if __name__ == "__main__":
    main()
