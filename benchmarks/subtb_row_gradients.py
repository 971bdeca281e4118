"""Why a small GFN weight w can still move a trained output layer a lot under Adam.

    python benchmarks/subtb_row_gradients.py [--data movies] [--weight 0.01]

At the first step of `python -m flowkern.train` (embedded model, seed 0), compares per row of
the output layer (tied to the input embeddings) the SFT gradient with the SubTB gradient, and
counts the rows where w·|∂SubTB| > (1 − w)·|∂SFT|.  Adam moves every row by about the learning
rate whatever its gradient's scale, so in those rows the SubTB term sets the direction.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import flower_trainer  # noqa: E402
from flowkern.data import load_task  # noqa: E402
from flowkern.models import load_model  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="movies")
    parser.add_argument("--weight", type=float, default=0.01)
    args = parser.parse_args()
    loaded = load_model(None, seed=0)
    task = load_task(args.data, loaded.tokenizer)
    rows = {}
    for weight in (0.0, 1.0):  # SFT alone, then SubTB alone, on the same first batch
        trainer = flower_trainer(loaded.model, task, gfn_weight=weight, seed=0)
        loaded.model.zero_grad()
        trainer.compute_loss(loaded.model, next(trainer.batches)).backward()
        rows[weight] = trainer.head.weight.grad.norm(dim=1)
    touched = rows[1.0] > 0
    larger = args.weight * rows[1.0][touched] > (1 - args.weight) * rows[0.0][touched]
    print(f"w = {args.weight}: in {int(larger.sum()):,} of the {int(touched.sum()):,} output rows the SubTB term "
          f"touches, w·|∂SubTB| > (1 − w)·|∂SFT|")


if __name__ == "__main__":
    main()
