"""Flower against SFT with the trainer, side by side: one run per GFN weight w (and SFT
normalisation), same seed.

    python benchmarks/train_sweep.py                          # embedded default, w in 0 .. 0.9
    python benchmarks/train_sweep.py --name NAME --weights 0 0.5 -- --model smollm2 --max-steps 60
    python benchmarks/train_sweep.py --name NAME --weights 0 --sft-normalize full trie   # restricted SFT

Arguments after `--` go to every `python -m flowkern.train` run (w = 0 runs --objective sft).
Writes results/train-<NAME>-<device>-<date>.md/json with each run's before/after metrics.
"""

import argparse
import json
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import environment, markdown_table, write_results  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--name", default="embedded-history-free")
    parser.add_argument("--weights", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 0.9])
    parser.add_argument("--sft-normalize", nargs="+", default=["full"], choices=["full", "trie"],
                        help="SFT over the full vocabulary and/or the trie children, one run each")
    parser.add_argument("--runs", default=os.path.join("runs", "sweep"), help="where the run directories go")
    parser.add_argument("train_args", nargs=argparse.REMAINDER, help="-- then arguments for flowkern.train")
    args = parser.parse_args()
    extra = args.train_args[1:] if args.train_args[:1] == ["--"] else args.train_args
    env = environment()  # the code that runs is the code at the start
    rows = []
    for weight, sft in ((w, n) for w in args.weights for n in args.sft_normalize):
        out = os.path.join(args.runs, f"{args.name}-w{weight}-sft-{sft}")
        objective = ["--objective", "sft"] if weight == 0 else ["--gfn-weight", str(weight)]
        command = [sys.executable, "-m", "flowkern.train", "--out", out, *objective, "--sft-normalize", sft, *extra]
        print(" ".join(command), flush=True)
        subprocess.run(command, check=True)
        with open(os.path.join(out, "final.json")) as f:
            final = json.load(f)
        run = ("SFT" if weight == 0 else f"Flower w={weight}") + ("" if sft == "full" else " (SFT over the trie)")
        row = {"run": run, "minutes": f"{final['seconds'] / 60:.1f}"}
        for name, value in final["after"].items():
            if isinstance(value, float):
                before = final["before"].get(name) if final["before"] else None
                row[name] = f"{before:.4f} → {value:.4f}" if before is not None else f"{value:.4f}"
        rows.append(row)
    notes = ("Each cell: before training (step 0) → after. Command: python benchmarks/train_sweep.py "
             + " ".join(sys.argv[1:]))
    write_results(f"train-{args.name}", f"Flower vs SFT: {args.name}", env,
                  f"{markdown_table(rows)}\n\n{notes}", rows)


if __name__ == "__main__":
    main()
