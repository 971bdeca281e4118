"""The Flower paper's comparison on one data set with history (its Table 4 and RQ4), from one
command: SFT (BIGRec), Temp, D3, IFairLRS and Flower at the same budget and seeds.

    python benchmarks/paper_table.py --data movies -- --max-steps 400 --eval-every 100 ...
    python benchmarks/paper_table.py --quick --data DIR      # a tiny run: does it work

Each method has one hyperparameter, chosen on **valid** (--select, the selected model's valid
metric; test is never read by a choice):
  SFT       none                       python -m flowkern.train --objective sft
  Temp      decoding temperature T     the SFT model, evaluated again (--eval-only) at each T
  D3        α of the SASRec ensemble   the SFT model, evaluated again with --decode d3
  IFairLRS  reweighting strength β     --objective ifair --ifair-strength β, one run each
  Flower    GFN weight w               --pref sasrec --pref-mode div, one run each
Every run reads test once, at its end; the table shows the selected run's.  The first seed
selects, the other seeds run the selected settings only.  Then the ablations of RQ4 at
Flower's selected w (first seed): the reward (none = popularity, div, add), the supervision
granularity (states every n tokens, or the item only) and λ.  The SASRec behind D3 and the
rewards is trained once per seed (python -m flowkern.sasrec) and is a row of the table.
A run directory under --runs that holds a final.json is read, not run again; --jobs runs
that many at once (one thread each).  Arguments after `--` go to every training run.
Writes results/paper-<NAME>-<device>-<date>.md/json.
"""

import argparse
import concurrent.futures
import json
import os
import re
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import command_note, environment, markdown_table, write_results  # noqa: E402
from benchmarks.train_sweep import HISTORY_METRICS, QUICK, standard_error, train_sasrec  # noqa: E402

METHODS = ("SFT", "Temp", "D3", "IFairLRS", "Flower")
GREEK = str.maketrans({"α": "alpha", "β": "beta", "λ": "lambda"})  # ASCII run directories


def main():
    parser = table_parser(__doc__, os.path.join("runs", "paper"), "one value per grid, one seed, 2 steps, 8 rows")
    parser.add_argument("--temperatures", type=float, nargs="+", default=[0.5, 2.0, 4.0])
    parser.add_argument("--d3-alphas", type=float, nargs="+", default=[0.1, 0.3, 0.5, 0.7, 0.9])
    parser.add_argument("--ifair-strengths", type=float, nargs="+", default=[0.5, 1.0])
    parser.add_argument("--weights", type=float, nargs="+", default=[1e-3, 1e-2], help="Flower's w")
    parser.add_argument("--granularities", nargs="+", default=["5", "10", "item"])
    parser.add_argument("--lams", type=float, nargs="+", default=[0.9, 0.99])
    args, extra = table_arguments(parser)
    if args.quick:
        for grid in ("temperatures", "d3_alphas", "ifair_strengths", "weights", "granularities", "lams"):
            setattr(args, grid, getattr(args, grid)[:1])
    env = environment()  # the code that runs is the code at the start
    table = Table(args, extra)
    rows, ablations, selection = [], [], []
    for seed in args.seeds:
        first = seed == args.seeds[0]
        sasrec = train_sasrec(argparse.Namespace(runs=args.runs, name=args.name, quick=args.quick), args.data, seed)
        rows.append({"method": "SASRec alone", "seed": seed, "setting": "", "minutes": f"{sasrec['seconds'] / 60:.1f}",
                     **{m: f"{sasrec['test'][m]:.4f}" for m in HISTORY_METRICS}})
        chosen = table.methods(seed, sasrec, None if first else table.chosen)
        if first:
            table.chosen = {method: runs[0]["setting"] for method, runs in chosen.items()}
            selection = [table.valid_row(run) for runs in table.grids.values() for run in runs]
            ablations = table.ablations(seed, sasrec)
        rows += [table.test_row(runs[0], seed) for runs in chosen.values()]
    body = (f"## Test: each method at its valid-selected setting\n\n{markdown_table(rows)}\n\n"
            f"## RQ4 ablations at Flower's selected w, seed {args.seeds[0]} (test, and the valid {args.select})"
            f"\n\n{markdown_table(ablations)}\n\n"
            f"## Selection on valid ({args.select} of each run's selected model), seed {args.seeds[0]}\n\n"
            f"{markdown_table(selection)}")
    notes = command_note(args.note)
    if args.quick:  # a check that it runs, not a result
        print(body)
        return
    write_results(f"paper-{args.name}", f"The paper's comparison: {args.name}", env, f"{body}\n\n{notes}",
                  [{k: v for k, v in run.items() if k != "directory"} for run in table.finished])


def table_parser(doc, runs, quick):
    """The options every results table shares (its own grids are added by the caller)."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="a data directory with history, or a shipped set")
    parser.add_argument("--name", help="names the runs and the results file (default: the data's name)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--select", default="NDCG@10", help="the valid metric that selects (higher is better)")
    parser.add_argument("--jobs", type=int, default=2, help="runs at once")
    parser.add_argument("--runs", default=runs, help="where the run directories go")
    parser.add_argument("--quick", action="store_true", help=quick)
    parser.add_argument("--note", default="", help="a paragraph for the results file")
    parser.add_argument("train_args", nargs=argparse.REMAINDER, help="-- then arguments for flowkern.train")
    return parser


def table_arguments(parser):
    """(args, the arguments for every training run); --quick keeps one seed and adds QUICK."""
    args = parser.parse_args()
    extra = args.train_args[1:] if args.train_args[:1] == ["--"] else args.train_args
    args.name = args.name or os.path.basename(os.path.normpath(args.data))
    if args.quick:
        args.seeds, extra = args.seeds[:1], extra + QUICK
    return args, extra


def _only(grid, chosen):
    """The grid {method: [(setting, flags)]}, or with `chosen` ({method: setting}) only those."""
    return {method: [(setting, flags) for setting, flags in settings if chosen is None or setting == chosen[method]]
            for method, settings in grid.items()}


class Table:
    """The runs of the table: each is a dict of method, setting, seed, directory and the run's
    final.json; `grids` holds the first seed's runs per method."""

    def __init__(self, args, extra):
        self.args, self.extra = args, extra
        self.grids, self.chosen, self.finished = {}, {}, []

    def methods(self, seed, sasrec, chosen):
        """{method: [runs]}, best on valid first; with `chosen`, only the chosen settings."""
        args, pref = self.args, ["--pref-model", sasrec["directory"]]
        grid = {"SFT": [("", ["--objective", "sft"])],
                "IFairLRS": [(f"β={b:g}", ["--objective", "ifair", "--ifair-strength", str(b)])
                             for b in args.ifair_strengths],
                "Flower": [(f"w={w:g}", ["--gfn-weight", str(w), "--pref", "sasrec", "--pref-mode", "div", *pref])
                           for w in args.weights]}
        found = self.run_all(_only(grid, chosen), seed)
        sft = found["SFT"][0]["directory"]
        decoding = {"Temp": [(f"T={t:g}", ["--eval-temperature", str(t)]) for t in args.temperatures],
                    "D3": [(f"α={a:g}", ["--decode", "d3", "--d3-alpha", str(a), *pref]) for a in args.d3_alphas]}
        decoding = {method: [(setting, ["--eval-only", "--model", sft, *flags]) for setting, flags in settings]
                    for method, settings in decoding.items()}
        found.update(self.run_all(_only(decoding, chosen), seed))
        for runs in found.values():
            runs.sort(key=lambda run: -run["final"]["valid"][args.select])
        if chosen is None:
            self.grids = found
        return {method: found[method] for method in METHODS}

    def ablations(self, seed, sasrec):
        """Rows of the RQ4 ablations around the selected Flower run."""
        best = self.grids["Flower"][0]
        w = best["setting"]
        weight = ["--gfn-weight", str(next(x for x in self.args.weights if f"w={x:g}" == w))]
        base = [*weight, "--pref-model", sasrec["directory"]]
        variants = [("reward", "none (popularity)", weight),
                    ("reward", "add", [*base, "--pref", "sasrec", "--pref-mode", "add"])]
        variants += [("granularity", g, [*base, "--pref", "sasrec", "--pref-mode", "div", "--granularity", g])
                     for g in self.args.granularities]
        variants += [("λ", f"{lam:g}", [*base, "--pref", "sasrec", "--pref-mode", "div", "--lam", str(lam)])
                     for lam in self.args.lams]
        found = self.run_all({f"Flower {w}, {kind} {value}": [("", flags)] for kind, value, flags in variants}, seed)
        reference = {"reward": "div", "granularity": "1", "λ": "1"}
        rows = []
        for kind in ("reward", "granularity", "λ"):
            rows.append(self.ablation_row(kind, reference[kind], best))
            rows += [self.ablation_row(k, value, found[f"Flower {w}, {k} {value}"][0])
                     for k, value, _ in variants if k == kind]
        return rows

    def run_all(self, grid, seed):
        """Run each (setting, flags) of {method: [...]}, --jobs at once; {method: [run dicts]}."""
        runs = [(method, setting, seed, flags) for method, settings in grid.items() for setting, flags in settings]
        with concurrent.futures.ThreadPoolExecutor(self.args.jobs) as pool:
            done = list(pool.map(lambda run: self.run(*run), runs))
        found = {}
        for run in done:
            found.setdefault(run["method"], []).append(run)
        return found

    def run(self, method, setting, seed, flags):
        name = f"{method}-{setting}".lower().translate(GREEK)
        slug = re.sub("-+", "-", "".join(c if c.isalnum() or c in "." else "-" for c in name)).strip("-")
        out = os.path.join(self.args.runs, f"{self.args.name}-{slug}-seed{seed}")
        command = [sys.executable, "-m", "flowkern.train", "--data", self.args.data, "--out", out, "--seed", str(seed),
                   *self.extra, *flags]
        if os.path.exists(os.path.join(out, "final.json")):
            print(f"reusing {out}", flush=True)
        else:
            print(" ".join(command), flush=True)
            os.makedirs(self.args.runs, exist_ok=True)
            with open(out + ".log", "w") as log:
                code = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT,
                                      env={**os.environ, "OMP_NUM_THREADS": "1"}).returncode
            if code != 0:
                with open(out + ".log") as log:
                    raise SystemExit(f"{' '.join(command)} failed (exit {code}); the end of {out}.log:\n"
                                     + "".join(log.readlines()[-15:]))
        with open(os.path.join(out, "final.json")) as f:
            run = {"method": method, "setting": setting, "seed": seed, "directory": out, "final": json.load(f)}
        self.finished.append(run)
        return run

    def test_row(self, run, seed):
        final = run["final"]
        return {"method": run["method"], "seed": seed, "setting": run["setting"],
                "minutes": f"{final['seconds'] / 60:.1f}", **{m: f"{final['after'][m]:.4f}" for m in HISTORY_METRICS},
                "NDCG@5 SE": f"{standard_error(run['directory'], 5):.4f}"}

    def valid_row(self, run):
        final = run["final"]
        return {"method": run["method"], "setting": run["setting"], "minutes": f"{final['seconds'] / 60:.1f}",
                **{m: f"{final['valid'][m]:.4f}" for m in HISTORY_METRICS}}

    def ablation_row(self, kind, value, run):
        final = run["final"]
        return {"ablation": kind, "value": value, f"valid {self.args.select}": f"{final['valid'][self.args.select]:.4f}",
                **{m: f"{final['after'][m]:.4f}" for m in HISTORY_METRICS}}


if __name__ == "__main__":
    main()
