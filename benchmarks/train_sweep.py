"""Flower against SFT with the trainer, side by side: one `python -m flowkern.train` run per
GFN weight w, reward and setting; with history, each reward's w is selected on valid.

    python benchmarks/train_sweep.py                          # embedded history-free default, w in 0 .. 0.9
    python benchmarks/train_sweep.py --name NAME --weights 0 0.5 -- --model smollm2 --max-steps 60
    python benchmarks/train_sweep.py --name movies-rq2 --weights 0 1e-4 1e-3 1e-2 1e-1 \\
        --rewards popularity div add --seeds 0 1 -- --data movies --epochs 1 --eval-every 100 ...
    python benchmarks/train_sweep.py --quick -- --data DIR     # two tiny runs: does it work

With history (the paper's RQ2): the first seed runs every w × reward × setting and, per reward
and setting, the w whose final (selected) model has the best `--select` metric on **valid** is
kept; the other seeds run SFT and those choices only.  Test is read by each run once, at its
end, and never by the selection.  The SASRec behind the div/add rewards is trained once per
seed (python -m flowkern.sasrec) and is a row of the table.  w = 0 runs --objective sft.
Arguments after `--` go to every run.  A run directory under --runs that holds a final.json
(or a SASRec's report.json) is read, not run again: an interrupted sweep continues, and
sweeps over parts of a grid can run side by side and be tabled together.
Writes results/train-<NAME>-<device>-<date>.md/json.
"""

import argparse
import itertools
import json
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import command_note, environment, markdown_table, write_results  # noqa: E402

HISTORY_METRICS = ("HR@5", "NDCG@5", "HR@10", "NDCG@10", "DGU@10", "MGU@10", "H", "TTR")
QUICK = ["--max-steps", "2", "--eval-limit", "8", "--per-device-eval-batch-size", "8", "--batch-size", "4"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--name", default="embedded-history-free")
    parser.add_argument("--weights", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 0.9])
    parser.add_argument("--rewards", nargs="+", default=["popularity"], choices=["popularity", "div", "add"],
                        help="the SubTB reward: item popularity, or personalised by a SASRec (--pref sasrec)")
    parser.add_argument("--subtb-params", nargs="+", default=["all"], choices=["all", "body"],
                        help="what the SubTB term trains, one run each")
    parser.add_argument("--sft-normalize", nargs="+", default=["full"], choices=["full", "trie"],
                        help="SFT over the full vocabulary and/or the trie children, one run each")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--select", default="NDCG@10", help="with history: the valid metric that selects w "
                                                             "(higher is better)")
    parser.add_argument("--quick", action="store_true", help="w in {0, 0.01}, rewards popularity and div, one "
                                                             "seed, 2 steps, 8 evaluation rows")
    parser.add_argument("--runs", default=os.path.join("runs", "sweep"), help="where the run directories go")
    parser.add_argument("--note", default="", help="a paragraph for the results file (budget, what ran where)")
    parser.add_argument("train_args", nargs=argparse.REMAINDER, help="-- then arguments for flowkern.train")
    args = parser.parse_args()
    extra = args.train_args[1:] if args.train_args[:1] == ["--"] else args.train_args
    if args.quick:
        args.weights, args.rewards, args.seeds, extra = [0.0, 0.01], ["popularity", "div"], args.seeds[:1], \
            extra + QUICK
    data = extra[extra.index("--data") + 1] if "--data" in extra else None
    from flowkern.data import resolve

    history = os.path.isdir(resolve(data))
    env = environment()  # the code that runs is the code at the start
    runs, sasrec = [], {}
    for seed in args.seeds:
        first = seed == args.seeds[0]
        if history and set(args.rewards) - {"popularity"}:
            sasrec[seed] = train_sasrec(args, data, seed)
        for setting in settings(args):
            if not first and history and setting["w"] > 0 and setting not in selected(runs, args):
                continue
            directory, final = train(args, setting, seed, extra, sasrec.get(seed))
            runs.append({**setting, "seed": seed, "directory": directory, "final": final})
    if history:
        body = history_tables(runs, sasrec, args)
    else:
        body = markdown_table([history_free_row(run) for run in runs])
    notes = command_note(args.note)
    if args.quick:  # a check that it runs, not a result
        print(body)
        return
    write_results(f"train-{args.name}", f"Flower vs SFT: {args.name}", env, f"{body}\n\n{notes}",
                  [{k: v for k, v in run.items() if k not in ("final", "directory")} | {"final": summary(run["final"])}
                   for run in runs]
                  + [{"sasrec": report, "seed": seed} for seed, report in sasrec.items()])


def settings(args):
    """Every run of one seed: SFT per SFT normalisation, then w > 0 × reward × SubTB params."""
    for sft in args.sft_normalize:
        if 0.0 in args.weights:
            yield {"w": 0.0, "reward": "popularity", "subtb_params": "all", "sft": sft}
        for w, reward, params in itertools.product([w for w in args.weights if w > 0], args.rewards,
                                                   args.subtb_params):
            yield {"w": w, "reward": reward, "subtb_params": params, "sft": sft}


def selected(runs, args):
    """Per (reward, SubTB params, SFT normalisation): the first seed's setting whose valid
    `--select` metric is highest (test is not read)."""
    first = [r for r in runs if r["seed"] == args.seeds[0] and r["w"] > 0]
    best = {}
    for run in first:
        key = (run["reward"], run["subtb_params"], run["sft"])
        if key not in best or run["final"]["valid"][args.select] > best[key]["final"]["valid"][args.select]:
            best[key] = run
    return [{k: run[k] for k in ("w", "reward", "subtb_params", "sft")} for run in best.values()]


def train_sasrec(args, data, seed):
    out = os.path.join(args.runs, f"{args.name}-sasrec-seed{seed}")
    if os.path.exists(os.path.join(out, "report.json")):
        print(f"reusing {out}", flush=True)
        with open(os.path.join(out, "report.json")) as f:
            return {**json.load(f), "directory": out}
    command = [sys.executable, "-m", "flowkern.sasrec", "--data", data, "--out", out, "--seed", str(seed)]
    if args.quick:
        command += ["--max-epochs", "2"]
    print(" ".join(command), flush=True)
    subprocess.run(command, check=True)
    with open(os.path.join(out, "report.json")) as f:
        return {**json.load(f), "directory": out}


def train(args, setting, seed, extra, sasrec):
    w, reward = setting["w"], setting["reward"]
    out = os.path.join(args.runs, f"{args.name}-w{w}-{reward}-{setting['subtb_params']}-sft-{setting['sft']}"
                                  f"-seed{seed}")
    command = [sys.executable, "-m", "flowkern.train", "--out", out, "--seed", str(seed),
               "--sft-normalize", setting["sft"], *extra]
    if w == 0:
        command += ["--objective", "sft"]
    else:
        command += ["--gfn-weight", str(w), "--subtb-params", setting["subtb_params"]]
    if reward != "popularity":
        command += ["--pref", "sasrec", "--pref-model", sasrec["directory"], "--pref-mode", reward]
    if os.path.exists(os.path.join(out, "final.json")):
        print(f"reusing {out}", flush=True)
    else:
        print(" ".join(command), flush=True)
        subprocess.run(command, check=True)
    with open(os.path.join(out, "final.json")) as f:
        return out, json.load(f)


def standard_error(directory, k):
    """The standard error of NDCG@k over the test rows (predictions.jsonl): how far apart two
    runs' figures must be before they say more than the sample of rows."""
    import numpy as np

    from flowkern import metrics

    with open(os.path.join(directory, "predictions.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    gains = [metrics.accuracy([row["titles"]], [row["target_title"]], ks=(k,))[f"NDCG@{k}"] for row in rows]
    return float(np.std(gains, ddof=1) / np.sqrt(len(gains)))


def label(run):
    if run["w"] == 0:
        name = "SFT"
    else:
        reward = "popularity reward" if run["reward"] == "popularity" else f"SASRec {run['reward']}"
        name = f"Flower w={run['w']:g}, {reward}" + (", SubTB not in the output layer"
                                                     if run["subtb_params"] == "body" else "")
    return name + ("" if run["sft"] == "full" else " (SFT over the trie)")


def history_tables(runs, sasrec, args):
    """The selection table (valid, every run of the first seed) and the results table (test,
    SASRec, SFT and each selected setting, every seed)."""
    first = [r for r in runs if r["seed"] == args.seeds[0]]
    valid_rows = [{"run": label(r), "steps": r["final"]["best"]["steps"], "minutes": f"{r['final']['seconds'] / 60:.1f}",
                   **{m: f"{r['final']['valid'][m]:.4f}" for m in HISTORY_METRICS}} for r in first]
    chosen = selected(runs, args)
    test_rows = []
    for seed in args.seeds:
        if seed in sasrec:
            report = sasrec[seed]
            test_rows.append({"run": "SASRec alone", "seed": seed, "minutes": f"{report['seconds'] / 60:.1f}",
                              **{m: f"{report['test'][m]:.4f}" for m in HISTORY_METRICS}})
        for r in runs:
            keep = r["w"] == 0 or {k: r[k] for k in ("w", "reward", "subtb_params", "sft")} in chosen
            if r["seed"] == seed and keep:
                test_rows.append({"run": label(r), "seed": seed, "minutes": f"{r['final']['seconds'] / 60:.1f}",
                                  **{m: f"{r['final']['after'][m]:.4f}" for m in HISTORY_METRICS},
                                  "NDCG@5 SE": f"{standard_error(r['directory'], 5):.4f}"})
    return (f"## Test: SASRec, SFT and each reward at its valid-selected w\n\n{markdown_table(test_rows)}\n\n"
            f"## Selection on valid ({args.select} of each run's final model), seed {args.seeds[0]}\n\n"
            f"{markdown_table(valid_rows)}")


def history_free_row(run):
    final = run["final"]
    row = {"run": label(run), "minutes": f"{final['seconds'] / 60:.1f}"}
    for name, value in final["after"].items():
        if isinstance(value, float):
            before = final["before"].get(name) if final["before"] else None
            row[name] = f"{before:.4f} → {value:.4f}" if before is not None else f"{value:.4f}"
    return row


def summary(final):
    return {k: v for k, v in final.items() if k in ("before", "valid", "after", "best", "seconds")}


if __name__ == "__main__":
    main()
