"""Native CPU kernels, compiled on first use.

A layer's work between its linears (``layer.c``: norms, rope, KV cache writes, attention, SwiGLU), for every
float32 CPU forward; around the int4 linear it also runs a whole int4 draft layer's decode step.
Small-batch linears: the int4 weight-only linear of the draft's decode steps (``q4.c``: AVX2 and AVX-512
VNNI code for 1-4 rows) and the int8 linear of the target's decode steps and verifications, bit-identical to
FBGEMM's (``q8.c``: AVX2 code for 1-2 rows and AVX-512 VNNI code for 1-8). The target's GGUF Q4_K linears, read
as stored, for any row count (``q4k.c``: precision q4k). ``isa.c`` picks the code at run
time from the CPU; each kernel's two codes give the same bits. While one worker of the parallel runtime
waits for the other, a helper thread of the other's process on its core takes chunks of that process's linears
(``lend.c``: the target's int8 and Q4_K linears while the draft waits, the draft's int4 ones while the target
waits).

The C sources ship with the package and are compiled once, into one library, with the system C
compiler into the model cache (``$SPECBRANCH_CACHE/kernels``), keyed by a hash of the source and the
flags, then loaded with ``ctypes``. Compiling takes a few seconds. It needs an x86-64 CPU with AVX2,
FMA and F16C and a C compiler (``cc``/``gcc``); where either is missing :func:`unavailable` says why and
callers fall back to int8. ``$SPECBRANCH_KERNEL_ISA=avx2`` pins the AVX2 codes on a CPU that has AVX-512 VNNI
(with ``FBGEMM_ENABLE_INSTRUCTIONS=AVX2`` for torch's int8 linears): to check or time, on one machine and in every
worker process, what a CPU without VNNI runs. The library links the same ``libgomp.so.1`` torch has loaded, so it
shares torch's OpenMP thread pool and follows ``torch.set_num_threads``.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

SOURCES = tuple(Path(__file__).with_name(name) for name in ("isa.c", "layer.c", "lend.c", "q4.c", "q4k.c", "q8.c"))
HEADERS = tuple(Path(__file__).with_name(name) for name in ("lend.h", "simd.h"))  # hashed with the sources: a change rebuilds
# -ffp-contract=off: the compiler must not fuse a * b + c on its own. Each row-count specialization of the
# kernel is scheduled differently, and a contraction in one but not another would make a row's result
# depend on the batch it came in (caught by test_int4_linear_is_batch_and_thread_invariant).
# -Werror=incompatible-pointer-types: a kernel called through a pointer of the wrong type must not build (stop 26
# found fp16 scales passed as float pointers, silently).
FLAGS = ("-O3", "-mavx2", "-mfma", "-mf16c", "-ffp-contract=off", "-Werror=incompatible-pointer-types", "-fopenmp",
         "-shared", "-fPIC")


class KernelUnavailable(RuntimeError):
    """The native kernel cannot be built or run on this machine (the message says why)."""


def _cpuinfo(field: str) -> str:
    """The first ``field`` line of /proc/cpuinfo ("" where there is none, e.g. not Linux)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.split(":", 1)[0].strip() == field:
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def _cpu_flags() -> set[str]:
    return set(_cpuinfo("flags").split())


def cpu_model() -> str:
    """The CPU's model name (for benchmark reports: kernel speeds differ between CPUs)."""
    return _cpuinfo("model name") or platform.processor() or platform.machine()


def _compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


def _build_dir() -> Path:
    from ..models.registry import default_cache_dir

    return default_cache_dir() / "kernels"


ISA_ENV = "SPECBRANCH_KERNEL_ISA"  # "avx2" pins the AVX2 codes (library(), module docstring)


@functools.cache
def library() -> ctypes.CDLL:
    """The compiled kernel library (built on first use); :class:`KernelUnavailable` if it cannot be."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        raise KernelUnavailable(f"the native kernels are written for x86-64 AVX2 CPUs, this is {platform.machine()}")
    missing = {"avx2", "fma", "f16c"} - _cpu_flags()
    if missing:
        raise KernelUnavailable(f"the native kernels need a CPU with {', '.join(sorted(missing))}")
    cc = _compiler()
    if cc is None:
        raise KernelUnavailable("the native kernels are compiled on first use and no C compiler was found: "
                                "install gcc (e.g. apt-get install gcc) or set $CC")
    src = b"".join(path.read_bytes() for path in SOURCES + HEADERS)
    key = hashlib.sha256(src + " ".join(FLAGS).encode()).hexdigest()[:16]
    out = _build_dir() / f"kernels-{key}.so"
    if not out.is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)  # build aside, rename when complete
        os.close(fd)
        try:
            try:
                proc = subprocess.run([cc, *FLAGS, "-o", tmp, *map(str, SOURCES), "-lm"], capture_output=True, text=True)
            except OSError as e:
                raise KernelUnavailable(f"compiling the native kernels failed: cannot run the C compiler {cc!r} ({e})")
            if proc.returncode != 0:
                raise KernelUnavailable(f"compiling the native kernels with {cc} failed: {proc.stderr.strip()[-500:]}")
            os.replace(tmp, out)
        finally:
            Path(tmp).unlink(missing_ok=True)
    lib = ctypes.CDLL(str(out))
    p, i64, f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float
    lib.q4_linear_f32.argtypes = [p, i64, i64, p, p, p, i64, p]
    lib.q4_linear_f32.restype = ctypes.c_int
    lib.layers_step.argtypes = [p, i64, p, i64, i64, p, p, p, p, p]  # struct pointers: ctypes.byref
    lib.layers_step.restype = ctypes.c_int
    lib.layer_rms_norm.argtypes = [p, p, p, i64, i64, p, f32, p]
    lib.layer_rms_norm.restype = None
    lib.layer_attention.argtypes = [p, p, i64, i64, p, p, p, p]
    lib.layer_attention.restype = ctypes.c_int
    lib.layer_silu_mul.argtypes = [p, i64, i64, p]
    lib.layer_silu_mul.restype = None
    lib.q4k_linear_f32.argtypes = [p, i64, i64, p, p, p, p, i64, p]
    lib.q4k_linear_f32.restype = ctypes.c_int
    lib.q4k_pack.argtypes = [p, i64, i64, i64, p, p, p]
    lib.q4k_pack.restype = ctypes.c_int
    for name in ("q4k_quant_bytes", "q4k_sm_bytes", "q4k_dd_halves"):
        getattr(lib, name).argtypes = [i64, i64]
        getattr(lib, name).restype = i64
    lib.q8_linear_f32.argtypes = [p, i64, i64, p, p, p, f32, p, i64, p]
    lib.q8_linear_f32.restype = ctypes.c_int
    lib.q8_packed_size.argtypes = [i64, i64]
    lib.q8_packed_size.restype = i64
    lib.q8_padded_rows.argtypes = [i64]
    lib.q8_padded_rows.restype = i64
    lib.q8_pack.argtypes = [p, i64, i64, i64, p, p]
    lib.q8_pack.restype = None
    lib.q8_max_rows.argtypes = []
    lib.q8_max_rows.restype = ctypes.c_int
    lib.kernels_select_isa.argtypes = [ctypes.c_int]
    lib.kernels_select_isa.restype = ctypes.c_int
    lib.kernels_vnni.argtypes = []
    lib.kernels_vnni.restype = ctypes.c_int
    lib.lend_start.argtypes = [p, p, ctypes.c_int]
    lib.lend_start.restype = p
    for name in ("lend_stop", "lend_activate", "lend_offer", "lend_offer_quiet", "lend_reclaim"):
        getattr(lib, name).argtypes = [p]
        getattr(lib, name).restype = None
    lib.lend_active.argtypes = []
    lib.lend_active.restype = ctypes.c_int
    lib.lend_helped.argtypes = [p]
    lib.lend_helped.restype = ctypes.c_uint64
    isa = os.environ.get(ISA_ENV, "auto").strip().lower()
    if isa not in ("auto", "avx2"):
        raise ValueError(f"${ISA_ENV}={isa!r}: use 'avx2' (pin the AVX2 codes) or 'auto' (the best the CPU has)")
    lib.kernels_select_isa(isa == "auto")
    return lib


@functools.cache
def optional_library() -> ctypes.CDLL | None:
    """The library, or None where it cannot be built here: callers then take their torch path (FBGEMM for
    the int8 linear: the same results, only slower)."""
    try:
        return library()
    except KernelUnavailable:
        return None


def unavailable() -> str | None:
    """None if the native kernels can run here, else the reason they cannot."""
    try:
        library()
    except KernelUnavailable as e:
        return str(e)
    return None


def code_in_use() -> str:
    """Which code the int8, int4 and Q4_K kernels run here: "AVX-512 VNNI", "AVX2", or "none (<why>)"."""
    lib = optional_library()
    if lib is None:
        return f"none ({unavailable()})"
    return "AVX-512 VNNI" if lib.kernels_vnni() else "AVX2"
