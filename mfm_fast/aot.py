"""Ahead-of-time compilation of every Triton kernel for a target GPU, on a machine that has none.

The interpreter (TRITON_INTERPRET=1) checks what the kernels compute, but it runs them as NumPy in fp32: it never
sees the compiler's typing of bf16 loads and stores, constexpr specialisation, layouts or register allocation. This
module closes that gap without a GPU:

1. `record_launches` runs an MFMDiT's forward, backward and jvp on *meta* tensors (real shapes, dtypes and launch
   configuration, no data) and records every kernel launch the fused ops make;
2. `compile_launch` compiles each distinct launch with `triton.compile` for the target (default sm_90, the H100),
   specialised the way the JIT launcher would specialise it (ints equal to 1 become constexprs, 16-aligned pointers
   and ints get the divisibility hint);
3. ptxas (bundled with triton) reports registers, spills and shared memory per kernel, so tile sizes that spill
   show up before a GPU does.

`python -m mfm_fast kernels --model MFM-XL/2 --dtype bf16 fp32` prints the table (and `--json` writes it). It must
run with the interpreter off: under TRITON_INTERPRET=1 the kernels are not compilable objects.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Optional

import torch

_DTYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64",
           torch.int64: "i64", torch.int32: "i32", torch.int16: "i16", torch.int8: "i8", torch.uint8: "u8",
           torch.bool: "i1"}


@dataclass
class Launch:
    """One kernel launch, by value: enough to compile it again."""
    kernel: object  # triton JITFunction
    args: dict  # parameter name -> tensor (meta/fake) | int | float | bool | None
    num_warps: int = 4
    num_stages: int = 3

    @property
    def name(self) -> str:
        return self.kernel.fn.__name__


@dataclass
class KernelReport:
    kernel: str
    dtypes: str  # the distinct pointer element types, e.g. "bf16,fp32"
    constexprs: dict
    num_warps: int
    num_stages: int
    arch: str
    ok: bool
    registers: Optional[int] = None
    spill_stores: Optional[int] = None  # bytes
    spill_loads: Optional[int] = None  # bytes
    shared_bytes: Optional[int] = None
    compile_s: float = 0.0
    error: str = ""
    workloads: list = field(default_factory=list)


def _check_compilable() -> None:
    from . import backend
    if backend.interpreter_on():
        raise RuntimeError("ahead-of-time compilation needs TRITON_INTERPRET unset (under the interpreter the "
                           "kernels are interpreted functions, not compilable ones)")


@contextlib.contextmanager
def record_launches():
    """Collect the Triton launches made inside the block into a list (yielded). Launches are recorded, not run:
    on meta tensors the fused ops' launchers are traced (the op's fake implementation), on real tensors the launch
    itself is skipped, so outputs are meaningless and only shapes flow on."""
    _check_compilable()
    from torch._higher_order_ops.triton_kernel_wrap import TraceableTritonKernelWrapper
    from triton.runtime.jit import JITFunction

    launches: list[Launch] = []

    def keep(kernel, args, kwargs):
        names = kernel.arg_names
        bound = dict(zip(names, args))
        bound.update({k: v for k, v in kwargs.items() if k in names})
        launches.append(Launch(kernel, bound, int(kwargs.get("num_warps", 4)), int(kwargs.get("num_stages", 3))))

    original_call, original_run = TraceableTritonKernelWrapper.__call__, JITFunction.run

    def traced_call(self, *args, **kwargs):
        keep(self.kernel, args, kwargs)
        return original_call(self, *args, **kwargs)

    def skipped_run(self, *args, grid=None, warmup=False, **kwargs):
        keep(self, args, kwargs)

    TraceableTritonKernelWrapper.__call__, JITFunction.run = traced_call, skipped_run
    try:
        yield launches
    finally:
        TraceableTritonKernelWrapper.__call__, JITFunction.run = original_call, original_run


def model_workloads(config: str = "MFM-XL/2", dtype: torch.dtype = torch.bfloat16,
                    shapes=((1, 1), (8, 32))) -> dict:
    """Workload name -> recorded launches of MFMDiT(config) with the Triton ops, on meta tensors.

    For each (states G, particles N): the forward; the backward to xbar, x, the times and every weight; and
    torch.func.jvp with tangents on every input and on u alone (the flow-map losses' ∂_u X); and the fused
    jvp-capable attention (forward, backward, jvp) at the model's attention shapes."""
    from .ops.table import triton_ops
    from .models.dit import MFMDiT

    with torch.device("meta"):
        model = MFMDiT(config, impl="torch").to(dtype)
    model._ops = triton_ops()  # the Triton op table without probing for a GPU: launches are only recorded
    ev = model.event_shape
    out = {}
    for G, N in shapes:
        def inputs(grad: bool):
            mk = dict(device="meta", dtype=dtype, requires_grad=grad)
            return (torch.rand(G, **mk), torch.rand(G, **mk), torch.randn(G * N, *ev, **mk), torch.rand(G, **mk),
                    torch.randn(G, *ev, **mk))

        y = torch.zeros(G, dtype=torch.long, device="meta")
        tag = f"G={G},N={N}"
        with record_launches() as rec, torch.no_grad():
            model(*inputs(False), y=y)
        out[f"forward {tag}"] = rec
        with record_launches() as rec:
            model(*inputs(True), y=y).float().sum().backward()
        out[f"backward {tag}"] = rec
        model.zero_grad(set_to_none=True)
        primals = inputs(False)

        def f(s, u, xb, t, x, y=y):
            return model(s, u, xb, t, x, y=y)

        with record_launches() as rec, torch.no_grad():
            torch.func.jvp(f, primals, tuple(torch.randn_like(p) for p in primals))
        out[f"jvp all {tag}"] = rec
        with record_launches() as rec, torch.no_grad():
            torch.func.jvp(lambda u: f(primals[0], u, *primals[2:]), (primals[1],), (torch.ones_like(primals[1]),))
        out[f"jvp u {tag}"] = rec
        # public ops the model does not call: the plain gated residual (no LayerNorm after it)
        from .ops.gate_residual import gate_residual
        D, L = model.config.hidden_size, model.config.num_tokens
        mk = dict(device="meta", dtype=dtype, requires_grad=True)
        xs, br, gate = torch.randn(G * N, L, D, **mk), torch.randn(G * N, L, D, **mk), torch.randn(G, D, **mk)
        with record_launches() as rec:
            gate_residual(xs, br, gate).float().sum().backward()
            with torch.no_grad():
                torch.func.jvp(gate_residual, (xs, br, gate), (xs, br, gate))
        out[f"gate_residual {tag}"] = rec
        # the fused jvp-capable attention: the dispatcher picks it under torch.func.jvp on a GPU, never on meta
        # tensors, so its launches are recorded directly, on the model's strided q, k, v views of one qkv tensor
        from .ops.attention import attention_jvp
        H = model.config.num_heads
        qkv = torch.randn(G * N, L, 3, H, D // H, device="meta", dtype=dtype).permute(2, 0, 3, 1, 4)
        q, k, v = (t.detach().requires_grad_() for t in qkv.unbind(0))  # each (R, H, L, Dh)
        with record_launches() as rec:
            attention_jvp(q, k, v).float().sum().backward()
            with torch.no_grad():
                torch.func.jvp(attention_jvp, (q, k, v), (q, k, v))
                torch.func.jvp(lambda q_: attention_jvp(q_, k, v), (q,), (q,))
        out[f"attention_jvp {tag}"] = rec
    return out


def _specialise(launch: Launch):
    """(signature, constexprs, attrs) as the JIT launcher would build them."""
    signature, constexprs, attrs = {}, {}, {}
    params = {p.name: p for p in launch.kernel.params}
    for i, name in enumerate(launch.kernel.arg_names):
        v = launch.args.get(name, params[name].default if name in params else None)
        if params[name].is_constexpr or v is None:
            signature[name], constexprs[name] = "constexpr", v
        elif torch.is_tensor(v):
            signature[name] = "*" + _DTYPES[v.dtype]
            attrs[(i,)] = [["tt.divisibility", 16]]  # fresh allocations are 16-byte aligned
        elif isinstance(v, bool):
            signature[name] = "i1"
        elif isinstance(v, int):
            if v == 1:  # the JIT specialises ints equal to 1 into constants
                signature[name], constexprs[name] = "constexpr", 1
                continue
            signature[name] = "i32" if -2 ** 31 <= v < 2 ** 31 else "i64"
            if v % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(v, float):
            signature[name] = "fp32"
        else:
            raise TypeError(f"{launch.name}: cannot type argument {name}={v!r}")
    return signature, constexprs, attrs


def launch_key(launch: Launch) -> tuple:
    signature, constexprs, attrs = _specialise(launch)
    return (launch.name, tuple(signature.items()), tuple(sorted((k, repr(v)) for k, v in constexprs.items())),
            tuple(sorted(attrs)), launch.num_warps, launch.num_stages)


def _ptxas_stats(ptx: str, arch: str, capability: int) -> dict:
    """Registers, spill bytes and shared memory from `ptxas -v` on the generated PTX (the ptxas triton itself
    picks for this capability, so the PTX version matches)."""
    from triton.backends.nvidia.compiler import get_ptxas
    ptxas = get_ptxas(capability).path
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        res = subprocess.run([ptxas, "-v", f"--gpu-name={arch}", src, "-o", os.path.join(d, "k.cubin")],
                             capture_output=True, text=True)
    text = res.stdout + res.stderr
    if res.returncode:
        raise RuntimeError(f"ptxas failed: {text.strip()[-500:]}")

    def grab(pattern):
        m = re.search(pattern, text)
        return int(m.group(1)) if m else None

    return dict(registers=grab(r"Used (\d+) registers"), spill_stores=grab(r"(\d+) bytes spill stores"),
                spill_loads=grab(r"(\d+) bytes spill loads"), shared_bytes=grab(r"(\d+) bytes smem"))


# CUDA compute capabilities (major·10 + minor) of the GPUs Triton targets (7.0 and newer). LLVM aborts the whole
# process on a processor it does not know (e.g. sm_0, sm_91), so the target is checked before compiling anything.
CAPABILITIES = (70, 72, 75, 80, 86, 87, 89, 90, 100, 103, 110, 120, 121)  # sm_101 is sm_110 since CUDA 13


def check_capability(capability) -> int:
    if isinstance(capability, bool) or not isinstance(capability, int) or capability not in CAPABILITIES:
        raise ValueError(f"capability must be a CUDA compute capability written major·10 + minor, one of "
                         f"{', '.join(map(str, CAPABILITIES))} (90 = H100/H200), got {capability!r}")
    return capability


def compile_launch(launch: Launch, capability: int = 90) -> KernelReport:
    """Compile one recorded launch for sm_<capability> and report its resource use (compile errors are reported,
    not raised; an unknown capability raises ValueError)."""
    check_capability(capability)
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature, constexprs, attrs = _specialise(launch)
    arch = f"sm_{capability}{'a' if capability >= 90 else ''}"
    dtypes = ",".join(sorted({s[1:] for s in signature.values() if s.startswith("*")}))
    report = KernelReport(launch.name, dtypes, {k: v for k, v in constexprs.items()}, launch.num_warps,
                          launch.num_stages, arch, ok=False)
    t0 = time.perf_counter()
    try:
        target = GPUTarget("cuda", capability, 32)
        options = triton.compiler.make_backend(target).parse_options(
            dict(num_warps=launch.num_warps, num_stages=launch.num_stages)).__dict__
        src = ASTSource(fn=launch.kernel, signature=signature, constexprs=constexprs, attrs=attrs)
        compiled = triton.compile(src, target=target, options=options)
        stats = _ptxas_stats(compiled.asm["ptx"], arch, capability)
        report.ok = True
        for k, v in stats.items():
            setattr(report, k, v)
        if report.shared_bytes is None:
            report.shared_bytes = int(getattr(compiled.metadata, "shared", 0))
    except Exception as e:  # a compile error is the finding, reported per kernel
        report.error = f"{type(e).__name__}: {str(e).strip()[:2000]}"
    report.compile_s = time.perf_counter() - t0
    return report


def check(configs=("MFM-XL/2",), dtypes=(torch.bfloat16,), capability: int = 90, shapes=((1, 1), (8, 32))) -> list:
    """Record every workload, compile each distinct launch once; -> [KernelReport] (workloads listed per kernel)."""
    check_capability(capability)
    _check_compilable()
    distinct: dict = {}
    for config in configs:
        for dtype in dtypes:
            for work, launches in model_workloads(config, dtype, shapes).items():
                for launch in launches:
                    key = launch_key(launch)
                    entry = distinct.setdefault(key, [launch, []])
                    label = f"{config} {_DTYPES[dtype]} {work}"
                    if label not in entry[1]:
                        entry[1].append(label)
    reports = []
    for launch, works in distinct.values():
        r = compile_launch(launch, capability)
        r.workloads = works
        reports.append(r)
    return reports


def kernel_names() -> list:
    """Every @triton.jit kernel of csrc_triton that a launcher starts (the `*_kernel` functions)."""
    import importlib
    import pkgutil

    import csrc_triton
    names = []
    for mod in pkgutil.iter_modules(csrc_triton.__path__):
        m = importlib.import_module(f"csrc_triton.{mod.name}")
        names += [n for n in vars(m) if n.endswith("_kernel")]
    return sorted(names)


def format_table(reports: list) -> str:
    head = f"{'kernel':<30} {'dtypes':<10} {'warps':>5} {'regs':>5} {'spill st/ld B':>13} {'smem B':>7} " \
           f"{'s':>5}  constexprs"
    lines = [head, "-" * len(head)]
    for r in sorted(reports, key=lambda r: (r.kernel, r.dtypes, str(r.constexprs))):
        ce = ",".join(f"{k}={v}" for k, v in r.constexprs.items())
        if r.ok:
            spill = f"{r.spill_stores}/{r.spill_loads}"
            lines.append(f"{r.kernel:<30} {r.dtypes:<10} {r.num_warps:>5} {r.registers:>5} {spill:>13} "
                         f"{r.shared_bytes:>7} {r.compile_s:>5.1f}  {ce}")
        else:
            lines.append(f"{r.kernel:<30} {r.dtypes:<10} {r.num_warps:>5}  FAILED  {ce}\n    {r.error[:400]}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m mfm_fast kernels",
                                description="Compile every Triton kernel the model launches for a target GPU "
                                            "(no GPU needed) and report registers, spills and shared memory.")
    p.add_argument("--model", nargs="+", default=["MFM-XL/2"], help="MFMDiT configs whose launches are compiled")
    p.add_argument("--dtype", nargs="+", default=["bf16", "fp32"], choices=["bf16", "fp16", "fp32"])
    p.add_argument("--capability", type=int, default=90, help="target compute capability (90 = H100/H200)")
    p.add_argument("--shapes", nargs="+", default=["1x1", "8x32"], help="states x particles per workload")
    p.add_argument("--json", help="write the reports here")
    a = p.parse_args(argv)
    try:
        check_capability(a.capability)
    except ValueError as e:
        p.error(f"--{e}")
    from .backend import interpreter_on
    if interpreter_on():
        p.error("unset TRITON_INTERPRET: the kernels must be compiled, not interpreted")
    dt = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    shapes = []
    for s in a.shapes:
        try:
            G, N = (int(v) for v in s.lower().split("x"))
        except ValueError:
            p.error(f"--shapes: expected STATESxPARTICLES such as 8x32, got {s!r}")
        shapes.append((G, N))
    import triton
    reports = check(a.model, [dt[d] for d in a.dtype], a.capability, shapes)
    print(f"triton {triton.__version__}, torch {torch.__version__}, target sm_{a.capability}, "
          f"{len(reports)} distinct launches")
    print(format_table(reports))
    missing = sorted(set(kernel_names()) - {r.kernel for r in reports})
    if missing:
        print(f"not launched by these workloads: {', '.join(missing)}")
    spills = [r for r in reports if r.ok and (r.spill_stores or r.spill_loads)]
    failed = [r for r in reports if not r.ok]
    print(f"{len(failed)} failed, {len(spills)} spill registers")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(dict(triton=triton.__version__, torch=torch.__version__, capability=a.capability,
                           reports=[asdict(r) for r in reports], not_launched=missing), f, indent=1, default=str)
    return 1 if failed else 0
