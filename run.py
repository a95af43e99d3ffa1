"""sppx entry point: `python run.py pruner=wanda sparsity=0.75` (any Hydra override; -m for sweeps)."""

import logging
import re
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

import sppx.sweep  # noqa: F401 (registers the job_dirname resolver that names sweep job folders)
from sppx.errors import ConfigError, RunError
from sppx.interrupts import Interrupted

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
def main(cfg: DictConfig) -> float:
    """One run; returns the validation perplexity of the final model (what searches minimise). In a
    sweep a failing job is recorded as failed in its results.json and the sweep goes on."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from sppx.pipeline import objective, run
    from sppx.summary import print_summary

    hydra_cfg = HydraConfig.get()
    in_sweep = hydra_cfg.mode == RunMode.MULTIRUN
    try:
        results = run(cfg, overrides=list(hydra_cfg.overrides.task), record_bad_input=in_sweep)
    except Interrupted as err:  # a sweep stops too: the signal was meant for the whole command
        log.error("%s", err)
        resume = getattr(err, "resume", None)
        how = f"; resume with: {resume}" if resume else ""
        print(f"sppx: {err} (results.json says where it stopped){how}", file=sys.stderr)
        raise SystemExit(err.exit_code) from None
    except KeyboardInterrupt:  # before the run's own handlers are in place: nothing was written
        print("sppx: interrupted by SIGINT before the run started; nothing was written", file=sys.stderr)
        raise SystemExit(130) from None
    except (ConfigError, RunError) as err:
        log.error("%s", err)
        print(f"sppx: error: {err}", file=sys.stderr)
        if in_sweep:
            return float("nan")
        raise SystemExit(2 if isinstance(err, ConfigError) else 1) from None
    except Exception as err:
        if not in_sweep:
            raise
        log.exception("job failed")  # the traceback goes to this job's log file
        print(f"sppx: error: job {hydra_cfg.job.num} failed: {type(err).__name__}: {err}", file=sys.stderr)
        return float("nan")
    if results is None:  # one of the extra processes of data-parallel tuning: the first one reports
        return float("nan")
    print_summary(results, cfg.paths.output_dir)
    return objective(results)


if __name__ == "__main__":
    check_group_choices(sys.argv[1:])
    main()
