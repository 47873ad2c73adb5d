"""Every Triton kernel compiles for real GPUs, here, without one: memcomp.kernels.aot captures the launches the
library makes at the configurations the GPU path uses and compiles them with Triton's compiler to cubin for
sm_90 (H100/H200) and sm_80 (A100). The interpreter that runs the other kernel tests never lowers a kernel, so
this is the only CPU check that the kernels build, fit in shared memory and (bf16/fp16 on sm_90) do not spill.
"""

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

triton = pytest.importorskip("triton")

KERNELS = {
    "_segment_mean_proj_fwd_kernel", "_segment_mean_proj_bwd_kernel", "_nf4_dequantize_fwd_kernel",
    "_nf4_lora_linear_fwd_kernel", "_packed_attention_fwd_kernel", "_packed_attention_bwd_dkdv_kernel",
    "_packed_attention_bwd_dq_kernel", "_packed_attention_bwd_delta_kernel",
}
ARCHS = (90, 80)


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(tool):
        pytest.skip(f"this triton wheel ships no NVIDIA toolchain ({tool} missing)")
    out = tmp_path_factory.mktemp("aot")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(out / "cache")  # compile for real, not from an earlier run's cache

    def run(arch):
        path = out / f"sm{arch}.json"
        proc = subprocess.run([sys.executable, "-m", "memcomp.kernels.aot", "--arch", str(arch), "--json", str(path)],
                              env=env, capture_output=True, text=True, timeout=900, cwd=str(out))
        return arch, proc, path

    with ThreadPoolExecutor(len(ARCHS)) as pool:
        results = list(pool.map(run, ARCHS))
    data = {}
    for arch, proc, path in results:
        if proc.returncode == 3:  # memcomp.kernels.aot: this triton's JIT internals moved (not our kernels)
            pytest.skip(proc.stderr.strip().splitlines()[-1])
        assert path.exists(), f"sm_{arch}: no report\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
        data[arch] = (proc, json.loads(path.read_text()))
    return data


@pytest.mark.parametrize("arch", ARCHS)
def test_every_kernel_compiles_and_fits(reports, arch):
    proc, data = reports[arch]
    names = {k["kernel"] for k in data["kernels"]}
    assert names == KERNELS, f"kernels compiled: {sorted(names)}"
    over = [k for k in data["kernels"] if k["shared_bytes"] > {90: 232448, 80: 166912}[arch]]
    assert not over, over
    assert proc.returncode == 0, proc.stdout[-3000:]
    # every flag combination the launchers use was compiled, not just one per kernel
    assert len(data["kernels"]) >= 40


def test_no_register_spills_in_bf16_fp16_on_sm90(reports):
    _, data = reports[90]
    spilling = [(k["kernel"], k["case"], k["local_bytes"] + k["stack_bytes"]) for k in data["kernels"]
                if "float32" not in k["case"] and (k["local_bytes"] or k["stack_bytes"])]
    assert not spilling, spilling


def test_compile_report_is_from_the_launch_configuration(reports):
    """The report carries the launchers' real choices (a wrong capture would compile defaults)."""
    _, data = reports[90]
    dkdv = [k for k in data["kernels"] if k["kernel"] == "_packed_attention_bwd_dkdv_kernel"
            and "D=128 bfloat16" in k["case"]]
    assert dkdv and all(k["num_warps"] == 8 and "BLOCK_M=32" in k["constexprs"] for k in dkdv), dkdv
    decode = [k for k in data["kernels"] if k["kernel"] == "_nf4_lora_linear_fwd_kernel"]
    assert decode and all(k["num_warps"] == 8 and k["num_stages"] == 2 for k in decode)
    assert all("*bf16" in k["signature"] for k in data["kernels"] if "bfloat16" in k["case"])


def test_nf4_kernels_round_like_bitsandbytes(reports):
    """bitsandbytes decodes a nested absmax as code2[q] * absmax2, rounded, then + offset, rounded; the GPU
    build must not contract that into an FMA (the interpreter never does, so only the compiled code shows it)."""
    _, data = reports[90]
    # (the fp32 decode kernel's IEEE tl.dot is itself a loop of FMAs, so it is not counted)
    nf4 = [k for k in data["kernels"] if k["kernel"] == "_nf4_dequantize_fwd_kernel"
           or k["kernel"] == "_nf4_lora_linear_fwd_kernel" and "float32" not in k["case"]]
    assert len(nf4) >= 12 and all(k["fma_f32"] == 0 for k in nf4), [(k["case"], k["fma_f32"]) for k in nf4]
    attention = [k for k in data["kernels"] if k["kernel"] == "_packed_attention_fwd_kernel"]
    assert any(k["fma_f32"] > 0 for k in attention)  # elsewhere the compiler does fuse: the count is real


def test_occupancy_bound():
    """The static occupancy bound on worked cases (sm_90: 64K registers, 228 KB shared memory, 64 warps per SM)."""
    from memcomp.kernels.aot import occupancy

    assert occupancy(32, 0, 4, 90) == 1.0                 # 16 blocks of 4 warps fill the SM
    assert occupancy(128, 0, 4, 90) == 0.25               # 128 x 32 x 4 = 16K registers a block: 4 blocks
    assert occupancy(255, 0, 8, 90) == 0.125              # rounded to 256 per thread: 1 block of 8 warps
    assert occupancy(64, 113 * 1024, 4, 90) == 2 * 4 / 64  # shared memory: 2 blocks of 114 KB
    assert occupancy(32, 0, 4, 89) == 1.0 and occupancy(32, 0, 8, 89) == 1.0  # 48 warps per SM there
