"""The compiled CPU kernel of the Dynamic-K head (models/csrc/dynamic_k.c): built on first use, called through ctypes.

The kernel needs only a C compiler (`cc`/`gcc`, or $CC), no torch headers: it compiles in a few seconds, once, into a
cache folder ($DYNK_KERNEL_CACHE, else ~/.cache/interpretable-lightning/kernels), keyed by the source, the compiler and
the CPU, and is reused by every later process. Where no compiler works, `load()` returns None once with a warning,
and the head uses its pure-torch selection (same results, slower). `DYNK_KERNEL=0` turns the kernel off.

Only float32 CPU tensors with non-negative, finite features go through it (see `applies`); the head checks that.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("csrc") / "dynamic_k.c"
#: first the host's vector units without AVX-512 (measured faster for this kernel on AMD EPYC), then portable flags
FLAG_SETS = (["-O3", "-march=native", "-mno-avx512f", "-fopenmp"], ["-O3", "-march=native", "-fopenmp"],
             ["-O3", "-fopenmp"], ["-O3"])
ENV_SWITCH = "DYNK_KERNEL"
ENV_CACHE = "DYNK_KERNEL_CACHE"


def enabled() -> bool:
    return os.environ.get(ENV_SWITCH, "1").strip().lower() not in {"0", "false", "off", "no"}


def _cache_dir() -> Path:
    if os.environ.get(ENV_CACHE):
        return Path(os.environ[ENV_CACHE])
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "interpretable-lightning" / "kernels"


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("model name", "flags")):
                return line
    except OSError:
        pass
    return platform.processor()


def _compile(compiler: str, source: bytes, folder: Path) -> Path | None:
    """The shared library for `source`, compiled with the first flag set the compiler accepts (cached)."""
    host = [compiler.encode(), platform.machine().encode(), _cpu_name().encode()]
    for flags in FLAG_SETS:
        key = hashlib.sha256(b"\0".join([source, " ".join(flags).encode(), *host])).hexdigest()[:16]
        target = folder / f"dynamic_k-{key}.so"
        if target.exists():
            return target
        folder.mkdir(parents=True, exist_ok=True)
        # compile next to the target and rename: concurrent processes (DDP ranks, test workers) never see half a file
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=folder)
        os.close(fd)
        result = subprocess.run([compiler, *flags, "-shared", "-fPIC", "-x", "c", "-", "-o", tmp],
                                input=source, capture_output=True, timeout=120)
        if result.returncode == 0:
            os.replace(tmp, target)
            return target
        os.unlink(tmp)
        log.debug("Dynamic-K kernel: %s %s failed: %s", compiler, " ".join(flags), result.stderr.decode()[-2000:])
    return None


@functools.lru_cache(maxsize=1)
def load() -> ctypes.CDLL | None:
    """The kernel library, or None (with one warning saying why) where it cannot be built."""
    if not enabled():
        return None
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        log.warning("Dynamic-K head: no C compiler (cc/gcc, or $CC) found, so the fast CPU selection kernel is off; "
                    "the pure-torch selection gives the same results, slower. Install gcc to enable it.")
        return None
    try:
        path = _compile(compiler, SOURCE.read_bytes(), _cache_dir())
        lib = ctypes.CDLL(str(path)) if path is not None else None
    except (OSError, subprocess.SubprocessError) as err:
        path, lib = None, None
        log.debug("Dynamic-K kernel: %s", err)
    if lib is None:
        log.warning("Dynamic-K head: the CPU selection kernel %s did not compile with %s (set %s to a writable "
                    "folder, or %s=0 to silence this); using the pure-torch selection (same results, slower).",
                    SOURCE, compiler, ENV_CACHE, ENV_SWITCH)
        return None
    P, I = ctypes.c_void_p, ctypes.c_int
    lib.dynk_forward.argtypes = [P] * 7 + [I] * 6
    lib.dynk_backward.argtypes = [P] * 6 + [I] * 5
    for name in ("dynk_forward", "dynk_backward", "dynk_kmax", "dynk_lanes", "dynk_unit_max"):
        getattr(lib, name).restype = I
    # the kernel's compile-time limits, read once (applies/forward run on every call of the head)
    lib.kmax, lib.lanes, lib.unit_max = lib.dynk_kmax(), lib.dynk_lanes(), lib.dynk_unit_max()
    return lib


_local = threading.local()


def _scratch(numel: int) -> torch.Tensor:
    """A float32 work buffer kept per thread between calls: a fresh 1 MB tensor each call costs page faults."""
    buf = getattr(_local, "scratch", None)
    if buf is None or buf.numel() < numel:
        buf = _local.scratch = torch.empty(numel, dtype=torch.float32)
    return buf


def applies(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, k: int) -> bool:
    """Whether the kernel can take these inputs: float32 on the CPU, K <= 64, D <= 32767. (Whether x >= 0, which its
    bound needs, the kernel checks itself: `forward` returns None otherwise.)"""
    if not enabled() or x.device.type != "cpu" or x.dim() != 2 \
            or any(t.dtype != torch.float32 for t in (x, weight, bias)):
        return False
    lib = load()
    return lib is not None and k <= lib.kmax and x.shape[1] <= lib.unit_max


def forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, k: int
            ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(z [B, C] = sum of the K largest votes + bias, selected units [B, C, K] as int16), or None where x has a
    negative or non-finite entry (use the torch path). The caller checks `applies` first."""
    lib = load()
    x, weight, bias = x.detach().contiguous(), weight.detach().contiguous(), bias.detach().contiguous()
    (B, D), C = x.shape, weight.shape[0]
    Cp = -(-C // lib.lanes) * lib.lanes
    scratch = _scratch(D * Cp + 2 * Cp)  # W^T padded to Cp classes, the bound's weights, the padded bias
    out = torch.empty(B, C, dtype=torch.float32)
    index = torch.empty(B, C, k, dtype=torch.int16)
    status = lib.dynk_forward(x.data_ptr(), weight.data_ptr(), bias.data_ptr(), scratch.data_ptr(),
                              scratch.data_ptr() + 4 * D * Cp, out.data_ptr(), index.data_ptr(), B, D, C, Cp, k,
                              torch.get_num_threads())
    if status == 2:
        return None
    if status:
        raise RuntimeError(f"Dynamic-K kernel rejected B={B}, D={D}, C={C}, K={k}")
    return out, index


def backward(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, index: torch.Tensor, need_x: bool,
             need_w: bool) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Gradients of z w.r.t. x [B, D] and W [C, D] through the selected connections only."""
    lib = load()
    grad, x, weight = grad.contiguous(), x.detach().contiguous(), weight.detach().contiguous()
    (B, D), (C, K) = x.shape, (weight.shape[0], index.shape[-1])
    gx = torch.empty_like(x) if need_x else None
    gw = torch.empty_like(weight) if need_w else None
    lib.dynk_backward(grad.data_ptr(), x.data_ptr(), weight.data_ptr(), index.data_ptr(),
                      gx.data_ptr() if gx is not None else None, gw.data_ptr() if gw is not None else None,
                      B, D, C, K, torch.get_num_threads())
    return gx, gw
