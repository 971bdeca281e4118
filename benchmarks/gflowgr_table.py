"""GFlowGR against SFT on semantic-ID items, with Flower on titles for reference, from one
command, at the same budget and seeds (issue 15's table).

    python benchmarks/gflowgr_table.py --data movies --seeds 0 1 -- --max-steps 400 --eval-every 100 ...
    python benchmarks/gflowgr_table.py --quick --data DIR      # a tiny run: does it work

Rows, each chosen on **valid** (--select; test is never read by a choice):
  SFT, semantic IDs     --items semantic --objective sft
  GFlowGR-TB, -DB       --items semantic --objective gflowgr --gflowgr-loss tb|db, λ from --lams
  Flower, titles        --pref sasrec --pref-mode div --gfn-weight W (the project's recipe)
The first seed selects λ, the other seeds run the selected λ only.  The SASRec behind the
semantic IDs, the curriculum, the rewards and Flower's preferences is trained once per seed
(python -m flowkern.sasrec) and is a row too.  Finished runs under --runs are reused; --jobs
runs that many at once.  Arguments after `--` go to every training run.  Writes
results/gflowgr-<NAME>-<device>-<date>.md/json.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import command_note, environment, markdown_table, write_results  # noqa: E402
from benchmarks.paper_table import Table, _only, table_arguments, table_parser  # noqa: E402
from benchmarks.train_sweep import HISTORY_METRICS, train_sasrec  # noqa: E402

METHODS = ("SFT, semantic IDs", "GFlowGR-TB", "GFlowGR-DB", "Flower, titles")


def main():
    parser = table_parser(__doc__, os.path.join("runs", "gflowgr"), "one λ, one seed, 2 steps, 8 rows")
    parser.add_argument("--lams", type=float, nargs="+", default=[0.1, 1.0], help="GFlowGR's λ")
    parser.add_argument("--flower-weight", type=float, default=0.01, help="Flower's w (titles)")
    args, extra = table_arguments(parser)
    if args.quick:
        args.lams = args.lams[:1]
    env = environment()
    table = Table(args, extra)
    rows, selection, chosen = [], [], None
    for seed in args.seeds:
        sasrec = train_sasrec(argparse.Namespace(runs=args.runs, name=args.name, quick=args.quick), args.data, seed)
        rows.append({"method": "SASRec alone", "seed": seed, "setting": "", "minutes": f"{sasrec['seconds'] / 60:.1f}",
                     **{m: f"{sasrec['test'][m]:.4f}" for m in HISTORY_METRICS}})
        found = table.run_all(_only(grid(args, sasrec["directory"]), chosen), seed)
        for runs in found.values():
            runs.sort(key=lambda run: -run["final"]["valid"][args.select])
        if chosen is None:
            chosen = {method: runs[0]["setting"] for method, runs in found.items()}
            selection = [table.valid_row(run) for method in METHODS for run in found[method]]
        rows += [table.test_row(found[method][0], seed) for method in METHODS]
    body = (f"## Test: each row at its valid-selected setting\n\n{markdown_table(rows)}\n\n"
            f"## Selection on valid ({args.select} of each run's selected model), seed {args.seeds[0]}\n\n"
            f"{markdown_table(selection)}")
    if args.quick:  # a check that it runs, not a result
        print(body)
        return
    write_results(f"gflowgr-{args.name}", f"GFlowGR against SFT on semantic IDs: {args.name}", env,
                  f"{body}\n\n{command_note(args.note)}",
                  [{k: v for k, v in run.items() if k != "directory"} for run in table.finished])


def grid(args, sasrec):
    """{method: [(setting, flags)]}: every run shares the seed's SASRec."""
    pref, semantic = ["--pref-model", sasrec], ["--items", "semantic", "--pref-model", sasrec]
    gflowgr = {f"GFlowGR-{loss.upper()}": [(f"λ={lam:g}", [*semantic, "--objective", "gflowgr", "--gflowgr-loss", loss,
                                                         "--gfn-weight", str(lam)]) for lam in args.lams]
               for loss in ("tb", "db")}
    return {"SFT, semantic IDs": [("", [*semantic, "--objective", "sft"])], **gflowgr,
            "Flower, titles": [(f"w={args.flower_weight:g}", ["--gfn-weight", str(args.flower_weight), "--pref",
                                                              "sasrec", "--pref-mode", "div", *pref])]}


if __name__ == "__main__":
    main()
