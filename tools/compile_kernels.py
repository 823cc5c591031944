"""Compile every Triton kernel, under each launch candidate its autotuner holds, for a
GPU architecture on a machine without one, and report what the GPU would run:
registers per thread, spilled bytes (stack), shared memory.

Triton compiles to a cubin with its own bundled ptxas, which needs no GPU; its
cuobjdump reads the resource usage back. This catches code that does not compile on
this Triton (as Triton 3.6's gather assertion did) and launches that spill registers,
before any device time is spent. Shapes are the paper's (k=32, n_keys=1024, half-key
dim 128, bf16, value dims 1024 and 2048): a kernel is specialised by its constexprs
and argument dtypes only, and the integer arguments get the 16-divisibility hints a
launch at those shapes would.

  python tools/compile_kernels.py                  # all kernels, sm_90 (H100/H200)
  python tools/compile_kernels.py --kernels pkm_bwd_rows pkm_bwd_keys --arch 90 --json out.json

Exit status 1 if a launch fails to compile; spills are reported, not failed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    sys.exit("compile_kernels: unset TRITON_INTERPRET (the interpreter compiles nothing)")

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import re  # noqa: E402

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from kernels import bag_triton, pkm_bwd_triton, pkm_triton  # noqa: E402
from kernels import launch_configs as lc  # noqa: E402
from pretrain.cli import output_file, positive_int  # noqa: E402
from pretrain.files import atomic_write  # noqa: E402

K, P = 32, 128  # P: the candidate-pair table for k=32 (119 pairs, padded)
HINTED = ("stride", "half", "D", "M_T", "M")  # integer arguments that are multiples of 16 at the paper's shape


def _variants(HALF: int) -> list[tuple[str, str, object, dict, dict]]:
    """(kernel, variant, jit function, argument types, fixed constexprs) at the paper's shapes,
    half-key dim HALF (128 in the kernel benchmark, 256 in configs/memory_373m.yaml)."""
    i32, i64, f32, bf16 = "*i32", "*i64", "*fp32", "*bf16"
    out = [
        (
            "pkm_fwd",
            "bf16",
            pkm_triton._pkm_fwd_kernel,
            dict(q_ptr=bf16, k1_ptr=bf16, k2_ptr=bf16, pairs_ptr=i32, w_ptr=f32, i_ptr=i64),
            dict(K=K, KP=K, P=P, HALF_P=HALF, IEEE=False),
        ),
        (
            "pkm_bwd_rows",
            "bf16",
            pkm_bwd_triton._score_grad_rows_kernel,
            dict(
                g_ptr=bf16, w_ptr=f32, i_ptr=i64, k1_ptr=bf16, k2_ptr=bf16, dq_ptr=bf16, ent_ds_ptr=f32, ent_key_ptr=i32
            ),
            dict(K=K, KP=K, HALF_P=HALF),
        ),
    ]
    out.append(
        (
            "pkm_bwd_keys",
            "bf16",
            pkm_bwd_triton._key_grad_kernel,
            dict(q_ptr=bf16, perm_ptr=i64, seg_ptr=i64, first_ptr=i64, key_of_ptr=i64, ent_ds_ptr=f32, parts_ptr=f32),
            dict(K=K, HALF_P=HALF),
        )
    )
    out.append(
        (
            "pkm_bwd_sum_chunks",
            "bf16",
            pkm_bwd_triton._sum_chunks_kernel,
            dict(parts_ptr=f32, first_ptr=i64, n_chunks_ptr=i64, out_ptr=bf16),
            dict(HALF_P=HALF),
        )
    )
    for d in (1024, 2048):
        out.append(
            (
                "bag_fwd",
                f"d{d}",
                bag_triton._bag_fwd_kernel,
                dict(values_ptr=bf16, idx_ptr=i64, w_ptr=bf16, out_ptr=bf16),
                {},
            )
        )
        for dense in (True, False):
            out.append(
                (
                    "bag_bwd_sorted",
                    f"d{d}-{'dense' if dense else 'sparse'}",
                    bag_triton._bag_bwd_sorted_kernel,
                    dict(
                        g_ptr=bf16,
                        w_ptr=bf16,
                        v_ptr=bf16,
                        perm_ptr=i64,
                        starts_ptr=i64,
                        ends_ptr=i64,
                        rows_ptr=i64 if dense else i32,
                        out_ptr=bf16,
                        gw_ptr=f32,
                    ),
                    dict(DENSE=dense, NEED_DW=True, BLOCK_D=min(2048, d)),
                )
            )
    out.append(
        (
            "bag_weight_grad",
            "bf16",
            bag_triton._bag_weight_grad_kernel,
            dict(values_ptr=bf16, idx_ptr=i64, g_ptr=bf16, gw_ptr=bf16),
            {},
        )
    )
    return out


def _signature(fn, pointers: dict, constexprs: dict):
    signature, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in pointers:
            signature[name] = pointers[name]
            attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            signature[name] = "i32"
            if name.startswith(HINTED):
                attrs[(i,)] = [["tt.divisibility", 16]]
    return signature, attrs


def resource_usage(cubin: bytes) -> dict:
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernel.cubin"
        path.write_bytes(cubin)
        text = subprocess.run([str(tool), "-res-usage", str(path)], capture_output=True, text=True, check=True).stdout
    found = dict(re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", text))
    return {"registers": int(found["REG"]), "stack_bytes": int(found["STACK"]), "local_bytes": int(found["LOCAL"])}


def compile_one(fn, pointers, constexprs, config, arch: int) -> dict:
    consts = {**constexprs, **config.kwargs}
    signature, attrs = _signature(fn, pointers, consts)
    src = ASTSource(fn=fn, signature=signature, constexprs=consts, attrs=attrs)
    t0 = time.perf_counter()
    compiled = triton.compile(
        src,
        target=GPUTarget("cuda", arch, 32),
        options={"num_warps": config.num_warps, "num_stages": config.num_stages},
    )
    return {
        "compile_s": round(time.perf_counter() - t0, 1),
        "shared_bytes": compiled.metadata.shared,
        **resource_usage(compiled.asm["cubin"]),
    }


def build_parser() -> argparse.ArgumentParser:
    kernels = sorted(lc.TUNERS)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", type=positive_int, default=90, help="CUDA compute capability x10 (90: H100/H200)")
    p.add_argument(
        "--kernels", nargs="+", choices=kernels, default=kernels, help="the autotuned kernels to compile (default: all)"
    )
    p.add_argument(
        "--half-dim",
        type=int,
        default=128,
        choices=(64, 128, 256, 512),
        help="half-key dim of the scoring kernels (k_dim / 2)",
    )
    p.add_argument(
        "--json", type=output_file("compile_kernels.json"), default=None, help="also write every launch's row here"
    )
    return p


def main(argv=None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    rows, failed = [], 0
    print(f"triton {triton.__version__}, sm_{args.arch}, half-key dim {args.half_dim}")
    for kernel, variant, fn, pointers, constexprs in _variants(args.half_dim):
        if kernel not in args.kernels:
            continue
        for config in lc.TUNERS[kernel].configs:
            row = {"kernel": kernel, "variant": variant, "config": lc.launch_spec(config)}
            try:
                row.update(compile_one(fn, pointers, constexprs, config, args.arch))
                spill = " SPILLS" if row["stack_bytes"] or row["local_bytes"] else ""
                print(
                    f"{kernel:16s} {variant:14s} {row['config']}: {row['registers']} registers, stack "
                    f"{row['stack_bytes']} B, shared {row['shared_bytes']} B ({row['compile_s']} s){spill}",
                    flush=True,
                )
            except Exception as err:  # a compile failure is the finding: report it and go on
                failed += 1
                row["error"] = (
                    f"{type(err).__name__}: {str(err).strip().splitlines()[-1][:300] if str(err).strip() else ''}"
                )
                print(f"{kernel:16s} {variant:14s} {row['config']}: FAILED {row['error']}", flush=True)
            rows.append(row)
    if args.json:
        atomic_write(
            args.json,
            json.dumps(
                {"triton": triton.__version__, "arch": args.arch, "half_dim": args.half_dim, "launches": rows}, indent=2
            ),
        )
    print(f"{len(rows) - failed} of {len(rows)} launches compiled")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
