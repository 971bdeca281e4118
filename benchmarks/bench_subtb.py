"""Flower's loss, side by side: flowkern against the published way of computing it.

    python benchmarks/bench_subtb.py                  # preset "cpu" here, "paper" on a GPU; writes results/
    python benchmarks/bench_subtb.py --preset paper   # Qwen2.5 V = 151,936, B = 128 rollouts x T = 32
    python benchmarks/bench_subtb.py --quick          # small sizes, no torch.compile, writes nothing (CI)
    python benchmarks/bench_subtb.py --streamed --sections stages sweep --print-only   # the roofline

Sections (--sections, default loss stages build walk):
  loss    forward + backward, timed, of the Flower form (full softmax, the published objective)
          and of flowkern's default (process form, trie policy), on every backend that runs
          here, passed explicitly (backend="torch"; backend="triton" on CUDA, or on CPU under
          the Triton interpreter), each also with inplace_grad=True; against the
          published-style code (reference/published.py: dict look-ups per token, materialised
          log-softmax, a loop over subtrajectory lengths), the loop-level reference (small sizes
          only), torch.compile of the PyTorch path, and the memory floor: a copy of the logits
          into a new tensor, which any path that reads them and returns a fresh gradient must
          exceed (on a CPU, paging in the new tensor's memory is most of it).
  stages  the four stages of each form alone (flowkern/eager.py against flowkern/kernels/):
          trie walk + process rewards, log π, the SubTB pair sum, the gradient over the logits.
  sweep   the full softmax's two policy kernels over BLOCK × num_warps (Triton only; the
          interpreter ignores num_warps).
  build   the trie build (C++ against the published dict of prefix strings).
  walk    the trie walk with reward look-up alone.
Trajectories are Movies_and_TV titles padded with "\\n" after their termination token, and the
loss reads only the rows up to it (23% of the B·T rows at the paper preset).  --streamed uses
random items of exactly T − 1 tokens instead, so that every row is read: the roofline case.

Bytes (the bandwidth columns) count the logits read and the gradient written, e bytes each:
  R = Σ_b (L_b + 1) rows read, L_b the position of row b's termination token;
  C = Σ over those rows of the number of children of s_t;
  read = R·V·e (full softmax: the whole row) or C·e (trie policy: the children alone);
  log π (forward) = read;  gradient (backward) = read + B·T·V·e, since every entry of the
  B×T×V gradient is written (zeros after the ends and, for the trie policy, off the
  children);  forward + backward = 2·read + B·T·V·e, with or without inplace_grad (then the
  forward writes the gradient over the logits and the backward moves nothing);
  floor = 2·B·T·V·e.
The walk and the pair sum move O(B·T) bytes and get no figure, and the side arrays (tokens,
trie, per-row scalars) are not counted.  These are the bytes the Triton kernels move (one
pass over each row read, one write of each entry); the PyTorch path moves more (it gathers
and upcasts rows in chunks), so its figure is the same bytes over its time, an effective
bandwidth.  "% of peak" divides by the device's nominal memory bandwidth (PEAK_BANDWIDTH).
Every figure comes from this one run; ratios are to flowkern's fastest Flower-form path.
"""

import argparse
import logging
import os
import sys
import time
from functools import partial
from typing import Callable, NamedTuple, Optional
from unittest import mock

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import flowkern  # noqa: E402
from flowkern import eager  # noqa: E402
from flowkern.trie import _ARRAYS  # noqa: E402
from benchmarks.common import (backends, environment, fix_malloc_threshold, peak_memory,  # noqa: E402
                               sections_markdown, time_call, write_results)
from reference import published  # noqa: E402
from reference import subtb as loops  # noqa: E402
from tests.strategies import Catalogue, movie_catalogue  # noqa: E402

PRESETS = {  # batch (rollouts), title positions, vocabulary
    "paper": (128, 32, 151_936),
    "cpu": (32, 32, 151_936),
    "small": (8, 16, 32_768),
    "quick": (4, 8, 4_096),
    "tiny": (2, 8, 1_024),  # gpu_check.sh --dry-run: the Triton interpreter on CPU
}
PEAK_BANDWIDTH = {"H100 PCIe": 2.0e12, "H100 NVL": 3.9e12, "H100": 3.35e12, "H200": 4.8e12,
                  "A100-SXM4-80GB": 2.039e12, "A100-SXM4-40GB": 1.555e12}  # bytes/s; first match in the name
SECTIONS = ("loss", "stages", "sweep", "build", "walk")
FORMS = {"Flower form": dict(form="flower", normalize="full"), "process form, trie policy": dict(form="process",
                                                                                                  normalize="trie")}
SWEEP = {"cuda": ((1024, 2048, 4096, 8192), (4, 8, 16)), "cpu": ((256, 1024), (4, 8))}  # BLOCKs, num_warps


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=PRESETS, help="default: paper on a GPU, cpu otherwise")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=["loss", "stages", "build", "walk"])
    parser.add_argument("--streamed", action="store_true", help="every row read: items of exactly T - 1 tokens")
    parser.add_argument("--blocks", type=int, nargs="+", help="sweep: BLOCK values (default by device)")
    parser.add_argument("--warps", type=int, nargs="+", help="sweep: num_warps values (default by device)")
    parser.add_argument("--no-compile", action="store_true", help="leave out the torch.compile row")
    parser.add_argument("--trie-items", type=int, default=1_000_000, help="synthetic catalogue of 20-token items")
    parser.add_argument("--json", help="also write every figure to this file")
    parser.add_argument("--print-only", action="store_true", help="print the tables, write no result files")
    parser.add_argument("--quick", action="store_true", help="small sizes, no torch.compile, no result files")
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    if args.quick:
        args.preset, args.repeats, args.trie_items, args.no_compile, args.print_only = "quick", 2, 10_000, True, True
    preset = args.preset or ("paper" if cuda else "cpu")
    device = torch.device("cuda" if cuda else "cpu")
    env = environment()  # the code that runs is the code at the start
    fix_malloc_threshold()

    batch, steps, vocab = PRESETS[preset]
    data = inputs(PRESETS[preset], device, args.streamed)
    shape = (f"preset {preset}{', streamed (every row read)' if args.streamed else ''}: B = {batch}, T = {steps}, "
             f"V = {vocab:,}, {str(data.logits.dtype).removeprefix('torch.')} logits, R = {data.rows:,} of the "
             f"{batch * steps:,} rows read, C = {data.children:,} children at them")
    sections, notes = [], []
    if "loss" in args.sections:
        loss_rows, agreement = bench_loss(data, device, args.repeats, compile_too=not args.no_compile)
        sections.append((f"Loss forward + backward, {shape}", loss_rows))
        notes.append(f"Loss values agree within each form across its variants to a relative {agreement:.1e}.")
    if "stages" in args.sections:
        sections.append((f"Each stage alone, {shape}", bench_stages(data, device, args.repeats)))
    if "sweep" in args.sections:
        grid = SWEEP[device.type]
        sections.append((f"Policy kernels (full softmax) by BLOCK x num_warps, {shape}",
                         bench_sweep(data, device, args.repeats, args.blocks or grid[0], args.warps or grid[1])))
    if "build" in args.sections:
        sections.append(("Trie build", bench_build(args.trie_items, args.repeats)))
    if "walk" in args.sections:
        sections.append((f"Trie walk + process-reward look-up alone, B = {batch}, T = {steps}",
                         bench_walk(data, args.repeats)))
    body = sections_markdown(sections)
    notes.append(f"Memory is the peak {'CUDA allocation' if cuda else 'resident set'} above what was in use before "
                 f"the call, sampled every millisecond.  Bytes: see the docstring of benchmarks/bench_subtb.py.  "
                 f"Command: python benchmarks/bench_subtb.py {' '.join(sys.argv[1:])}")
    body += "\n\n" + "  ".join(notes)
    if args.print_only:
        print(body)
        return
    rows = [dict(row, section=title) for title, part in sections for row in part]
    write_results("", "flowkern benchmark: Flower's SubTB loss", env, body, rows)
    if args.json:
        import json

        with open(args.json, "w") as f:
            json.dump({"environment": env, "rows": rows}, f, indent=1)


# ---- the inputs and their bytes -----------------------------------------------------------------

class Inputs(NamedTuple):
    catalogue: Catalogue
    trie: flowkern.Trie  # on the device
    tokens: torch.Tensor  # (B, T) on the device
    logits: torch.Tensor  # (B, T, V) on the device: bfloat16 on CUDA, float32 on CPU
    cpu_trie: flowkern.Trie
    cpu_tokens: torch.Tensor
    rows: int  # R
    children: int  # C

    def read_bytes(self, normalize):
        """Bytes of the logits that log π reads (once) under `normalize`."""
        element = self.logits.element_size()
        return (self.rows * self.logits.shape[-1] if normalize == "full" else self.children) * element

    @property
    def dense_bytes(self):
        """B·T·V·e: the whole logits, or the whole gradient."""
        return self.logits.numel() * self.logits.element_size()


def inputs(preset, device, streamed):
    batch, steps, vocab = preset
    catalogue, tokens = trajectories(batch, steps, vocab, streamed)
    trie = catalogue.trie()
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    generator = torch.Generator(device).manual_seed(0)
    logits = torch.randn(batch, steps, vocab, generator=generator, device=device).to(dtype)
    walk = trie.walk(tokens)
    b, t = eager.used_rows(walk.length, steps)
    nodes = walk.nodes[b, t]
    children = int((trie.offsets[nodes + 1] - trie.offsets[nodes]).sum())
    return Inputs(catalogue, trie.to(device), tokens.to(device), logits, trie, tokens, b.numel(), children)


def trajectories(batch, steps, vocab, streamed=False):
    """(catalogue, tokens (B, T)): `batch` random items of the catalogue that fit in `steps`
    positions, each followed by the termination token "\\n" up to T.  The catalogue is the
    Movies_and_TV title trie (Qwen2.5 ids, folded into the vocabulary if it is smaller), or
    if `streamed` `batch` random items of exactly T − 1 tokens, the termination token V − 1."""
    rng = np.random.default_rng(0)
    if streamed:
        eos = vocab - 1
        catalogue = Catalogue(rng.integers(0, eos, size=(batch, steps - 1)).tolist(), [1.0] * batch, eos)
        picked = range(batch)
    else:
        catalogue = movie_catalogue()
        if vocab <= max(max(s) for s in catalogue.sequences):
            eos = vocab - 1
            catalogue.sequences = [[t % eos for t in s] for s in catalogue.sequences]
            catalogue.eos = eos
        picked = rng.choice([i for i, s in enumerate(catalogue.sequences) if len(s) < steps], size=batch)
    tokens = torch.tensor([catalogue.sequences[i] + [catalogue.eos] * (steps - len(catalogue.sequences[i]))
                           for i in picked])
    return catalogue, tokens


def bandwidth(moved, seconds, device):
    """Columns "GB/s" and "% of peak" for `moved` bytes in `seconds` (none without bytes)."""
    if moved is None:
        return {}
    peak = next((v for k, v in PEAK_BANDWIDTH.items() if k in torch.cuda.get_device_name()), None) \
        if device.type == "cuda" else None
    return {"MB moved": f"{moved / 1e6:,.1f}", "GB/s": f"{moved / seconds / 1e9:,.1f}",
            "% of peak": f"{100 * moved / seconds / peak:.0f}%" if peak else "n/a"}


# ---- the loss -----------------------------------------------------------------------------------

class Variant(NamedTuple):
    name: str
    run: Callable  # forward + backward; returns the loss
    form: Optional[str] = None  # what its loss value must agree with
    moved: Optional[int] = None  # bytes (see the module docstring)
    setup: Optional[Callable] = None  # untimed, before each run


def bench_loss(data, device, repeats, compile_too):
    """Rows of the loss table, and the largest relative disagreement of loss values within a form."""
    work = torch.empty_like(data.logits)  # inplace_grad overwrites its input: refilled before each run

    def fwd_bwd(loss_fn, source=data.logits):
        def run():
            x = source.detach().requires_grad_()
            loss = loss_fn(x)
            loss.backward()
            return loss.item()
        return run

    def flowkern_loss(options, loss_fn=flowkern.subtb_loss):
        return lambda x: loss_fn(x, data.trie, tokens=data.tokens, **options)

    table = published.build_process_rewards(data.catalogue.sequences, data.catalogue.rewards, data.catalogue.eos)
    variants = [Variant("published-style (reference/published.py)",
                        fwd_bwd(lambda x: published.subtb_loss(x, data.tokens, table, data.catalogue.eos)),
                        "Flower form")]
    if data.tokens.numel() <= 64:
        oracle = data.catalogue.dict_trie()
        variants.append(Variant("reference loops (reference/subtb.py)",
                                fwd_bwd(lambda x: loops.subtb_loss(x, oracle, data.cpu_tokens, **FORMS["Flower form"])),
                                "Flower form"))
    for form, options in FORMS.items():
        moved = 2 * data.read_bytes(options["normalize"]) + data.dense_bytes
        for backend, label in backends(device).items():
            explicit = dict(options, backend=backend)
            variants.append(Variant(f"flowkern, {form}, {label}", fwd_bwd(flowkern_loss(explicit)), form, moved))
            variants.append(Variant(f"flowkern, {form}, {label}, inplace_grad",
                                    fwd_bwd(flowkern_loss(dict(explicit, inplace_grad=True)), work), form, moved,
                                    lambda: work.copy_(data.logits)))
        if compile_too and form == "Flower form":
            logging.getLogger("torch._dynamo").setLevel(logging.ERROR)  # graph-break warnings
            compiled = torch.compile(flowkern.subtb_loss)
            variants.append(Variant(f"flowkern, {form}, PyTorch under torch.compile",
                                    fwd_bwd(flowkern_loss(dict(options, backend="torch"), compiled)), form, moved))
    variants.append(Variant("floor: copy the logits into a new tensor (read B·T·V, allocate and write B·T·V)",
                            lambda: torch.empty_like(data.logits).copy_(data.logits), moved=2 * data.dense_bytes))

    results, values = {}, {}
    for variant in variants:
        setup = variant.setup or (lambda: None)
        try:
            setup()
            value = variant.run()
            if variant.form:
                values.setdefault(variant.form, []).append(value)
            timing = time_call(variant.run, repeats=repeats, warmup=1, setup=variant.setup)
            setup()
            timing["peak_bytes"] = peak_memory(variant.run, device)
            results[variant] = timing
        except Exception as error:  # a variant that cannot run is reported, not hidden
            results[variant] = {"error": f"{type(error).__name__}: {str(error).splitlines()[0][:120]}"}
    agreement = max((abs(v - group[0]) / abs(group[0]) for group in values.values() for v in group),
                    default=float("nan"))
    fastest = min((r["median_s"] for v, r in results.items()
                   if v.name.startswith("flowkern, Flower form") and "median_s" in r), default=float("nan"))
    rows = []
    for variant, r in results.items():
        if "error" in r:
            rows.append({"variant": variant.name, "median ms": r["error"]})
            continue
        rows.append({"variant": variant.name, "median ms": f"{r['median_s'] * 1e3:.2f}",
                     "min-max ms": f"{r['min_s'] * 1e3:.2f}-{r['max_s'] * 1e3:.2f}",
                     "vs fastest flowkern (Flower form)": f"{r['median_s'] / fastest:.2f}x",
                     "peak extra memory": f"{r['peak_bytes'] / 2**20:.0f} MiB "
                                          f"({r['peak_bytes'] / data.dense_bytes:.2f}x logits)",
                     **bandwidth(variant.moved, r["median_s"], device)})
    if "triton" not in backends(device):
        rows.append({"variant": "flowkern, Triton", "median ms": "CUDA only (no GPU in this run)"})
    return rows, agreement


# ---- the stages ---------------------------------------------------------------------------------

def bench_stages(data, device, repeats):
    """Each stage of each form alone, on every backend that runs here."""
    rows = []
    for backend, label in backends(device).items():
        try:
            stages = stage_functions(backend)
            walk, _ = stages.walk_rewards(data.tokens, data.trie, None, "div", 1.0)
            runs = [("trie walk + process rewards",
                     partial(stages.walk_rewards, data.tokens, data.trie, None, "div", 1.0), None)]
            for form, options in FORMS.items():
                normalize, flower = options["normalize"], options["form"] == "flower"
                policy = (data.logits, data.tokens, walk.nodes, walk.length, data.trie, normalize, flower)
                log_pf, log_pterm, lse = stages.log_probs(*policy)
                pair_sum = partial(stages.pair_sum, log_pf, log_pterm, walk.log_reward, walk.length, 1.0)
                _, _, g = pair_sum()
                out = torch.empty_like(data.logits)
                runs += [(f"{form}: log π", partial(stages.log_probs, *policy), data.read_bytes(normalize)),
                         (f"{form}: pair sum", pair_sum, None),
                         (f"{form}: gradient over the logits",
                          partial(stages.logits_grad, *policy[:5], lse, g, normalize, flower, out),
                          data.read_bytes(normalize) + data.dense_bytes)]
            for stage, run, moved in runs:
                timing = time_call(run, repeats=repeats, warmup=1)
                rows.append({"stage": stage, "backend": label, "median ms": f"{timing['median_s'] * 1e3:.3f}",
                             "min-max ms": f"{timing['min_s'] * 1e3:.3f}-{timing['max_s'] * 1e3:.3f}",
                             **bandwidth(moved, timing["median_s"], device)})
        except Exception as error:  # a backend that cannot run is reported, not hidden
            rows.append({"stage": "the next stage", "backend": label,
                         "median ms": f"{type(error).__name__}: {str(error).splitlines()[0][:120]}"})
    return rows


def stage_functions(backend):
    """The module of the four stages of `backend`: flowkern.eager or flowkern.kernels."""
    if backend == "torch":
        return eager
    from flowkern import kernels

    return kernels


def bench_sweep(data, device, repeats, blocks, warps):
    """The full softmax's log π and gradient kernels for each BLOCK and num_warps."""
    if "triton" not in backends(device):
        return [{"BLOCK": "skipped: no CUDA (nor the Triton interpreter)"}]
    from flowkern import kernels
    from flowkern.kernels import policy

    walk, _ = kernels.walk_rewards(data.tokens, data.trie, None, "div", 1.0)
    args = (data.logits, data.tokens, walk.nodes, walk.length, data.trie, "full", True)
    log_pf, log_pterm, lse = kernels.log_probs(*args)
    _, _, g = kernels.pair_sum(log_pf, log_pterm, walk.log_reward, walk.length, 1.0)
    out = torch.empty_like(data.logits)
    forward = partial(kernels.log_probs, *args)
    backward = partial(kernels.logits_grad, *args[:5], lse, g, "full", True, out)
    launch, used = policy._launch_options, []
    with mock.patch.object(policy, "_launch_options", lambda *a, **k: used.append(launch(*a, **k)) or used[-1]):
        forward(), backward()
    defaults = [(options["BLOCK"], options["num_warps"]) for options in used]  # log π's, the gradient's
    read = data.read_bytes("full")
    rows = []
    for block in blocks:
        for num_warps in warps:
            row = {"BLOCK": block, "num_warps": num_warps}
            override = lambda *a, **k: dict(launch(*a, **k), BLOCK=block, num_warps=num_warps)  # noqa: E731
            for kernel, run, moved, default in (("log π", forward, read, defaults[0]),
                                                ("gradient", backward, read + data.dense_bytes, defaults[1])):
                try:
                    with mock.patch.object(policy, "_launch_options", override):
                        timing = time_call(run, repeats=repeats, warmup=1)
                except Exception as error:  # e.g. out of resources: reported, and the sweep goes on
                    row[f"{kernel} ms"] = f"{type(error).__name__}: {str(error).splitlines()[0][:80]}"
                    continue
                figures = bandwidth(moved, timing["median_s"], device)
                mark = " (default)" if (block, num_warps) == default else ""
                row.update({f"{kernel} ms": f"{timing['median_s'] * 1e3:.3f}{mark}", f"{kernel} GB/s": figures["GB/s"],
                            f"{kernel} % of peak": figures["% of peak"]})
            rows.append(row)
    return rows


# ---- the trie -----------------------------------------------------------------------------------

def bench_build(items, repeats):
    rows = []
    catalogue = movie_catalogue()
    rng = np.random.default_rng(0)
    synthetic = rng.integers(1, 151_643, size=(items, 20), dtype=np.int32)
    movie_lengths = np.array([len(s) for s in catalogue.sequences])
    cases = [("Movies_and_TV titles", catalogue.sequences, np.concatenate(catalogue.sequences).astype(np.int32),
              movie_lengths, catalogue.rewards, catalogue.eos),
             (f"synthetic {items:,} x 20 tokens", synthetic, synthetic.reshape(-1), np.full(items, 20), np.ones(items), 0)]
    for name, sequences, flat, lengths, rewards, eos in cases:
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        tokens = int(lengths.sum())
        build = lambda: flowkern.Trie.from_ragged(flat, offsets, rewards, eos_token_id=eos)  # noqa: E731
        trie = build()
        timing = time_call(build, repeats=repeats, warmup=1)
        arrays = sum(getattr(trie, name).nbytes for name in _ARRAYS)
        rows.append({"catalogue": name, "builder": "flowkern C++ (Trie.from_ragged)",
                     "median s": f"{timing['median_s']:.3f}", "M tokens/s": f"{tokens / timing['median_s'] / 1e6:.1f}",
                     "peak extra memory": f"{peak_memory(build, torch.device('cpu')) / 2**20:.0f} MiB",
                     "bytes per edge": f"{arrays / trie.num_edges:.1f}"})
        python_lists = [list(map(int, s)) for s in sequences]
        build_dict = lambda: published.build_process_rewards(python_lists, rewards, eos)  # noqa: E731
        started = time.perf_counter()
        peak = peak_memory(build_dict, torch.device("cpu"))
        seconds = time.perf_counter() - started
        rows.append({"catalogue": name, "builder": "published-style dict of prefix strings",
                     "median s": f"{seconds:.3f} (1 run)", "M tokens/s": f"{tokens / seconds / 1e6:.2f}",
                     "peak extra memory": f"{peak / 2**20:.0f} MiB", "bytes per edge": f"{peak / trie.num_edges:.0f}",
                     "C++ speed-up": f"{seconds / timing['median_s']:.0f}x"})
    return rows


def bench_walk(data, repeats):
    catalogue, trie, tokens = data.catalogue, data.cpu_trie, data.cpu_tokens
    table = published.build_process_rewards(catalogue.sequences, catalogue.rewards, catalogue.eos)
    flowkern_walk = time_call(lambda: trie.walk(tokens), repeats=repeats)
    lookups = time_call(lambda: published.process_log_rewards(tokens, table, catalogue.eos), repeats=repeats)
    return [{"variant": "published: dict look-up per sample and token", "median ms": f"{lookups['median_s'] * 1e3:.2f}"},
            {"variant": "flowkern: Trie.walk (C++ binary search on CPU)",
             "median ms": f"{flowkern_walk['median_s'] * 1e3:.2f}",
             "speed-up": f"{lookups['median_s'] / flowkern_walk['median_s']:.1f}x"}]


if __name__ == "__main__":
    main()
