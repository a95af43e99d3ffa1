"""Plan-time checks of the settings sppx passes on to others (Lightning's Trainer, the logger) and of the
run's paths: each failure is one ConfigError line, before any weights are read."""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

import torch
from omegaconf import DictConfig, ListConfig

from sppx.errors import ConfigError, is_int, is_number, require

log = logging.getLogger(__name__)


def check_trainer(trainer: DictConfig) -> None:
    """The Trainer settings Lightning would only refuse (with a traceback) once tuning starts."""
    get = trainer.get
    interval = get("val_check_interval", 1.0)
    require(
        interval is None
        or (is_int(interval) and interval >= 1)
        or (is_number(interval) and math.isfinite(interval) and 0 < interval <= 1),
        "trainer.val_check_interval",
        interval,
        "must be an integer >= 1 (optimizer steps) or a fraction in (0, 1] of the training data",
    )
    accumulate = get("accumulate_grad_batches", 1)
    require(
        is_int(accumulate) and accumulate >= 1,
        "trainer.accumulate_grad_batches",
        accumulate,
        "must be an integer >= 1",
    )
    clip = get("gradient_clip_val")
    require(
        clip is None or (is_number(clip) and math.isfinite(clip) and clip >= 0),
        "trainer.gradient_clip_val",
        clip,
        "must be null or a finite number >= 0",
    )
    limit = get("limit_val_batches", 1.0)
    require(
        limit is None
        or (is_int(limit) and limit >= 0)
        or (is_number(limit) and math.isfinite(limit) and 0 <= limit <= 1),
        "trainer.limit_val_batches",
        limit,
        "must be an integer >= 0 (batches) or a fraction in [0, 1]",
    )
    for key in ("log_every_n_steps", "num_sanity_val_steps"):
        value = get(key, 0)
        require(
            value is None or (is_int(value) and value >= 0),
            f"trainer.{key}",
            value,
            "must be an integer >= 0",
        )


def inside(path: Path, folder: Path) -> bool:
    path, folder = Path(os.path.abspath(path)), Path(os.path.abspath(folder))
    return path == folder or folder in path.parents


def folder_setting(key: str, value, allowed: str) -> Path:
    """A setting that names a folder: a non-empty string, not an existing file."""
    require(isinstance(value, str) and value.strip() != "", key, value, allowed)
    folder = Path(value).expanduser()
    require(not folder.exists() or folder.is_dir(), key, value, "is a file, not a folder")
    return folder


def check_paths(cfg: DictConfig) -> Path:
    """``paths.output_dir`` must name a folder (not empty, not a file), ``paths.cache_dir`` a folder or
    nothing yet; the logger writes inside the run folder. Returns the output folder."""
    output = cfg.paths.get("output_dir")
    output_dir = folder_setting(
        "paths.output_dir", output, "must name the run's own folder (not empty, not '.')"
    )
    require(output.strip() != ".", "paths.output_dir", output, "must name the run's own folder, not '.'")
    cache = cfg.paths.get("cache_dir")
    if cache is not None:
        cache_dir = folder_setting("paths.cache_dir", cache, "must be null or a folder")
        existing = next((p for p in [cache_dir, *cache_dir.parents] if p.exists()), None)
        require(
            existing is not None and os.access(existing, os.W_OK),
            "paths.cache_dir",
            cache,
            f"cannot be written ({existing} is not writable)",
        )
    check_logger_paths(cfg.logger, output_dir)
    return output_dir


def check_logger_paths(logger: DictConfig, output_dir: Path) -> None:
    """A logger writes under ``save_dir/name/version``: all of it inside the run folder."""
    save_dir = logger.get("save_dir")
    if save_dir is None:
        return
    require(isinstance(save_dir, str), "logger.save_dir", save_dir, "must be a folder inside the run folder")
    require(
        inside(Path(save_dir).expanduser(), output_dir),
        "logger.save_dir",
        save_dir,
        f"must be inside the run folder {output_dir} (metrics belong with their run)",
    )
    parts = [save_dir]
    for key in ("name", "version"):
        value = logger.get(key)
        if value is None or value == "":
            continue
        require(isinstance(value, (str, int)), f"logger.{key}", value, "must be a name or a number")
        text = str(value)
        require(
            not Path(text).is_absolute() and ".." not in Path(text).parts,
            f"logger.{key}",
            value,
            "must be a plain name inside the run folder (no '..', no absolute path)",
        )
        parts.append(text)
    if not inside(Path(*parts).expanduser(), output_dir):
        raise ConfigError("logger", "/".join(parts), f"must write inside the run folder {output_dir}")


def check_device(key: str, device, unset: str = "null") -> None:
    """``unset`` (``null``: where the model is; ``auto``) or a torch device this machine has (``cpu``,
    ``cuda``, ``cuda:1``)."""
    if device is None or device == unset:
        return
    allowed = f"must be {unset}, cpu, cuda or cuda:<index>"
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError(key, device, allowed) from None
    require(parsed.type in ("cpu", "cuda"), key, device, allowed)
    if parsed.type == "cuda":
        count = torch.cuda.device_count()
        require(
            count > 0 and (parsed.index or 0) < count,
            key,
            device,
            f"this machine has {count} CUDA device(s); use {unset} or cpu",
        )


def single_process(trainer: DictConfig) -> bool:
    """Whether tuning runs in one process (``trainer.devices`` 1); several each take their own device."""
    devices = trainer.get("devices", 1)
    if isinstance(devices, ListConfig | list):
        return len(devices) == 1
    return devices in (1, "1")


def resolve_device(device, trainer: DictConfig) -> torch.device:
    """Where the model lives between stages (``device``). ``auto``: the first CUDA GPU when this machine
    has one and tuning may use it in one process (``trainer.accelerator`` auto, gpu or cuda;
    ``trainer.devices`` 1), else the CPU (and :func:`fit_device` checks the weights fit)."""
    require(device is not None, "device", device, "must be auto, cpu, cuda or cuda:<index>")
    check_device("device", device, unset="auto")
    if device != "auto":
        parsed = torch.device(device)
        require(
            parsed.type == "cpu" or single_process(trainer),
            "device",
            device,
            f"cannot hold the model for trainer.devices={trainer.get('devices')}: each tuning process takes "
            "its own device; use device=auto or cpu",
        )
        return parsed
    accelerator = trainer.get("accelerator", "auto")
    on_gpu = accelerator in ("auto", "gpu", "cuda") and single_process(trainer) and torch.cuda.is_available()
    return torch.device("cuda", 0) if on_gpu else torch.device("cpu")


def fit_device(device: torch.device, requested, weight_bytes: int) -> torch.device:
    """``device`` when the model's weights fit in its free memory (a CPU always does). Too large for the
    GPU: ``device=auto`` keeps the model on the CPU, an explicit GPU is refused in one line."""
    if device.type != "cuda":
        return device
    free, _ = torch.cuda.mem_get_info(device)
    if weight_bytes <= free:
        return device
    require(
        requested == "auto",
        "device",
        requested,
        f"the model's weights take {weight_bytes / 2**30:.1f} GiB and {device} has {free / 2**30:.1f} GiB "
        "free; use device=cpu (with pruner.device=cuda the pruning still runs on the GPU, a block at a time)",
    )
    log.warning(
        "device=auto: the model's weights (%.1f GiB) exceed the free memory of %s (%.1f GiB); it stays on "
        "the CPU",
        weight_bytes / 2**30,
        device,
        free / 2**30,
    )
    return torch.device("cpu")
