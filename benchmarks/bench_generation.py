"""One constrained decoding step, side by side: flowkern's CSR mask against the per-row
`torch.isin` mask of the published code, and against an unconstrained step.

    python benchmarks/bench_generation.py            # B = 64, V = 151,936 (Qwen2.5); writes results/
    python benchmarks/bench_generation.py --quick    # seconds, small sizes, writes nothing

Rows sit at random states of the Movies_and_TV title trie (real Qwen2.5 ids): a random
item, cut after a random number of its tokens.  Each variant is timed on the same logits.
"""

import argparse
import os
import random
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import flowkern  # noqa: E402
from benchmarks.common import environment, markdown_table, time_call, write_results  # noqa: E402
from reference.generation import isin_mask  # noqa: E402
from tests.strategies import movie_catalogue  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--vocab", type=int, default=151_936)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--quick", action="store_true", help="small sizes, no result files")
    args = parser.parse_args()
    if args.quick:
        args.batch, args.vocab, args.repeats = 8, 151_936, 2
    env = environment()  # the code that runs is the code at the start, and the load before the timings

    catalogue = movie_catalogue()
    trie, oracle = catalogue.trie(), catalogue.dict_trie()
    rng = random.Random(0)
    prefixes = []
    for _ in range(args.batch):
        sequence = rng.choice(catalogue.sequences)
        prefixes.append(sequence[: rng.randint(0, len(sequence))])
    width = max(map(len, prefixes))
    padded = torch.tensor([p + [-1] * (width - len(p)) for p in prefixes], dtype=torch.long).view(len(prefixes), width)
    nodes = trie.walk(padded).nodes.gather(1, torch.tensor([[len(p)] for p in prefixes]))[:, 0]
    logits = torch.randn(args.batch, args.vocab, generator=torch.Generator().manual_seed(0))
    generator = torch.Generator().manual_seed(1)

    def draw(masked):
        return torch.multinomial(torch.softmax(masked, -1), 1, generator=generator)

    def children_step():
        children = flowkern.children_logits(logits, nodes, trie)
        return children.tokens.gather(1, draw(children.logits))

    variants = [
        ("unconstrained: softmax + sample over V", "none", lambda: draw(logits)),
        ("published: per-row isin mask", "mask", lambda: isin_mask(logits, prefixes, oracle)),
        ("published: per-row isin mask + sample", "step", lambda: draw(isin_mask(logits, prefixes, oracle))),
        ("flowkern.mask_logits", "mask", lambda: flowkern.mask_logits(logits, nodes, trie)),
        ("flowkern.mask_logits + sample", "step", lambda: draw(flowkern.mask_logits(logits, nodes, trie))),
        ("flowkern.children_logits", "mask", lambda: flowkern.children_logits(logits, nodes, trie)),
        ("flowkern.children_logits + sample (flowkern.sample)", "step", children_step),
    ]
    timings = {name: time_call(fn, repeats=args.repeats) for name, _, fn in variants}
    baseline = {"mask": timings["published: per-row isin mask"]["median_s"],
                "step": timings["published: per-row isin mask + sample"]["median_s"]}
    unconstrained = timings["unconstrained: softmax + sample over V"]["median_s"]
    rows = []
    for name, kind, _ in variants:
        t = timings[name]
        rows.append({"variant": name, "median ms": f"{t['median_s'] * 1e3:.3f}",
                     "min-max ms": f"{t['min_s'] * 1e3:.3f}-{t['max_s'] * 1e3:.3f}",
                     "published / this": f"{baseline[kind] / t['median_s']:.1f}x" if kind != "none" else "",
                     "this / unconstrained": f"{t['median_s'] / unconstrained:.2f}x"})
    notes = (f"B = {args.batch} rows, V = {args.vocab}, float32 logits; trie: {trie.num_items} Movies_and_TV items, "
             f"{trie.num_nodes} nodes, widest node {trie.max_degree} children; median of {args.repeats} repeats "
             f"after 2 warm-up calls.  'published / this' is the speed-up over the per-row isin variant of the "
             f"same kind (mask alone, or mask + sample).  Each variant starts from what its code keeps between "
             f"steps: the published mask looks each row's prefix up in the dict of prefixes, flowkern's reads the "
             f"row's trie node (flowkern.sample takes the next node from the children it returns).")
    if args.quick:
        print(rows)
        return
    write_results("generation", "Constrained decoding step", env, f"{markdown_table(rows)}\n\n{notes}", rows)


if __name__ == "__main__":
    main()
