"""Which kernel multiplies fp32 matrices on the CPU in the calibration forwards: torch's default or oneDNN.

PyTorch's x86 wheels route an fp32 ``F.linear`` to MKL, which does not take its fastest code on CPUs that
are not Intel's: on a 2-core AMD EPYC with AVX-512, a (2048 x 576) x (576 x 1536) product runs at 215
GFLOP/s through ``F.linear`` and at 466 GFLOP/s through oneDNN (``torch.ops.mkldnn._linear_pointwise``,
the op torch.compile's CPU backend emits for a Linear). Both are IEEE fp32 arithmetic; the sums are only
taken in another order (the last bits of the outputs differ, as between any two BLAS libraries).

``cpu_linear`` (a top-level setting): ``auto`` uses oneDNN where torch's products go to MKL on a CPU
that is not Intel's, ``onednn`` always, ``torch`` never. The choice is made from what the machine is,
not from a timing, so that it is the same in every run and every process of a run (data-parallel
tuning prunes the same model in each process); on an Intel CPU MKL is at home and stays.
Only the calibration forwards of pruning use it (every block's measuring and output passes, OWL's pass,
the structured pruners' passes), outside autograd: tuning, evaluation and everything that needs
gradients keep torch's own ``F.linear``. The statistics' Gram matrices (SparseGPT's Hessians) stay with
torch's kernel too: oneDNN would be 1.7 times as fast there but needs a (features x features) temporary
and a copy of the inputs where torch adds in place (SparseGPT 50% on SmolLM2-135M: 2.7 s faster,
+20 MiB peak).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import logging
from collections.abc import Iterator

import torch
from torch import nn

log = logging.getLogger(__name__)

KERNELS = ("auto", "onednn", "torch")

_kernel: contextvars.ContextVar[str] = contextvars.ContextVar("cpu_linear", default="auto")


@contextlib.contextmanager
def linear_kernel(kernel: str) -> Iterator[None]:
    """Inside, the calibration forwards use ``kernel`` (one of :data:`KERNELS`)."""
    if kernel not in KERNELS:
        raise ValueError(f"cpu_linear={kernel!r}: allowed {', '.join(KERNELS)}")
    token = _kernel.set(kernel)
    try:
        yield
    finally:
        _kernel.reset(token)


def onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` computed by oneDNN (fp32 CPU tensors; no autograd)."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


@functools.cache
def onednn_works() -> bool:
    """Whether this torch has oneDNN's Linear op and it gives F.linear's outputs (to fp32 rounding)."""
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")):
        return False
    generator = torch.Generator().manual_seed(0)
    x, w, b = (torch.randn(*shape, generator=generator) for shape in ((3, 5, 64), (48, 64), (48,)))
    try:
        with torch.no_grad():
            got = onednn_linear(x, w, b)
    except RuntimeError:
        return False
    return got.shape == (3, 5, 48) and torch.allclose(
        got, nn.functional.linear(x, w, b), rtol=1e-4, atol=1e-4
    )


@functools.cache
def cpu_vendor() -> str:
    """The CPU's vendor id (``GenuineIntel``, ``AuthenticAMD``, ...) from /proc/cpuinfo; empty where unknown."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as info:
            for line in info:
                if line.startswith("vendor_id"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def mkl_on_a_non_intel_cpu() -> bool:
    """torch multiplies fp32 matrices through MKL and this is an x86 CPU that is not Intel's."""
    return torch.backends.mkl.is_available() and cpu_vendor() not in ("", "GenuineIntel")


def use_onednn() -> bool:
    """Whether the calibration forwards here use oneDNN for fp32 products (see the module's text)."""
    kernel = _kernel.get()
    if kernel == "torch" or not onednn_works():
        if kernel == "onednn":
            warn_no_onednn()
        return False
    return kernel == "onednn" or mkl_on_a_non_intel_cpu()


@functools.cache
def warn_no_onednn() -> None:
    log.warning("cpu_linear=onednn: this torch has no working oneDNN Linear; torch's default kernel is used")


def chosen_kernel() -> str:
    """What the calibration forwards use on the CPU: ``onednn`` or ``torch`` (results.json records it)."""
    return "onednn" if use_onednn() else "torch"


def takes_onednn(linear: nn.Module) -> bool:
    """A plain fp32 ``nn.Linear`` on the CPU (subclasses and wrapped Linears keep their own forward)."""
    weight = getattr(linear, "weight", None)
    return (
        type(linear) is nn.Linear
        and weight is not None
        and weight.device.type == "cpu"
        and weight.dtype == torch.float32
    )


def onednn_forward(linear: nn.Linear):
    """The forward of ``linear`` through oneDNN; an input that needs gradients or is not fp32 goes to
    ``F.linear`` as before."""

    def forward(x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.float32 or (
            torch.is_grad_enabled() and (x.requires_grad or linear.weight.requires_grad)
        ):
            return nn.functional.linear(x, linear.weight, linear.bias)
        return onednn_linear(x, linear.weight, linear.bias)

    return forward


@contextlib.contextmanager
def onednn_linears(module: nn.Module) -> Iterator[None]:
    """Inside, the plain fp32 CPU Linears of ``module`` multiply through oneDNN when :func:`use_onednn`
    (hooks still run: only each Linear's ``forward`` is replaced, and restored on the way out)."""
    # A Linear whose forward is already replaced (an enclosing context) is left to that context.
    linears = (
        [m for m in module.modules() if takes_onednn(m) and "forward" not in vars(m)] if use_onednn() else []
    )
    for linear in linears:
        linear.forward = onednn_forward(linear)
    try:
        yield
    finally:
        for linear in linears:
            del linear.forward
