"""Top-10 constrained beam search over a test split, rows per second: the evaluation of a
with-history run, before and after batching the beams of many prompts, in one run.

    python benchmarks/bench_recommend.py              # 200 Movies_and_TV test rows; writes results/
    python benchmarks/bench_recommend.py --threads 1  # the same on one thread (a loaded machine)
    python benchmarks/bench_recommend.py --quick      # seconds, 8 rows, writes nothing

The model is the embedded one (2-layer hidden-64 Qwen2 with the real 151,936-token
vocabulary, untrained, seed 0) with the restricted head, as the trainer evaluates it:
k = 10, num_beams = 10.  "Before" is `recommend` as of commit d5744dc, read from git and
called on chunks of 8 prompts in split order (the trainer's hard-coded chunking); "after" is
this tree's `recommend`, on the same chunks and with batch_size = B over all the rows.  The
variants run interleaved, one pass each per repeat, so that the machine's load hits them
alike; every variant's rankings are compared with the first one's.
"""

import argparse
import os
import statistics
import subprocess
import sys
import time
import types

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import flowkern  # noqa: E402
from benchmarks.common import environment, markdown_table, write_results  # noqa: E402
from flowkern.data import load_task  # noqa: E402
from flowkern.head import linear_head  # noqa: E402
from flowkern.models import load_model  # noqa: E402

BEFORE = "d5744dc"  # the last commit before beams were batched across prompts


def module_at(commit, path):
    """The Python module `path` as of `commit` (its imports resolve to this tree)."""
    source = subprocess.run(["git", "show", f"{commit}:{path}"], capture_output=True, text=True, check=True,
                            cwd=ROOT).stdout
    module = types.ModuleType(f"{path}@{commit}")
    exec(compile(source, f"{path}@{commit}", "exec"), module.__dict__)
    return module


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=200, help="the first ROWS test rows")
    parser.add_argument("--batch-sizes", default="8,16,32,64,128")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--quick", action="store_true", help="8 rows, one pass, no result files")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.rows, args.batch_sizes, args.repeats = 8, "4,8", 1
    env = environment()  # the code that runs is the code at the start, and the load before the timings

    loaded = load_model(None, seed=0)
    model = loaded.model.eval()
    task = load_task("movies", loaded.tokenizer)
    trie, head = task.trie(), linear_head(model)
    prompts = [example.prompt for example in task.test[: args.rows]]
    before = module_at(BEFORE, "flowkern/generation.py").recommend
    options = dict(k=10, num_beams=10, restricted_head=head)

    def chunks_of_8(recommend, rows):
        parts = [recommend(model, rows[start:start + 8], trie, **options) for start in range(0, len(rows), 8)]
        return torch.cat([p.items for p in parts]), torch.cat([p.scores for p in parts])

    def batched(size, rows):
        got = flowkern.recommend(model, rows, trie, batch_size=size, **options)
        return got.items, got.scores

    variants = [(f"before ({BEFORE}): chunks of 8", lambda rows: chunks_of_8(before, rows)),
                ("after: chunks of 8", lambda rows: chunks_of_8(flowkern.recommend, rows))]
    variants += [(f"after: batch_size={size}", lambda rows, size=size: batched(size, rows))
                 for size in map(int, args.batch_sizes.split(","))]
    for _, run in variants:  # warm-up: lazy initialisation, the allocator's first blocks
        run(prompts[:8])
    seconds = {name: [] for name, _ in variants}
    results = {}
    loads = [os.getloadavg()[0]]
    for _ in range(args.repeats):
        for name, run in variants:
            start = time.perf_counter()
            results[name] = run(prompts)
            seconds[name].append(time.perf_counter() - start)
            loads.append(os.getloadavg()[0])

    base_items, base_scores = results[variants[0][0]]
    base = statistics.median(seconds[variants[0][0]])
    rows = []
    for name, _ in variants:
        items, scores = results[name]
        median = statistics.median(seconds[name])
        finite = torch.isfinite(base_scores)
        rows.append({"variant": name, "rows/s": f"{len(prompts) / median:.2f}",
                     "min-max s": f"{min(seconds[name]):.1f}-{max(seconds[name]):.1f}",
                     "speed-up": f"{base / median:.2f}x",
                     "same items, same order": f"{int((items == base_items).all(1).sum())}/{len(prompts)}",
                     "max |score diff|": f"{float((scores - base_scores)[finite].abs().max()):.1e}"})
    notes = (f"{len(prompts)} Movies_and_TV test rows ({min(map(len, prompts))}-{max(map(len, prompts))} prompt "
             f"tokens), {trie.num_items} items, k = 10, num_beams = 10, restricted head; median of {args.repeats} "
             f"interleaved passes.  Speed-up: before's median time over the variant's.  Rankings compared with "
             f"before's: rows whose ten items agree in order, and the largest score difference.  1-minute load "
             f"average during the passes: {min(loads):.2f}-{max(loads):.2f}.")
    if args.quick:
        print(markdown_table(rows))
        return
    write_results(f"recommend-{torch.get_num_threads()}-threads", "Top-10 constrained beam search over a test split", env,
                  f"{markdown_table(rows)}\n\n{notes}", rows)


if __name__ == "__main__":
    main()
