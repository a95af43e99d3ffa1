"""sppx entry point: `python run.py pruner=wanda sparsity=0.75` (any Hydra override; -m for sweeps)."""

import logging
import re
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from sppx.errors import ConfigError, RunError

log = logging.getLogger("sppx")
CONF = Path(__file__).resolve().parent / "conf"


def check_group_choices(args: list[str]) -> None:
    """``group=option`` overrides naming an option that conf/<group>/ lacks fail here, in one line with
    the allowed options (Hydra's own message spans a dozen lines). Sweeps (``a,b``) are checked per
    choice; anything fancier (globs, ranges, interpolations) is left to Hydra."""
    for arg in args:
        key, sep, value = arg.lstrip("+").partition("=")
        if not sep or key.startswith(("-", "~", "hydra")) or "." in key or not (CONF / key).is_dir():
            continue
        if re.search(r"[()\[\]{}$*]", value):
            continue
        options = sorted(p.stem for p in (CONF / key).glob("*.yaml"))
        for choice in value.split(","):
            if choice not in options:
                print(f"sppx: error: {key}={choice!r}: allowed: {', '.join(options)}", file=sys.stderr)
                raise SystemExit(2)


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    from hydra.core.hydra_config import HydraConfig

    from sppx.pipeline import run
    from sppx.summary import print_summary

    try:
        results = run(cfg, overrides=list(HydraConfig.get().overrides.task))
    except (ConfigError, RunError) as err:
        log.error("%s", err)
        print(f"sppx: error: {err}", file=sys.stderr)
        raise SystemExit(2 if isinstance(err, ConfigError) else 1) from None
    print_summary(results, cfg.paths.output_dir)
    return results["ppl"]["final"]


if __name__ == "__main__":
    check_group_choices(sys.argv[1:])
    main()
