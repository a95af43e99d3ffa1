"""sppx entry point: `python run.py pruner=wanda sparsity=0.75` (any Hydra override; -m for sweeps)."""

import contextlib
import functools
import io
import logging
import os
import re
import sys
import warnings
from pathlib import Path

import hydra
from omegaconf import DictConfig

import sppx.sweep  # noqa: F401 (registers the job_dirname resolver that names sweep job folders)
from sppx.errors import ConfigError, RunError
from sppx.interrupts import Interrupted

log = logging.getLogger("sppx")
RUN_PY = Path(__file__).resolve()
CONFIG_PATH, CONFIG_NAME = "conf", "config"  # as @hydra.main below


def hydra_arguments(argv: list[str]):
    """The command line as Hydra reads it (its flags, then the overrides), or None when Hydra answers it
    without composing the config from the overrides (``--version``, ``--shell-completion``,
    ``--experimental-rerun``) or refuses a flag itself. Flags that contradict each other end here, in
    one line, in the order Hydra would refuse them."""
    from hydra._internal.utils import get_args_parser

    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            args = get_args_parser().parse_args(argv)
    except SystemExit:  # a bad flag (Hydra prints its usage), or --version
        return None
    if args.experimental_rerun is not None:
        return None
    if args.help:
        return args
    if args.resolve and args.cfg is None:
        fail("--resolve: goes with --cfg (or --help) only")
    if args.hydra_help:
        return args
    commands = {
        "--run": args.run,
        "--multirun": args.multirun,
        "--cfg": args.cfg is not None,
        "--info": args.info is not None,
        "--shell-completion": args.shell_completion,
    }
    if sum(commands.values()) > 1:
        fail(f"{' and '.join(k for k, on in commands.items() if on)}: give only one of {', '.join(commands)}")
    return None if args.shell_completion else args  # its overrides are Hydra's (install=bash)


def accept_shorthands(argv: list[str]) -> list[str]:
    """``+tags=[a,b]`` sets the run's free-form tags like ``tags=[a,b]`` (conf/config.yaml has the key,
    where Hydra would refuse to add it again); ``export=true|false`` (and sweeps of them) is
    ``export.enabled=...`` (``export`` is a section, which Hydra would not let a bool replace)."""
    argv = [re.sub(r"^\+tags=", "tags=", arg) for arg in argv]
    return [
        re.sub(r"^export=", "export.enabled=", arg)
        if re.fullmatch(r"export=(?i:true|false)(,(?i:true|false))*", arg)
        else arg
        for arg in argv
    ]


@contextlib.contextmanager
def config_loader(args):
    """Hydra, set up as ``@hydra.main`` sets it up for this command line: conf/ (or --config-path), the
    --config-dir folder and the plugins' config folders (``hydra.searchpath`` overrides are added by
    every call that is given the overrides)."""
    from hydra._internal.hydra import Hydra
    from hydra._internal.utils import create_automatic_config_search_path
    from hydra.core.config_search_path import SearchPathQuery
    from hydra.core.global_hydra import GlobalHydra

    search_path = create_automatic_config_search_path(str(RUN_PY), None, args.config_path or CONFIG_PATH)
    if args.config_dir is not None:
        folder = os.path.abspath(args.config_dir)
        if not os.path.isdir(folder):
            fail(f"--config-dir={args.config_dir}: is not a folder")
        search_path.prepend(
            provider="command-line", path=f"file://{folder}", anchor=SearchPathQuery(provider="schema")
        )
    app = Hydra.create_main_hydra2(task_name=RUN_PY.stem, config_search_path=search_path)
    try:
        yield app
    finally:
        GlobalHydra.instance().clear()


def check_command_line(argv: list[str]) -> None:
    """Compose the config as Hydra will (with its whole search path: conf/, ``--config-dir``,
    ``hydra.searchpath``), so a malformed or unknown override ends in one line with exit 2 before any
    work (Hydra's own report spans several lines and exits 1). A sweep (``-m``) is composed as Hydra
    composes it, and so is each job of a basic sweep; a job's values are checked when it runs."""
    args = hydra_arguments(argv)
    if args is None:
        return
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException
    from hydra.types import RunMode

    overrides = list(args.overrides)
    parser = OverridesParser.create()
    for arg in overrides:
        try:
            parser.parse_override(arg)
        except HydraException:
            fail(
                f"{arg}: is not a valid override (key=value; quote values with spaces or symbols: key='...')"
            )
    helps = args.help or args.hydra_help  # Hydra shows them before looking at -m
    multirun = not helps and (args.multirun or "hydra.mode=MULTIRUN" in overrides)
    config_name = args.config_name or CONFIG_NAME
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a hydra.searchpath folder that is missing: Hydra warns itself
        with config_loader(args) as app:
            check_group_choices(app, config_name, overrides)
            mode = RunMode.MULTIRUN if multirun else RunMode.RUN
            compose = functools.partial(app.compose_config, config_name, overrides, run_mode=mode)
            cfg = check_composes(compose, overrides)
            if multirun:
                check_sweep_jobs(app, cfg)


def check_group_choices(app, config_name: str, overrides: list[str]) -> None:
    """``group=option`` overrides naming an option that no folder of the search path has fail here, in
    one line with the options Hydra sees (Hydra's own message spans a dozen lines). Sweeps (``a,b``) are
    checked per choice; anything fancier (globs, ranges, interpolations) is left to Hydra."""
    from hydra.core.object_type import ObjectType

    for arg in overrides:
        key, sep, value = arg.lstrip("+").partition("=")
        if not sep or not key or key.startswith(("~", "hydra")) or "." in key or "@" in key:
            continue
        if re.search(r"[()\[\]{}$*]", value):
            continue
        options = app.config_loader.get_group_options(key, ObjectType.CONFIG, config_name, overrides)
        if not options:  # not a config group
            continue
        for choice in value.split(","):
            if choice not in options:
                fail(f"{key}={choice!r}: allowed: {', '.join(sorted(options))}")


BASIC_SWEEPER = "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"


def check_sweep_jobs(app, cfg) -> None:
    """Every job of a sweep composes. Hydra's basic sweeper checks the same before it launches them, in
    a report of a dozen lines, after creating the sweep folder; other sweepers (Optuna) pick their own
    values."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    if cfg.hydra.sweeper.get("_target_") != BASIC_SWEEPER:
        return
    params = [f"{k}={v}" for k, v in (cfg.hydra.sweeper.get("params") or {}).items()]
    arguments = [*params, *cfg.hydra.overrides.task]
    try:
        parsed = OverridesParser.create(config_loader=app.config_loader).parse_overrides(arguments)
        jobs = BasicSweeper.split_arguments(parsed, None)[0]
    except HydraException as err:
        fail(str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__)
    swept = {o.get_key_element() for o in parsed if o.is_sweep_override()}
    for job in jobs:
        values = ",".join(o for o in job if o.split("=", 1)[0] in swept)
        compose = functools.partial(app.config_loader.load_sweep_config, cfg, list(job))
        check_composes(compose, list(job), where=f" (in the sweep's job {values})" if values else "")


def check_composes(compose, overrides: list[str], where: str = ""):
    """``compose()``'s config, or one line saying why Hydra refuses ``overrides`` (``where``: which job)."""
    from hydra.errors import HydraException, MissingConfigException
    from omegaconf.errors import OmegaConfBaseException

    try:
        return compose()
    except (HydraException, OmegaConfBaseException) as err:
        text = str(err).strip()
        if isinstance(err, MissingConfigException) and err.options and err.missing_cfg_file:
            group, _, choice = err.missing_cfg_file.rpartition("/")  # an option a defaults list names
            fail(f"{group}={choice!r}: allowed: {', '.join(sorted(err.options))}{where}")
        missing = re.match(r"Could not override '([^']+)'", text)
        if missing:
            key = missing.group(1)
            value = next((a.split("=", 1)[1] for a in overrides if a.split("=", 1)[0] == key), "")
            fail(
                f"{key}={value}: is not a setting of sppx (a new key needs a leading +: +{key}={value}){where}"
            )
        ambiguous = re.match(r"Ambiguous value for argument '([^']+)'", text)
        if ambiguous:
            fail(
                f"{ambiguous.group(1)}: several values sweep only with -m (or write a list [a,b], or quote it)"
            )
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        fail(("; ".join(lines[:2]) if lines else type(err).__name__) + where)


def remove_if_empty(folder: Path) -> None:
    """Hydra creates the run's folder before the run starts; a rejected command takes it back."""
    with contextlib.suppress(OSError):
        folder.rmdir()  # only succeeds when empty


def fail(message: str) -> None:
    print(f"sppx: error: {message}", file=sys.stderr)
    raise SystemExit(2)


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name=CONFIG_NAME)
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
    sys.argv[1:] = accept_shorthands(sys.argv[1:])
    check_command_line(sys.argv[1:])
    main()
