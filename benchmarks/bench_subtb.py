"""Flower's loss, side by side: flowkern against the published way of computing it.

    python benchmarks/bench_subtb.py                  # preset "cpu" here, "paper" on a GPU; writes results/
    python benchmarks/bench_subtb.py --preset paper   # Qwen2.5 V = 151,936, B = 128 rollouts x T = 32
    python benchmarks/bench_subtb.py --quick          # small sizes, no torch.compile, writes nothing (CI)

Times forward + backward (the Flower form with the full softmax, the published objective)
of: the published-style code (reference/published.py: dict look-ups per token, materialised
log-softmax, a loop over subtrajectory lengths), the loop-level reference (small sizes only),
flowkern's PyTorch path eagerly and under torch.compile, flowkern's default (process form,
trie policy), the Triton path on CUDA, and the memory floor: a copy of the logits into a new
tensor, which any path that reads them and returns a fresh gradient must exceed (on a CPU,
paging in the new tensor's memory is most of it).  Also the trie build (C++
against the published dict of prefix strings) and the trie walk with reward look-up alone.
Every figure comes from this one run; ratios are to flowkern's fastest path.
"""

import argparse
import logging
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import flowkern  # noqa: E402
from flowkern.trie import _ARRAYS  # noqa: E402
from benchmarks.common import (environment, fix_malloc_threshold, peak_memory, sections_markdown,  # noqa: E402
                               time_call, write_results)
from reference import published  # noqa: E402
from reference import subtb as loops  # noqa: E402
from tests.strategies import movie_catalogue  # noqa: E402

PRESETS = {  # batch (rollouts), title positions, vocabulary
    "paper": (128, 32, 151_936),
    "cpu": (32, 32, 151_936),
    "small": (8, 16, 32_768),
    "quick": (4, 8, 4_096),
}
PEAK_BANDWIDTH = {"H100": 3.35e12, "H200": 4.8e12, "A100": 2.0e12}  # bytes/s, SXM parts


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=PRESETS, help="default: paper on a GPU, cpu otherwise")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--trie-items", type=int, default=1_000_000, help="synthetic catalogue of 20-token items")
    parser.add_argument("--json", help="also write every figure to this file")
    parser.add_argument("--quick", action="store_true", help="small sizes, no torch.compile, no result files")
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    if args.quick:
        args.preset, args.repeats, args.trie_items = "quick", 2, 10_000
    preset = args.preset or ("paper" if cuda else "cpu")
    device = torch.device("cuda" if cuda else "cpu")
    env = environment()  # the code that runs is the code at the start
    fix_malloc_threshold()

    loss_rows, check = bench_loss(PRESETS[preset], device, args.repeats, compile_too=not args.quick)
    build_rows = bench_build(args.trie_items, args.repeats)
    walk_rows = bench_walk(PRESETS[preset], args.repeats)
    batch, steps, vocab = PRESETS[preset]
    sections = [
        (f"Loss forward + backward, preset {preset}: B = {batch}, T = {steps}, V = {vocab}, "
         f"{'bfloat16' if cuda else 'float32'} logits", loss_rows),
        ("Trie build", build_rows),
        (f"Trie walk + process-reward look-up alone, B = {batch}, T = {steps}", walk_rows),
    ]
    body = sections_markdown(sections)
    body += (f"\n\nLoss values agree across the Flower-form variants to a relative {check:.1e}.  Memory is the peak "
             f"{'CUDA allocation' if cuda else 'resident set'} above what was in use before the call, sampled every "
             f"millisecond.  Command: python benchmarks/bench_subtb.py {' '.join(sys.argv[1:])}")
    if args.quick:
        print(body)
        return
    rows = [dict(row, section=title) for title, part in sections for row in part]
    write_results("", "flowkern benchmark: Flower's SubTB loss", env, body, rows)
    if args.json:
        import json

        with open(args.json, "w") as f:
            json.dump({"environment": env, "rows": rows}, f, indent=1)


# ---- the loss -----------------------------------------------------------------------------------

def bench_loss(preset, device, repeats, compile_too):
    batch, steps, vocab = preset
    catalogue, trie, oracle, table, tokens = trajectories(batch, steps, vocab)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    logits = torch.randn(batch, steps, vocab, generator=torch.Generator().manual_seed(0)).to(device, dtype)
    trie_d, tokens_d = trie.to(device), tokens.to(device)
    eos = catalogue.eos

    def fwd_bwd(loss_fn):
        def run():
            x = logits.detach().requires_grad_()
            loss = loss_fn(x)
            loss.backward()
            return float(loss)
        return run

    flower = dict(form="flower", normalize="full")
    variants = [("published-style (reference/published.py)",
                 fwd_bwd(lambda x: published.subtb_loss(x, tokens_d, table, eos)))]
    if batch * steps <= 64:
        variants.append(("reference loops (reference/subtb.py)",
                         fwd_bwd(lambda x: loops.subtb_loss(x, oracle, tokens, **flower))))
    variants.append(("flowkern, PyTorch eager", fwd_bwd(lambda x: flowkern.subtb_loss(x, trie_d, tokens=tokens_d,
                                                                                       **flower))))
    if compile_too:
        logging.getLogger("torch._dynamo").setLevel(logging.ERROR)  # graph-break warnings
        compiled = torch.compile(flowkern.subtb_loss)
        variants.append(("flowkern, torch.compile", fwd_bwd(lambda x: compiled(x, trie_d, tokens=tokens_d, **flower))))
    default = ("flowkern default: process form, trie policy",
               fwd_bwd(lambda x: flowkern.subtb_loss(x, trie_d, tokens=tokens_d)))

    floor = ("floor: copy the logits into a new tensor (read B·T·V, allocate and write B·T·V)",
             lambda: torch.empty_like(logits).copy_(logits))
    results, values = {}, {}
    for name, run in variants + [default, floor]:
        try:
            values[name] = run()
            timing = time_call(run, repeats=repeats, warmup=1)
            timing["peak_bytes"] = peak_memory(run, device)
            results[name] = timing
        except Exception as error:  # a variant that cannot run is reported, not hidden
            results[name] = {"error": f"{type(error).__name__}: {str(error).splitlines()[0][:120]}"}
    flower_values = [v for k, v in values.items() if k not in (default[0], floor[0])]
    check = max(abs(v - flower_values[0]) / abs(flower_values[0]) for v in flower_values)
    fastest = min(r["median_s"] for k, r in results.items() if k.startswith("flowkern") and "median_s" in r
                  and k != default[0])
    logits_bytes = logits.numel() * logits.element_size()
    rows = []
    for name, r in results.items():
        if "error" in r:
            rows.append({"variant": name, "median ms": r["error"]})
            continue
        row = {"variant": name, "median ms": f"{r['median_s'] * 1e3:.1f}",
               "min-max ms": f"{r['min_s'] * 1e3:.1f}-{r['max_s'] * 1e3:.1f}",
               "vs fastest flowkern (Flower form)": f"{r['median_s'] / fastest:.2f}x",
               "peak extra memory": f"{r['peak_bytes'] / 2**20:.0f} MiB ({r['peak_bytes'] / logits_bytes:.2f}x logits)"}
        if device.type == "cuda" and name != floor[0]:
            moved = 3 * logits_bytes  # read in forward, read again and gradient written in backward
            peak = next((v for k, v in PEAK_BANDWIDTH.items() if k in torch.cuda.get_device_name()), None)
            row["bandwidth"] = f"{moved / r['median_s'] / 1e9:.0f} GB/s" + (
                f" ({100 * moved / r['median_s'] / peak:.0f}% of peak)" if peak else "")
        rows.append(row)
    if device.type != "cuda":
        rows.append({"variant": "flowkern, Triton", "median ms": "CUDA only (no GPU in this run)"})
    return rows, check


def trajectories(batch, steps, vocab):
    """The Movies_and_TV title trie (Qwen2.5 ids, folded into the vocabulary if it is
    smaller) and `batch` random items that fit in `steps` positions, padded with "\\n"."""
    catalogue = movie_catalogue()
    if vocab <= max(max(s) for s in catalogue.sequences):
        eos = vocab - 1
        catalogue.sequences = [[t % eos for t in s] for s in catalogue.sequences]
        catalogue.eos = eos
    fits = [i for i, s in enumerate(catalogue.sequences) if len(s) < steps]
    rng = np.random.default_rng(0)
    picked = rng.choice(fits, size=batch)
    tokens = torch.tensor([catalogue.sequences[i] + [catalogue.eos] * (steps - len(catalogue.sequences[i]))
                           for i in picked])
    table = published.build_process_rewards(catalogue.sequences, catalogue.rewards, catalogue.eos)
    return catalogue, catalogue.trie(), catalogue.dict_trie(), table, tokens


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


def bench_walk(preset, repeats):
    batch, steps, vocab = preset
    catalogue, trie, _, table, tokens = trajectories(batch, steps, vocab)
    flowkern_walk = time_call(lambda: trie.walk(tokens), repeats=repeats)
    lookups = time_call(lambda: published.process_log_rewards(tokens, table, catalogue.eos), repeats=repeats)
    return [{"variant": "published: dict look-up per sample and token", "median ms": f"{lookups['median_s'] * 1e3:.2f}"},
            {"variant": "flowkern: Trie.walk (C++ binary search on CPU)",
             "median ms": f"{flowkern_walk['median_s'] * 1e3:.2f}",
             "speed-up": f"{lookups['median_s'] / flowkern_walk['median_s']:.1f}x"}]


if __name__ == "__main__":
    main()
