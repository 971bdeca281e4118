"""The optimiser step of the embedded default under FlowerTrainer against the hand-rolled loop
it replaced (commit d5744dc), side by side.

    python benchmarks/bench_trainer.py [--old-tree DIR] [--steps 10] [--rounds 2]

Both run `python -m flowkern.train`'s default (embedded Qwen2, history-free, batch 32, w = 0.9,
restricted head, seed 0) in their own process, taking turns: the old loop's `train_step`
from a checkout of d5744dc (`git worktree add DIR d5744dc` and `python setup.py build_ext
--inplace` there; made in a temporary directory when --old-tree is not given), and
FlowerTrainer.train with a callback timing each optimiser step (rollouts, forward, backward,
clipping, AdamW, the Trainer's bookkeeping).  The first step of each run is left out.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import environment, markdown_table, write_results  # noqa: E402

OLD_COMMIT = "d5744dc"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

OLD = """
import json, sys, time, torch
from flowkern import train
from flowkern.data import load_task
from flowkern.models import load_model
args = train.parse_args([])
loaded = load_model(None, seed=0)
task = load_task(None, loaded.tokenizer)
args.gfn_weight = train.gfn_weight(args, task)
head, _ = train.output_head(loaded.model, False)
scorer, trie = train.Scorer(loaded.model, head), task.trie()
optimizer = torch.optim.AdamW([p for p in loaded.model.parameters() if p.requires_grad], lr=3e-3, weight_decay=0.0)
seconds = []
for step in range(int(sys.argv[1]) + 1):
    torch.manual_seed(step)
    start = time.perf_counter()
    train.train_step(scorer, optimizer, task, trie, None, args, step, 0, 1, 1)
    seconds.append(time.perf_counter() - start)
print(json.dumps(seconds[1:]))
"""

NEW = """
import json, sys, tempfile, time
from transformers import TrainerCallback
from flowkern.data import load_task
from flowkern.models import load_model
from flowkern.trainer import FlowerConfig, FlowerTrainer
class Timer(TrainerCallback):
    seconds = []
    def on_step_begin(self, *args, **kwargs):
        self.start = time.perf_counter()
    def on_step_end(self, *args, **kwargs):
        self.seconds.append(time.perf_counter() - self.start)
loaded = load_model(None, seed=0)
task = load_task(None, loaded.tokenizer)
config = FlowerConfig(output_dir=tempfile.mkdtemp(), max_steps=int(sys.argv[1]) + 1, learning_rate=3e-3,
                      save_strategy="no", report_to=["none"], disable_tqdm=True, logging_steps=1000)
trainer = FlowerTrainer(loaded.model, config, task, callbacks=[Timer()])
trainer.train()
print(json.dumps(Timer.seconds[1:]))
"""


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--old-tree", help=f"a built checkout of {OLD_COMMIT} (default: made in a temporary dir)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    env = environment()
    old_tree = args.old_tree or make_old_tree()
    seconds = {"old loop (d5744dc)": [], "FlowerTrainer": []}
    for _ in range(args.rounds):
        for name, code, tree in (("old loop (d5744dc)", OLD, old_tree), ("FlowerTrainer", NEW, ROOT)):
            out = subprocess.run([sys.executable, "-c", code, str(args.steps)], cwd=tree, check=True,
                                 capture_output=True, text=True, env={**os.environ, "PYTHONPATH": tree}).stdout
            seconds[name] += json.loads(out.strip().splitlines()[-1])
    old = statistics.median(seconds["old loop (d5744dc)"])
    rows = [{"loop": name, "steps timed": len(times), "median s/step": f"{statistics.median(times):.3f}",
             "min-max s": f"{min(times):.3f}-{max(times):.3f}", "this / old": f"{statistics.median(times) / old:.2f}x"}
            for name, times in seconds.items()]
    notes = (f"Embedded default (history-free, batch 32, w = 0.9, restricted head), {args.rounds} rounds of "
             f"{args.steps} timed steps each, the loops taking turns in fresh processes; the first step of each run "
             f"is left out. Goal: FlowerTrainer no slower than 1.1x the old loop.  Command: python "
             f"benchmarks/bench_trainer.py " + " ".join(sys.argv[1:]))
    write_results("trainer", "FlowerTrainer against the old loop", env, f"{markdown_table(rows)}\n\n{notes}", rows)
    print(markdown_table(rows))


def make_old_tree():
    tree = os.path.join(tempfile.mkdtemp(prefix="flowkern-old-"), "tree")
    subprocess.run(["git", "-C", ROOT, "worktree", "add", "--detach", tree, OLD_COMMIT], check=True)
    subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace"], cwd=tree, check=True,
                   capture_output=True)
    return tree


if __name__ == "__main__":
    main()
