r"""Ahead-of-time compile of every memcomp Triton kernel for a GPU architecture, on any machine (no GPU needed).

The Triton interpreter runs our kernels on the CPU but never lowers them, so a kernel the interpreter accepts
can still fail to compile for a GPU (type rules, layouts, shared memory) or compile into register spills. This
module runs each launcher at the configurations the GPU path uses (Qwen2.5-7B/32B widths, head dim 128 and 64,
bf16/fp16/fp32, every flag combination the library launches) with the launches *captured instead of run*, then
compiles each distinct launch with Triton's own compiler for the target architecture, all the way to cubin, and
reads registers, local memory (spills), stack and shared memory off the cubin with the ``cuobjdump`` that ships
with Triton.

    python -m memcomp.kernels.aot                  # sm_90 (H100 / H200), a table on stdout
    python -m memcomp.kernels.aot --arch 80 --json aot_sm80.json
    python -m memcomp.kernels.aot --only packed_attention

Specialisation is Triton's own: the captured arguments go through the same binder and ``_pack_args`` calls that
``JITFunction.run`` makes, so the signature, constexprs and divisibility attributes are those a GPU launch would
compile (pointer alignment is read off the captured tensors' addresses, as on a GPU). Must run without
``TRITON_INTERPRET=1`` (under the interpreter ``triton.jit`` builds interpreted functions that cannot be
lowered); ``tests/kernels/test_aot.py`` runs it in a subprocess.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator

import torch

__all__ = ["Launch", "KernelReport", "capture_launches", "representative_launches", "compile_launch",
           "compile_all", "SHARED_LIMIT_BYTES", "TritonInternalsChanged"]

# Largest shared memory one block may use (opt-in maximum), and shared memory per SM, by compute capability.
SHARED_LIMIT_BYTES = {80: 166912, 86: 101376, 89: 101376, 90: 232448, 100: 232448, 120: 101376}
SHARED_PER_SM_BYTES = {80: 167936, 86: 102400, 89: 102400, 90: 233472, 100: 233472, 120: 102400}
MAX_REGISTERS = 255


def occupancy(registers: int, shared_bytes: int, num_warps: int, arch: int) -> float:
    """Resident warps per SM over the 64 possible (48 on sm_86/89/120), from registers (65,536 per SM, allocated
    per warp in units of 256), shared memory (plus 1 KB reserved per block) and the blocks-per-SM limit."""
    max_warps = 48 if arch in (86, 89, 120) else 64
    max_blocks = {86: 16, 89: 24, 120: 24}.get(arch, 32)
    per_warp = -(-registers * 32 // 256) * 256
    blocks = min(max_blocks, max_warps // num_warps, 65536 // max(1, per_warp * num_warps))
    if shared_bytes:
        blocks = min(blocks, SHARED_PER_SM_BYTES.get(arch, 102400) // (shared_bytes + 1024))
    return blocks * num_warps / max_warps


@dataclasses.dataclass
class Launch:
    """One captured ``kernel[grid](*args, **kwargs)``; ``case`` names the configuration that launched it."""
    kernel: object
    grid: object
    args: tuple
    kwargs: dict
    case: str


@dataclasses.dataclass
class KernelReport:
    kernel: str
    case: str
    signature: str            # the non-constexpr argument types, in order
    constexprs: str           # NAME=value, in order
    num_warps: int
    num_stages: int
    registers: int            # per thread
    local_bytes: int          # per thread: register spills (and local arrays); 0 is the goal
    stack_bytes: int
    shared_bytes: int         # static (cubin) + dynamic (Triton's request at launch)
    fma_f32: int              # fp32 fused multiply-adds in the PTX (bit-exactness checks against unfused code)
    occupancy: float          # resident warps per SM / the maximum (a static bound, not a measurement)
    compile_s: float

    def errors(self, arch: int) -> list[str]:
        """What would stop the launch on sm_<arch>."""
        out = []
        limit = SHARED_LIMIT_BYTES.get(arch)
        if limit is not None and self.shared_bytes > limit:
            out.append(f"shared memory {self.shared_bytes} B > {limit} B (sm_{arch})")
        if self.registers > MAX_REGISTERS:
            out.append(f"{self.registers} registers > {MAX_REGISTERS}")
        return out

    def warnings(self) -> list[str]:
        """What costs speed: register spills to local memory."""
        if self.local_bytes or self.stack_bytes:
            return [f"spills {self.local_bytes + self.stack_bytes} B/thread"]
        return []


def _triton():
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("memcomp.kernels.aot: TRITON_INTERPRET=1 is set; the interpreter's kernels cannot be "
                           "compiled. Run without it (python -m memcomp.kernels.aot).")
    try:
        import triton
        from triton.runtime.jit import JITFunction
    except ImportError as e:  # pragma: no cover
        raise RuntimeError("memcomp.kernels.aot needs triton (pip install triton)") from e
    return triton, JITFunction


@contextlib.contextmanager
def capture_launches(case: str, sink: list[Launch]) -> Iterator[None]:
    """Inside the block, every Triton launch is recorded into ``sink`` and not run (outputs stay unwritten)."""
    _, JITFunction = _triton()
    original = JITFunction.run

    def record(self, *args, grid, warmup, **kwargs):
        sink.append(Launch(self, grid, args, dict(kwargs), case))
        return None

    JITFunction.run = record
    try:
        yield
    finally:
        JITFunction.run = original


def _module(name: str):
    # The package re-exports functions under the module names (memcomp.kernels.segment_mean_proj is a function
    # attribute), so import the submodules by their full names.
    return importlib.import_module(f"memcomp.kernels.{name}")


def _segment_mean_proj_cases() -> Iterator[tuple[str, Callable[[], None]]]:
    smp = _module("segment_mean_proj")
    for d in (3584, 5120):  # Qwen2.5-7B, -32B hidden sizes
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            for has_norm in (True, False):
                for store_mean in (True, False):
                    def fwd(d=d, dtype=dtype, has_norm=has_norm, store_mean=store_mean):
                        h = torch.zeros(48, d, dtype=dtype)
                        cu = torch.tensor([0, 16, 32, 48], dtype=torch.int32)
                        g = torch.ones(d, dtype=dtype) if has_norm else None
                        pooled, _, rstd = smp.segment_mean_proj_forward(h, cu, g, 1e-6, store_mean)
                        smp.segment_mean_proj_backward(torch.zeros_like(pooled), h, cu, g, rstd)
                    yield (f"segment_mean_proj d={d} {str(dtype)[6:]} norm={has_norm} mean={store_mean}", fwd)


def _nf4_cases() -> Iterator[tuple[str, Callable[[], None]]]:
    deq = _module("nf4_dequantize")
    lin = _module("nf4_lora_linear")
    for K, N in ((3584, 18944), (18944, 3584), (5120, 27648)):  # 7B up/down projections, 32B up projection
        w = torch.zeros(16, K)  # values do not matter; only the launch configuration does
        packed, absmax = deq.nf4_quantize_reference(w, 64)
        nested = deq.quantize_absmax_nested(absmax)
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            for double_quant in (True, False):
                q, a2, c2, off = nested if double_quant else (absmax, None, None, None)

                def dequant(dtype=dtype, q=q, a2=a2, c2=c2, off=off, packed=packed, K=K):
                    deq.nf4_dequantize_forward(packed, q, (16, K), 64, dtype, a2, c2, off)
                    # into the left part of a [N, K + r] scratch (the training path's LoRA fold)
                    buf = torch.empty(16, K + 16, dtype=dtype)
                    deq.nf4_dequantize_forward(packed, q, (16, K), 64, dtype, a2, c2, off, out=buf[:, :K])
                yield f"nf4_dequantize K={K} {str(dtype)[6:]} dq={double_quant}", dequant
                for r, bias in ((16, True), (64, False)):
                    def decode(dtype=dtype, q=q, a2=a2, c2=c2, off=off, packed=packed, K=K, N=N, r=r, bias=bias):
                        x = torch.zeros(4, K, dtype=dtype)
                        A = torch.zeros(r, K, dtype=dtype)
                        B = torch.zeros(N, r, dtype=dtype)
                        b = torch.zeros(N, dtype=dtype) if bias else None
                        lin.nf4_lora_linear_forward(x, None, packed, q, a2, c2, off, N, K, 64, A, B, 2.0, b)
                    yield (f"nf4_lora_linear decode K={K} N={N} r={r} {str(dtype)[6:]} dq={double_quant} "
                           f"bias={bias}"), decode


def _packed_attention_cases() -> Iterator[tuple[str, Callable[[], None]]]:
    att = _module("packed_attention")
    # (Hq, Hkv, D): Qwen2.5-7B, Qwen2.5-32B, the D = 64 of small models, and D = 256 (Gemma-style; bf16 only)
    for hq, hkv, D in ((28, 4, 128), (40, 8, 128), (14, 2, 64), (8, 4, 256)):
        for dtype in (torch.bfloat16, torch.float16, torch.float32) if D <= 128 else (torch.bfloat16,):
            # fp32 (IEEE products, a test path) compiles slowly: its causal build stands for both
            for causal in (True, False) if dtype != torch.float32 else (True,):
                def run(hq=hq, hkv=hkv, D=D, dtype=dtype, causal=causal):
                    T = 80
                    q = torch.zeros(T, hq, D, dtype=dtype)
                    k = torch.zeros(T, hkv, D, dtype=dtype)
                    v = torch.zeros(T, hkv, D, dtype=dtype)
                    cu = torch.tensor([0, 16, 80], dtype=torch.int32)
                    seg = att.segment_ids(cu, T)
                    out, lse = att.packed_attention_forward(q, k, v, cu, seg, causal, D ** -0.5)
                    att.packed_attention_backward(torch.zeros_like(q), q, k, v, out, lse, cu, seg, causal, D ** -0.5)
                yield f"packed_attention Hq={hq} Hkv={hkv} D={D} {str(dtype)[6:]} causal={causal}", run


def representative_launches() -> list[Launch]:
    """Every launch the library makes at the configurations the GPU path uses, captured (nothing runs)."""
    launches: list[Launch] = []
    for cases in (_segment_mean_proj_cases, _nf4_cases, _packed_attention_cases):
        for case, fn in cases():
            with capture_launches(case, launches):
                fn()
    return launches


class TritonInternalsChanged(RuntimeError):
    """This Triton's JIT internals differ from the ones this module drives (checked with triton 3.6 and 3.9)."""


def _specialize(launch: Launch, backend):
    """Triton's own specialisation of one launch: (signature, constexprs, attrs, options)."""
    import triton

    try:
        from triton.runtime.jit import create_function_from_signature

        kernel = launch.kernel
        binder = create_function_from_signature(kernel.signature, kernel.params, backend)
        kwargs = dict(launch.kwargs)
        kwargs.setdefault("debug", False)
        bound_args, specialization, options = binder(*launch.args, **kwargs)
        options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound_args, specialization,
                                                                  options)
    except (ImportError, AttributeError, TypeError, ValueError) as e:
        raise TritonInternalsChanged(
            f"memcomp.kernels.aot drives Triton's JIT binder (create_function_from_signature, "
            f"JITFunction._pack_args), checked with triton 3.6 and 3.9; triton {triton.__version__} differs: "
            f"{type(e).__name__}: {e}") from e
    return signature, constexprs, attrs, options


def _resource_usage(cubin: bytes, name: str) -> dict[str, int]:
    triton, _ = _triton()
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(tool):
        raise RuntimeError(f"memcomp.kernels.aot: {tool} not found (this triton wheel ships no cuobjdump)")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        text = subprocess.run([tool, "-res-usage", path], capture_output=True, text=True, check=True).stdout
    # " Function <name>:\n  REG:96 STACK:0 SHARED:1024 LOCAL:0 CONSTANT[0]:616 ..."
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if line.strip() == f"Function {name}:" and i + 1 < len(lines):
            fields = dict(f.split(":", 1) for f in lines[i + 1].split() if ":" in f)
            return {k: int(fields[k]) for k in ("REG", "STACK", "SHARED", "LOCAL")}
    raise RuntimeError(f"memcomp.kernels.aot: no resource usage for {name} in cuobjdump's output:\n{text}")


def compile_launch(launch: Launch, arch: int = 90) -> KernelReport:
    """Compile one captured launch for ``sm_<arch>`` down to cubin and read its resources."""
    triton, _ = _triton()
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend

    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    signature, constexprs, attrs, options = _specialize(launch, backend)
    t0 = time.perf_counter()
    compiled = triton.compile(ASTSource(launch.kernel, signature, constexprs, attrs), target=target,
                              options=options.__dict__)
    seconds = time.perf_counter() - t0
    usage = _resource_usage(compiled.asm["cubin"], compiled.metadata.name)
    names = launch.kernel.arg_names
    consts = {names[path[0]]: v for path, v in constexprs.items() if len(path) == 1}
    return KernelReport(
        kernel=compiled.metadata.name, case=launch.case,
        signature=",".join(t for t in signature.values() if t != "constexpr"),
        constexprs=" ".join(f"{k}={consts[k]}" for k in names if k in consts),
        num_warps=compiled.metadata.num_warps, num_stages=compiled.metadata.num_stages,
        registers=usage["REG"], local_bytes=usage["LOCAL"], stack_bytes=usage["STACK"],
        shared_bytes=usage["SHARED"] + compiled.metadata.shared, fma_f32=compiled.asm["ptx"].count("fma.rn.f32"),
        occupancy=occupancy(usage["REG"], usage["SHARED"] + compiled.metadata.shared, compiled.metadata.num_warps,
                            arch),
        compile_s=seconds)


def _key(launch: Launch, backend) -> str:
    signature, constexprs, attrs, options = _specialize(launch, backend)
    return repr((launch.kernel.fn.__qualname__, sorted(signature.items()), sorted(constexprs.items()),
                 sorted(attrs.items()), sorted((k, repr(v)) for k, v in vars(options).items())))


def compile_all(arch: int = 90, only: str | None = None, progress: bool = True) -> list[KernelReport]:
    """Compile every distinct representative launch for ``sm_<arch>`` (those whose case contains ``only``, if
    given); one report per distinct launch."""
    _triton()
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend

    backend = make_backend(GPUTarget("cuda", arch, 32))
    distinct: dict[str, Launch] = {}
    for launch in representative_launches():
        if only is not None and only not in launch.case:
            continue
        distinct.setdefault(_key(launch, backend), launch)
    reports = []
    for i, launch in enumerate(distinct.values()):
        if progress:
            print(f"[{i + 1}/{len(distinct)}] {launch.kernel.fn.__name__}  ({launch.case})", file=sys.stderr,
                  flush=True)
        reports.append(compile_launch(launch, arch))
    return reports


def format_table(reports: list[KernelReport], arch: int) -> str:
    rows = ["| kernel | first case | warps | stages | regs | spill B | smem KB | occupancy | notes |",
            "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in reports:
        rows.append(f"| {r.kernel} | {r.case} | {r.num_warps} | {r.num_stages} | {r.registers} | "
                    f"{r.local_bytes + r.stack_bytes} | {r.shared_bytes / 1024:.1f} | {r.occupancy:.0%} | "
                    f"{'; '.join(r.errors(arch) + r.warnings()) or '-'} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m memcomp.kernels.aot", description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", type=int, default=90, help="compute capability x 10 (90 = H100/H200, 80 = A100)")
    p.add_argument("--only", help="compile only the cases whose name contains this (e.g. packed_attention)")
    p.add_argument("--json", help="also write every report to this JSON file")
    args = p.parse_args(argv)
    triton, _ = _triton()
    try:
        reports = compile_all(args.arch, args.only)
    except TritonInternalsChanged as e:
        print(e, file=sys.stderr)
        return 3
    print(f"memcomp kernels compiled for sm_{args.arch} with triton {triton.__version__}: {len(reports)} distinct "
          "launches\n")
    print(format_table(reports, args.arch))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"arch": args.arch, "triton": triton.__version__, "torch": torch.__version__,
                       "kernels": [dataclasses.asdict(r) for r in reports]}, f, indent=1)
    # Exit status 1 when a kernel could not launch on this architecture; spills are reported, not fatal (the
    # fp32 kernels exist for tests; tests/kernels/test_aot.py holds bf16/fp16 on sm_90 to zero spills).
    return 1 if any(r.errors(args.arch) for r in reports) else 0


if __name__ == "__main__":
    sys.exit(main())
