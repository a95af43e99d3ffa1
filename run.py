"""sppx entry point: `python run.py pruner=wanda sparsity=0.75` (any Hydra override; -m for sweeps)."""

import contextlib
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
                fail(f"{key}={choice!r}: allowed: {', '.join(options)}")


def remove_if_empty(folder: Path) -> None:
    """Hydra creates the run's folder before the run starts; a rejected command takes it back."""
    with contextlib.suppress(OSError):
        folder.rmdir()  # only succeeds when empty


def check_overrides(args: list[str]) -> None:
    """Compose the config as Hydra will, so a malformed or unknown override ends in one line with exit 2
    (Hydra's own report spans several lines and exits 1). Command lines with flags (``-m``,
    ``--config-dir``, ...) are left to Hydra."""
    if any(arg.startswith("-") for arg in args):
        return
    from hydra import compose, initialize_config_dir
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    parser = OverridesParser.create()
    for arg in args:
        try:
            parser.parse_override(arg)
        except HydraException:
            fail(
                f"{arg}: is not a valid override (key=value; quote values with spaces or symbols: key='...')"
            )
    try:
        with initialize_config_dir(str(CONF), version_base="1.3"):
            compose("config", overrides=args)
    except (HydraException, OmegaConfBaseException) as err:
        text = str(err).strip()
        missing = re.match(r"Could not override '([^']+)'", text)
        if missing:
            key = missing.group(1)
            value = next((a.split("=", 1)[1] for a in args if a.split("=", 1)[0] == key), "")
            fail(f"{key}={value}: is not a setting of sppx (a new key needs a leading +: +{key}={value})")
        ambiguous = re.match(r"Ambiguous value for argument '([^']+)'", text)
        if ambiguous:
            fail(
                f"{ambiguous.group(1)}: several values sweep only with -m (or write a list [a,b], or quote it)"
            )
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        fail("; ".join(lines[:2]) if lines else type(err).__name__)


def fail(message: str) -> None:
    print(f"sppx: error: {message}", file=sys.stderr)
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
        if (
            isinstance(err, RunError) or in_sweep
        ):  # bad input leaves no file behind (a sweep's job records it)
            log.error("%s", err)
        else:
            remove_if_empty(Path(hydra_cfg.runtime.output_dir))
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
    check_overrides(sys.argv[1:])
    main()
