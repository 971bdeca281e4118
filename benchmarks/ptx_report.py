"""What the Triton kernels compile to for sm_90 (H100/H200), without a GPU: registers, spills,
the widest global load and store, exps and SASS size of every kernel variant.

    python benchmarks/ptx_report.py                  # prints the table (this tree's kernels)
    python benchmarks/ptx_report.py --against REV    # with each figure of flowkern/ at git REV
    python benchmarks/ptx_report.py --against REV --write   # also results/ptx-sm90-<date>.md

Each kernel is compiled the way its launcher runs it at the paper's size: the launcher itself
(flowkern.kernels.*) is called on meta tensors of B·T = 64·64 = 4,096 rows of V = 151,936
logits (Qwen2.5's padded vocabulary; bfloat16 or float32), H = 1,536 for the restricted head,
and a trie shaped like the Movies_and_TV one (15,663 nodes, 2,653 items, max degree 835, so
CHILD_BLOCK = 256 in policy.py, eos 198); its launch is caught, and Triton's own JIT binder
specialises the arguments as a real launch would (an int argument equal to 1 becomes a
constant, the others i32 marked divisible by 16 where they are, pointers of contiguous tensors
16-byte aligned), with the launch's constexprs and num_warps.  Triton's ptxas then compiles
for sm_90a.

Columns: registers and spills from ptxas -v; the widest global load and store in the PTX in
bytes per access (`ld.global.v4.b32` moves 16, `st.global.b16` 2; atomic adds, as the head's
dW and db, are not stores), and how many `st.global` of each width the PTX holds; ex2: the
PTX's `ex2.approx` (exps: per block step, one per column a thread holds in the policy's
streaming loops); cvt.rn.bf16: native float32 → bfloat16 conversions (round to nearest even);
SASS: instructions in `cuobjdump -sass`, NOPs left out; inner loops: the instructions of each
loop that holds no other (a block step of a streaming loop, a binary search's probe, ...).

Compiling needs Triton's CUDA backend and bundled ptxas, not a GPU nor the interpreter:
`collect()` runs the compilation in a subprocess without TRITON_INTERPRET (tests/test_ptx.py
uses it).
"""

import argparse
import contextlib
import io
import json
import os
import re
import subprocess
import sys
import tarfile
import tempfile
import types
import warnings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results")
BATCH, STEPS, VOCAB, HIDDEN = 64, 64, 151_936, 1_536
TRIE = dict(nodes=15_663, items=2_653, max_degree=835, eos=198)  # Movies_and_TV with Qwen2.5 ids
COLUMNS = ["kernel", "variant", "logits", "warps", "registers", "spills (st/ld B)", "widest load (B)",
           "widest store (B)", "stores (B×count)", "ex2", "cvt.rn.bf16", "SASS", "inner loops (SASS)"]


def collect(root=ROOT):
    """The report's rows for the package flowkern/ under `root`, compiled in a subprocess
    without the Triton interpreter (so this works from a test session that set it)."""
    environment = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    paths = [root, ROOT] + environment.get("PYTHONPATH", "").split(os.pathsep)
    environment["PYTHONPATH"] = os.pathsep.join(path for path in paths if path)
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--json"], capture_output=True, text=True,
                         env=environment, cwd=root)
    if out.returncode:
        raise RuntimeError(f"compiling the kernels failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout)


def collect_at(rev):
    """collect() for flowkern/ as of git revision `rev` (read with git archive into a temp dir)."""
    with tempfile.TemporaryDirectory(prefix="flowkern-ptx-") as tree:
        archive = subprocess.run(["git", "archive", rev, "flowkern"], capture_output=True, check=True, cwd=ROOT).stdout
        with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
            tar.extractall(tree, filter="data")
        return collect(tree)


def changed_files(rev):
    """The files of flowkern/kernels/ that differ between git revision `rev` and this tree."""
    return subprocess.run(["git", "diff", "--name-only", rev, "--", "flowkern/kernels"], capture_output=True,
                          text=True, check=True, cwd=ROOT).stdout.split()


# ---- in the subprocess: launch, catch, specialise, compile, read ------------------------------

class _Launch(Exception):
    def __init__(self, kernel, args, kwargs):
        super().__init__(kernel.__name__)
        self.kernel, self.args, self.kwargs = kernel, args, kwargs


class _Catch:
    """Stands in for a kernel in its module: `kernel[grid](*args, **kwargs)` raises _Launch."""

    def __init__(self, kernel):
        self.kernel = kernel

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            raise _Launch(self.kernel, args, kwargs)
        return launch


def _launch_of(module, call, **stand_ins):
    """The (kernel, args, kwargs) of the first kernel launch made by call(), with the module's
    kernels (and those of its names that `stand_ins` has) replaced while it runs."""
    replaced = {name: _Catch(value) for name, value in vars(module).items() if name.endswith("_kernel")}
    replaced.update((name, value) for name, value in stand_ins.items() if hasattr(module, name))
    kept = {name: getattr(module, name) for name in replaced}
    vars(module).update(replaced)
    try:
        call()
    except _Launch as launch:
        return launch.kernel, launch.args, launch.kwargs
    finally:
        vars(module).update(kept)
    raise RuntimeError(f"{call} launched no kernel")


def _cases():
    """(kernel, variant, logits dtype, (kernel, args, kwargs)) for every variant reported."""
    import torch

    from flowkern.kernels import head, policy, subtb, walk

    meta = dict(device="meta")
    trie = types.SimpleNamespace(
        offsets=torch.empty(TRIE["nodes"] + 1, dtype=torch.int64, **meta),
        tokens=torch.empty(TRIE["nodes"] - 1, dtype=torch.int32, **meta),
        log_flow=torch.empty(TRIE["nodes"], dtype=torch.float64, **meta),
        leaf_nodes=torch.empty(TRIE["items"], dtype=torch.int32, **meta),
        leaf_item_offsets=torch.empty(TRIE["items"] + 1, dtype=torch.int64, **meta),
        leaf_items=torch.empty(TRIE["items"], dtype=torch.int32, **meta),
        eos_token_id=TRIE["eos"], max_degree=TRIE["max_degree"])
    tokens = torch.empty(BATCH, STEPS, dtype=torch.int64, **meta)
    nodes = torch.empty(BATCH, STEPS + 1, dtype=torch.int64, **meta)
    length = torch.empty(BATCH, dtype=torch.int64, **meta)
    rows = torch.empty(BATCH, STEPS, dtype=torch.float32, **meta)  # lse, coefficients, log π: float32
    log_r = torch.empty(BATCH, STEPS, dtype=torch.float64, **meta)
    for kind, rewards in (("no preference", None), ("per row", torch.empty(BATCH, dtype=torch.float64, **meta)),
                          ("per item", torch.empty(BATCH, TRIE["items"], dtype=torch.float64, **meta))):
        yield "walk", kind, "-", _launch_of(walk, lambda: walk.walk_rewards(tokens, trie, rewards, "div", 1.0))
    for flower in (False, True):
        yield "subtb pair sum", "flower" if flower else "process", "-", _launch_of(
            subtb, lambda: subtb.pair_sum(rows, rows if flower else None, log_r, length, 0.9))
    for dtype, name in ((torch.bfloat16, "bf16"), (torch.float32, "fp32")):
        logits = torch.empty(BATCH, STEPS, VOCAB, dtype=dtype, **meta)
        for normalize, flower in (("trie", False), ("full", False), ("full", True)):
            variant = normalize + (", flower" if flower else "")
            yield "policy forward", variant, name, _launch_of(
                policy, lambda: policy.log_probs(logits, tokens, nodes, length, trie, normalize, flower))
            yield "policy backward", variant, name, _launch_of(
                policy, lambda: policy.logits_grad(logits, tokens, nodes, length, trie, rows, rows, normalize, flower,
                                                   torch.empty_like(logits)))
        hidden = torch.empty(BATCH, STEPS, HIDDEN, dtype=dtype, **meta)
        weight = torch.empty(VOCAB, HIDDEN, dtype=dtype, **meta)
        yield "head forward", "trie", name, _launch_of(
            head, lambda: head.log_probs(hidden, weight, None, tokens, nodes, length, trie, "trie", False))
        for weight_grad in (False, True):  # today's launchers take no host sync, so they run on meta tensors;
            # --against an older revision: its head launcher's synchronising helpers get stand-ins
            yield "head backward", "trie, dW" if weight_grad else "trie, frozen W", name, _launch_of(
                head, lambda: head.grad(hidden, weight, None, tokens, nodes, length, trie, rows, rows, "trie", False,
                                        weight_grad, False),
                used_rows=lambda length, steps: (torch.arange(BATCH * steps, **meta) // steps,
                                                 torch.arange(BATCH * steps, **meta) % steps),
                touched_tokens=lambda state, trie: torch.arange(TRIE["nodes"] - 1, **meta))


def compile_launch(kernel, args, kwargs):
    """(compiled kernel, ptxas -v log, constexprs as "NAME=value, ...") of `kernel` launched
    with args, kwargs, for sm_90, specialised by Triton's JIT binder as JITFunction.run would."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    target = GPUTarget("cuda", 90, 32)
    backend = make_backend(target)
    kwargs = dict(kwargs, debug=kwargs.get("debug", kernel.debug) or knobs.runtime.debug,
                  instrumentation_mode=knobs.compilation.instrumentation_mode,
                  fpsan_homomorphic_casts=knobs.compilation.fpsan_homomorphic_casts)
    bound, specialization, options = create_function_from_signature(kernel.signature, kernel.params, backend)(
        *args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, specialization, options)
    log = io.StringIO()
    with contextlib.redirect_stdout(log):  # TRITON_DUMP_PTXAS_LOG prints the log
        compiled = triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=target,
                                  options=options.__dict__)
    given = ", ".join(f"{p.name}={bound[p.name]}" for p in kernel.params if p.is_constexpr)
    return compiled, log.getvalue(), given


def global_accesses(ptx, op):
    """{bytes per access: count} of the `op` ("ld" or "st") instructions on global memory."""
    counts = {}
    for instruction in re.findall(rf"\b{op}\.global\.[\w.:]+", ptx):
        parts = instruction.split(".")
        lanes = next((int(p[1:]) for p in parts if re.fullmatch(r"v\d", p)), 1)
        width = lanes * int(re.fullmatch(r"[bfsu](\d+)", parts[-1]).group(1)) // 8
        counts[width] = counts.get(width, 0) + 1
    return counts


def inner_loops(sass):
    """Instruction counts of the SASS loops that hold no other loop (a backward branch's
    target up to the branch), in code order."""
    code = [(int(at, 16), text) for at, text in re.findall(r"/\*([0-9a-f]{4})\*/\s+([^;]*);", sass)]
    index = {at: i for i, (at, _) in enumerate(code)}
    loops = [(index[int(target, 16)], i) for i, (at, text) in enumerate(code)
             for target in re.findall(r"\bBRA\b.*?0x([0-9a-f]+)", text) if int(target, 16) < at]
    return [last - first + 1 for first, last in sorted(loops)
            if not any(first <= a and b <= last and (a, b) != (first, last) for a, b in loops)]


def measure(compiled, log):
    """The report's figures of one compiled kernel."""
    from triton import knobs

    ptx = compiled.asm["ptx"]
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        sass = subprocess.run([knobs.nvidia.cuobjdump.path, "-sass", cubin.name], capture_output=True, text=True,
                              check=True).stdout
    loads, stores = global_accesses(ptx, "ld"), global_accesses(ptx, "st")
    return {"warps": compiled.metadata.num_warps, "registers": int(re.search(r"Used (\d+) registers", log).group(1)),
            "spills (st/ld B)": f"{spills.group(1)}/{spills.group(2)}",
            "widest load (B)": max(loads, default=0), "widest store (B)": max(stores, default=0),
            "stores (B×count)": ", ".join(f"{w}×{n}" for w, n in sorted(stores.items(), reverse=True)),
            "ex2": len(re.findall(r"\bex2\.approx", ptx)), "cvt.rn.bf16": len(re.findall(r"\bcvt\.rn\.bf16", ptx)),
            "SASS": sum(1 for line in sass.splitlines() if re.search(r"/\*[0-9a-f]{4}\*/\s+(?!NOP\b)\S", line)),
            "inner loops (SASS)": ", ".join(map(str, inner_loops(sass)))}


def report():
    """Compile every case in this process (which must not run the Triton interpreter)."""
    os.environ.update(TRITON_DUMP_PTXAS_LOG="1", TRITON_ALWAYS_COMPILE="1")  # the log of every compile
    warnings.filterwarnings("ignore", message="TRITON_DEFAULT_FP_FUSION is unset")
    rows = []
    for name, variant, dtype, launch in _cases():
        compiled, log, constexprs = compile_launch(*launch)
        rows.append({"kernel": name, "variant": variant, "logits": dtype, **measure(compiled, log),
                     "constexprs": constexprs})
    return rows


# ---- the table ----------------------------------------------------------------------------

def markdown(rows, before=None, columns=COLUMNS):
    """Rows as a markdown table of `columns`; with `before` (rows of the same cases), each
    figure that changed reads "before → after"."""
    def cell(row, column):
        old = before.get((row["kernel"], row["variant"], row["logits"]), {}).get(column) if before else None
        return f"{old} → {row[column]}" if old is not None and old != row[column] else str(row[column])
    before = before and {(r["kernel"], r["variant"], r["logits"]): r for r in before}
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row, c) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--against", metavar="REV", help="also compile flowkern/ as of git revision REV")
    parser.add_argument("--write", action="store_true", help="write results/ptx-sm90-<date>.md")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON (what collect() reads)")
    args = parser.parse_args()
    if args.json:
        with contextlib.redirect_stdout(sys.stderr):
            rows = report()
        print(json.dumps(rows))
        return
    sys.path.insert(0, ROOT)
    import triton

    from benchmarks.common import environment

    env = environment()
    rows = collect()
    before = collect_at(args.against) if args.against else None
    shapes = (f"B·T = {BATCH}·{STEPS} = {BATCH * STEPS:,} rows, V = {VOCAB:,}, H = {HIDDEN:,}; trie: "
              f"{TRIE['nodes']:,} nodes, {TRIE['items']:,} items, max degree {TRIE['max_degree']}, eos {TRIE['eos']}")
    text = (f"# PTX/SASS of the Triton kernels for sm_90\n\n{env['date']}, triton {triton.__version__} "
            f"(its bundled ptxas), target cuda sm_90 (sm_90a, warp size 32), compiled (no GPU used) on "
            f"{env['device']}, commit {env['commit']}\n\n{shapes}.  Constexprs (below) and num_warps are the "
            f"launchers' own; arguments specialised by Triton's JIT binder as at run time.\n\n"
            + ("" if before is None else f"Each changed figure reads \"{args.against} → this tree\"; the kernel files "
               f"that differ: {', '.join(changed_files(args.against)) or 'none'}.\n\n")
            + markdown(rows, before) + "\n\nConstexprs of the launches (this tree):\n\n"
            + markdown(rows, columns=["kernel", "variant", "logits", "constexprs"])
            + "\n\nCommand: python benchmarks/ptx_report.py "
            + " ".join(sys.argv[1:]) + "\n")
    print(text)
    if args.write:
        with open(os.path.join(RESULTS, f"ptx-sm90-{env['date']}.md"), "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
