"""The one-token product through 4-bit tables in shared memory: ``lut_gemv.cu``, CUDA C compiled at first use.

Why CUDA C and not Triton: the kernel's inner step is one shared-memory load at a run-time index per 4 signs
(T[group][nibble]), which Triton cannot express without shuffles or global scratch (docs/KERNELS.md, session 11:
7 and 2 instructions per sign against this kernel's 1). The source is compiled by NVRTC, the runtime compiler that
ships with PyTorch's CUDA wheels (``nvidia-cuda-nvrtc``), so no CUDA toolkit is needed; kernels are launched
through the CUDA driver with ``ctypes``, with programmatic dependent launch (PDL) behind the router on sm_90.

Where NVRTC or the driver call is missing, ``lut_gemv_ready`` says why and the Triton one-token GEMV runs instead
(``binarymos.kernels.triton_kernels``). Like the Triton kernels the launches never synchronise with the host, so
CUDA graphs capture them; the split-K arrival counts are shared with the Triton decode kernels (one buffer per
device: two calls must not run concurrently on different streams of one device).
"""
from __future__ import annotations

import ctypes
import functools
import glob
import os
import sys
from pathlib import Path

import torch

ROUTER_THREADS, ROUTER_CHUNK = 256, 2048  # inputs per router block: at most 7 partials at in = 14336
MAX_SHARED = 48 * 1024  # bytes of dynamic shared memory without opting in
# ROWS: output rows a block (one a thread); SPLITS: blocks of a cluster sharing K (lut_gemv_cluster), or CHUNK: inputs
# a block behind a router launch (lut_gemv)
LUT_CONFIGS = ([{"ROWS": r, "SPLITS": s} for r in (64, 128, 256) for s in (4, 8, 16)]
               + [{"ROWS": 128, "CHUNK": 512}, {"ROWS": 256, "CHUNK": 1024}])


class LutUnavailable(RuntimeError):
    """The CUDA LUT kernel cannot run here (no NVRTC, no driver entry point, an old GPU)."""


def _load_first(names: list[str]) -> ctypes.CDLL:
    for name in names:
        try:
            return ctypes.CDLL(name)
        except OSError:
            continue
    raise LutUnavailable(f"none of {names} loads")


@functools.cache
def _nvrtc() -> ctypes.CDLL:
    """libnvrtc: the one PyTorch's CUDA wheels bring (site-packages/nvidia/*/lib, torch's CUDA major first), else
    the system's."""
    major = (torch.version.cuda or "").split(".")[0]
    wheel_libs = sorted((p for d in sys.path for p in glob.glob(os.path.join(d, "nvidia", "*", "lib", "libnvrtc.so.*"))),
                        key=lambda p: not p.endswith(f".so.{major}"))
    for lib in wheel_libs:
        try:
            for builtins in glob.glob(os.path.join(os.path.dirname(lib), "libnvrtc-builtins.so.*")):
                ctypes.CDLL(builtins, mode=ctypes.RTLD_GLOBAL)  # NVRTC opens it by name: load it first
            return ctypes.CDLL(lib)
        except OSError:
            continue
    return _load_first([f"libnvrtc.so.{major}", "libnvrtc.so"])


@functools.cache
def _driver() -> ctypes.CDLL:
    return _load_first(["libcuda.so.1", "libcuda.so"])


def _check(result: int, what: str) -> None:
    if result != 0:
        text = ctypes.c_char_p()
        _driver().cuGetErrorString(result, ctypes.byref(text))
        raise RuntimeError(f"{what} failed: CUDA error {result} ({(text.value or b'?').decode()})")


@functools.cache
def compile_lut(arch: int, **defines: int) -> tuple[bytes, str]:
    """(cubin, compiler log) of lut_gemv.cu for sm_<arch> with the -D constants ``defines``; the log holds
    ptxas's register and spill report."""
    lib = _nvrtc()
    source = (Path(__file__).with_name("lut_gemv.cu")).read_text().encode()
    prog = ctypes.c_void_p()
    if lib.nvrtcCreateProgram(ctypes.byref(prog), source, b"lut_gemv.cu", 0, None, None):
        raise LutUnavailable("nvrtcCreateProgram failed")
    options = [f"--gpu-architecture=sm_{arch}", "-std=c++17", "--ptxas-options=-v"]
    options += [f"-D{k}={int(v)}" for k, v in sorted(defines.items())]
    c_options = (ctypes.c_char_p * len(options))(*(o.encode() for o in options))
    try:
        status = lib.nvrtcCompileProgram(prog, len(options), c_options)
        size = ctypes.c_size_t()
        lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
        log = ctypes.create_string_buffer(size.value)
        lib.nvrtcGetProgramLog(prog, log)
        log_text = log.value.decode(errors="replace")
        if status:
            raise RuntimeError(f"lut_gemv.cu did not compile for sm_{arch} with {defines}:\n{log_text}")
        lib.nvrtcGetCUBINSize(prog, ctypes.byref(size))
        cubin = ctypes.create_string_buffer(size.value)
        lib.nvrtcGetCUBIN(prog, cubin)
        return cubin.raw, log_text
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(prog))


class _LaunchAttribute(ctypes.Structure):  # CUlaunchAttribute: id, padding, a 64-byte value union
    _fields_ = [("id", ctypes.c_int), ("pad", ctypes.c_char * 4), ("value", ctypes.c_int), ("rest", ctypes.c_char * 60)]


class _LaunchConfig(ctypes.Structure):  # CUlaunchConfig
    _fields_ = [("grid", ctypes.c_uint * 3), ("block", ctypes.c_uint * 3), ("shared", ctypes.c_uint),
                ("stream", ctypes.c_void_p), ("attrs", ctypes.POINTER(_LaunchAttribute)), ("num_attrs", ctypes.c_uint)]


PROGRAMMATIC_STREAM_SERIALIZATION = 6  # CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION


FUNC_MAX_DYNAMIC_SHARED, FUNC_NON_PORTABLE_CLUSTER_SIZE_ALLOWED = 8, 14  # CU_FUNC_ATTRIBUTE_*


class _Kernels:
    """The kernels of one compiled variant (lut_gemv and lut_router, or lut_gemv_cluster), loaded into the current
    device's context."""

    def __init__(self, cubin: bytes, names: tuple[str, ...], shared: int, cluster: int):
        drv = _driver()
        self.module = ctypes.c_void_p()
        _check(drv.cuModuleLoadData(ctypes.byref(self.module), cubin), "cuModuleLoadData")
        self.functions = {}
        for name in names:
            fn = ctypes.c_void_p()
            _check(drv.cuModuleGetFunction(ctypes.byref(fn), self.module, name.encode()), "cuModuleGetFunction")
            self.functions[name] = fn
        if shared > MAX_SHARED:
            _check(drv.cuFuncSetAttribute(self.functions[names[0]], FUNC_MAX_DYNAMIC_SHARED, shared),
                   "cuFuncSetAttribute")
        if cluster > 8:  # more than the portable cluster size: Hopper takes 16
            _check(drv.cuFuncSetAttribute(self.functions[names[0]], FUNC_NON_PORTABLE_CLUSTER_SIZE_ALLOWED, 1),
                   "cuFuncSetAttribute")

    def launch(self, name: str, grid, block: int, shared: int, args: list, pdl: bool = False) -> None:
        values = [ctypes.c_void_p(a.data_ptr()) if isinstance(a, torch.Tensor) else ctypes.c_int(a) for a in args]
        params = (ctypes.c_void_p * len(values))(*(ctypes.cast(ctypes.byref(v), ctypes.c_void_p) for v in values))
        attr = _LaunchAttribute(id=PROGRAMMATIC_STREAM_SERIALIZATION, value=1)
        cfg = _LaunchConfig(grid=(ctypes.c_uint * 3)(*grid, *[1] * (3 - len(grid))), block=(ctypes.c_uint * 3)(block, 1, 1),
                            shared=shared, stream=torch.cuda.current_stream().cuda_stream,
                            attrs=ctypes.pointer(attr) if pdl else None, num_attrs=int(pdl))
        _check(_driver().cuLaunchKernelEx(ctypes.byref(cfg), self.functions[name], params, None), f"launching {name}")


_loaded: dict[tuple, _Kernels] = {}


def _kernels(device: torch.device, arch: int, shared: int, **defines: int) -> _Kernels:
    key = (device.index, arch, tuple(sorted(defines.items())))
    if key not in _loaded:
        names = ("lut_gemv_cluster",) if defines["CLUSTER"] else ("lut_gemv", "lut_router")
        with torch.cuda.device(device):
            _loaded[key] = _Kernels(compile_lut(arch, **defines)[0], names, shared, defines["SPLITS"])
    return _loaded[key]


def lut_config(N: int, K: int, major: int = 9) -> dict:
    """Rows and inputs a block of the LUT kernel. {"ROWS": r, "SPLITS": s}: lut_gemv_cluster, K in s chunks (sm_90);
    {"ROWS": r, "CHUNK": c}: lut_gemv behind a router launch. BINARYMOS_LUT_CONFIG="ROWS=..,SPLITS=.." replaces it
    (GPU sweeps). ``major``: the GPU's compute capability; clusters need sm_90."""
    env = os.environ.get("BINARYMOS_LUT_CONFIG")
    if env:
        return {k.strip(): int(v) for k, v in (item.split("=") for item in env.split(",") if item.strip())}
    return {"ROWS": 128, "SPLITS": 8} if major >= 9 else {"ROWS": 128, "CHUNK": 512}


def weight_vector_bytes(packed_weight: torch.Tensor, chunk: int = 128) -> int:
    """Widest load (16, 8 or 4 bytes) that every row's chunks of ``chunk`` inputs start aligned to and divide into;
    0: rows are not whole int32 words."""
    KB = packed_weight.shape[1]
    if packed_weight.stride() != (KB, 1):
        return 0
    for vec in (16, 8, 4):
        if KB % vec == 0 and packed_weight.data_ptr() % vec == 0 and chunk // 8 % vec == 0:
            return vec
    return 0


def cluster_chunk(K: int, splits: int) -> int:
    """Inputs a block of lut_gemv_cluster: K in ``splits`` chunks, each a multiple of 128 inputs (16-byte loads)
    where that leaves no block without inputs, else of 32."""
    step = 128 if K >= 128 * splits else 32
    return step * -(-K // (step * splits))


def lut_gemv_ready(x2: torch.Tensor, packed_weight: torch.Tensor, *params: torch.Tensor | None) -> str | None:
    """None if lut_gemv can compute this call, else why not (one line). ``params``: the router, scales and bias,
    which the kernel reads in x's dtype."""
    if not x2.is_cuda or x2.dtype not in (torch.float16, torch.bfloat16) or x2.shape[0] != 1:
        return "one token of fp16 or bf16 on a CUDA device only"
    if any(p is not None and p.dtype != x2.dtype for p in params):
        return "router, scales and bias must have x's dtype"
    if torch.cuda.get_device_capability(x2.device) < (8, 0):
        return "needs sm_80 or newer (bf16 conversions)"
    if not weight_vector_bytes(packed_weight):
        return "packed rows are not whole aligned int32 words"
    try:
        _nvrtc(), _driver().cuLaunchKernelEx
    except (LutUnavailable, AttributeError) as err:
        return f"NVRTC or the CUDA driver's cuLaunchKernelEx is missing ({err})"
    return None


def lut_gemv(x2: torch.Tensor, packed_weight: torch.Tensor, router: torch.Tensor | None, scale_in: torch.Tensor,
             scale_out: torch.Tensor, bias: torch.Tensor | None, y: torch.Tensor, counts: torch.Tensor,
             config: dict | None = None) -> None:
    """y (1, N) = the packed layer of one token x2 (1, K). With SPLITS in the config (lut_config): one launch of
    lut_gemv_cluster; with CHUNK: the router's partial logits (E > 1), then lut_gemv (as the router's programmatic
    dependent on sm_90). ``counts``: int32 zeros, one per row block, left at zero."""
    N, KB = packed_weight.shape
    K, E = x2.shape[1], scale_in.shape[0]
    major, minor = torch.cuda.get_device_capability(x2.device)
    cfg = config or lut_config(N, K, major)
    rows, cluster = cfg["ROWS"], cfg.get("SPLITS", 0)
    if cluster:
        if major < 9 or cluster & (cluster - 1) or rows % cluster or cluster > 16:
            raise ValueError(f"lut_gemv: SPLITS must be a power of two <= 16 dividing ROWS, on sm_90; got {cfg}")
        chunk = cluster_chunk(K, cluster)
    else:
        chunk = cfg["CHUNK"]
        if chunk % 32:
            raise ValueError(f"lut_gemv: CHUNK must be a multiple of 32, got {cfg}")
    pdl = not cluster and E > 1 and major >= 9
    shared = 16 * chunk  # chunk / 4 groups x 16 fp32 sums
    kernels = _kernels(x2.device, 10 * major + minor, shared, ROWS=rows, CHUNK=chunk,
                       VEC=weight_vector_bytes(packed_weight, chunk), EXPERTS=E, BF16=x2.dtype == torch.bfloat16,
                       HAS_BIAS=bias is not None, PDL=pdl, ROUTER_THREADS=ROUTER_THREADS, ROUTER_CHUNK=ROUTER_CHUNK,
                       CLUSTER=bool(cluster), SPLITS=cluster)
    x2, scale_in, scale_out = x2.contiguous(), scale_in.contiguous(), scale_out.contiguous()
    router = router.contiguous() if E > 1 else y  # an unread placeholder without a router
    bias = y if bias is None else bias
    row_blocks, splits = -(-N // rows), -(-K // chunk)
    if cluster:
        kernels.launch("lut_gemv_cluster", (row_blocks, cluster), rows, shared,
                       [x2, packed_weight, router, scale_in, scale_out, bias, y, N, K, KB])
        return
    partials, logits = 0, y
    if E > 1:
        partials = -(-K // ROUTER_CHUNK)
        logits = torch.empty((partials, E), device=x2.device, dtype=torch.float32)
        kernels.launch("lut_router", (partials,), ROUTER_THREADS, 0, [x2, router, logits, K])
    partial = torch.empty((splits, N), device=x2.device, dtype=torch.float32) if splits > 1 else y
    kernels.launch("lut_gemv", (row_blocks, splits), rows, shared,
                   [x2, packed_weight, logits, partials, scale_in, scale_out, bias, y, partial, counts, N, K, KB],
                   pdl=pdl)
