"""SASRec (Kang & McAuley, ICDM 2018): the sequential recommender whose scores personalise
Flower's reward with history (arXiv 2503.07377, Sec. 3.3.3; the published recipe trains it
first, then fine-tunes the LLM).

    h = TransformerBlocks(E[i_1..i_L] + P[1..L])       causal self-attention, pre-norm
    s = W h_L + b                                      one score per item
    loss = cross-entropy of the next item over all items

The settings follow the published run: the last 10 items of each history, item embeddings of
size 64, one block with one head, dropout 0.1, Adam (lr 1e-3, L2 1e-5); we train on the
softmax over all items (the published code samples one negative with a binary loss) and stop
early on valid NDCG@10.  The block is torch's own `nn.TransformerEncoderLayer`.

    python -m flowkern.sasrec --data movies --out runs/sasrec

trains it, writes model.pt and report.json (HR@5/10, NDCG@5/10 and the paper's fairness and
diversity metrics on valid and test, beside the popularity baseline's) and warns loudly when it
does not beat popularity on valid.  `trained(directory, seed)` returns a cached model for the
data (retrained when the data or the settings change); `SASRecPreferences` turns its scores
into each training row's preferences when the row is used, never storing rows × items.
"""

import argparse
import copy
import hashlib
import json
import os
import sys
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn

from flowkern import metrics
from flowkern.data import DataError, history_counts, normalise_preferences, popularity_groups, \
    read_history_data, resolve

VERSION = 1  # of this file's model and training: part of the cache key


@dataclass
class SASRecConfig:
    max_len: int = 10
    hidden: int = 64
    blocks: int = 1
    heads: int = 1
    dropout: float = 0.1
    lr: float = 1e-3
    l2: float = 1e-5
    batch_size: int = 256
    max_epochs: int = 200
    patience: int = 10     # epochs without a better valid NDCG@10 before stopping
    seed: int = 0

    def __post_init__(self):
        for name in ("max_len", "hidden", "blocks", "heads", "batch_size", "max_epochs", "patience"):
            if getattr(self, name) < 1:
                raise ValueError(f"SASRec {name} must be >= 1, got {getattr(self, name)}")
        if self.hidden % self.heads:
            raise ValueError(f"SASRec hidden ({self.hidden}) must be a multiple of heads ({self.heads})")
        if not (0.0 <= self.dropout < 1.0 and self.lr > 0 and self.l2 >= 0):
            raise ValueError(f"SASRec needs 0 <= dropout < 1, lr > 0 and l2 >= 0, got {self.dropout}, {self.lr}, "
                             f"{self.l2}")


class SASRec(nn.Module):
    """Scores of every item after each history; histories are left-padded with `num_items`."""

    def __init__(self, num_items, config: SASRecConfig):
        super().__init__()
        self.num_items, self.max_len = num_items, config.max_len
        self.items = nn.Embedding(num_items + 1, config.hidden, padding_idx=num_items)
        self.positions = nn.Embedding(config.max_len, config.hidden)
        self.dropout = nn.Dropout(config.dropout)
        layer = nn.TransformerEncoderLayer(config.hidden, config.heads, dim_feedforward=config.hidden,
                                           dropout=config.dropout, batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, config.blocks, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(config.hidden)
        self.out = nn.Linear(config.hidden, num_items)
        nn.init.normal_(self.items.weight, 0.0, 0.01)

    def forward(self, histories):
        """histories (B, max_len) → scores (B, num_items), read at the last position."""
        length = histories.shape[1]
        real = histories != self.num_items
        x = self.dropout(self.items(histories) + self.positions.weight[:length]) * real.unsqueeze(-1)
        # position q attends to real items at positions <= q, and always to itself, so that a
        # row of padding is never wholly masked
        eye = torch.eye(length, dtype=torch.bool, device=histories.device)
        allowed = (torch.ones_like(eye).tril() & real.unsqueeze(1)) | eye
        mask = torch.zeros(allowed.shape, dtype=x.dtype, device=x.device).masked_fill(~allowed, float("-inf"))
        mask = mask.repeat_interleave(self.blocks.layers[0].self_attn.num_heads, dim=0)
        return self.out(self.norm(self.blocks(x, mask=mask))[:, -1])


def pad_histories(histories, num_items, max_len) -> torch.Tensor:
    """(N, max_len) long: each history's last max_len items, left-padded with num_items."""
    out = torch.full((len(histories), max_len), num_items, dtype=torch.long)
    for i, history in enumerate(histories):
        kept = list(history)[-max_len:]
        if kept:
            out[i, max_len - len(kept):] = torch.tensor(kept)
    return out


# ---- training and evaluation -----------------------------------------------------------------

def data_fingerprint(titles, splits) -> str:
    """A short hash of the items and the three splits: what a trained SASRec was made for."""
    digest = hashlib.sha256("\x00".join(titles).encode())
    for name in ("train", "valid", "test"):
        digest.update(name.encode())
        for history, target in splits[name]:
            digest.update(np.asarray(list(history) + [-1, target], dtype=np.int64).tobytes())
    return digest.hexdigest()[:16]


def train(titles, splits, config: SASRecConfig, device="cpu", log=print):
    """(the model of the epoch with the best valid NDCG@10, report dict)."""
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    num_items = len(titles)
    model = SASRec(num_items, config).to(device)
    optimiser = torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.l2)
    inputs = pad_histories([h for h, _ in splits["train"]], num_items, config.max_len)
    targets = torch.tensor([t for _, t in splits["train"]])
    best, best_state, best_epoch, started = -1.0, None, 0, time.time()
    for epoch in range(1, config.max_epochs + 1):
        model.train()
        for batch in torch.randperm(len(targets), generator=generator).split(config.batch_size):
            loss = nn.functional.cross_entropy(model(inputs[batch].to(device)), targets[batch].to(device))
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
        score = evaluate(model, titles, splits, "valid", device, accuracy_only=True)["NDCG@10"]
        if score > best:
            best, best_state, best_epoch = score, copy.deepcopy(model.state_dict()), epoch
        log(f"sasrec: epoch {epoch}: loss {loss.item():.4f}, valid NDCG@10 {score:.4f} (best {best:.4f}, "
            f"epoch {best_epoch})")
        if epoch - best_epoch >= config.patience:
            break
    model.load_state_dict(best_state)
    model.eval()
    report = {"data": data_fingerprint(titles, splits), "config": asdict(config), "version": VERSION,
              "best_epoch": best_epoch, "epochs": epoch, "seconds": round(time.time() - started, 1)}
    for split in ("valid", "test"):
        report[split] = _summary(evaluate(model, titles, splits, split, device))
        report[f"popularity_{split}"] = _summary(evaluate(None, titles, splits, split, device))
    report["beats_popularity"] = report["valid"]["NDCG@10"] > report["popularity_valid"]["NDCG@10"]
    return model, report


@torch.no_grad()
def scores(model, histories, device="cpu", batch_size=1024) -> torch.Tensor:
    """(N, items) float32 scores of `histories` (lists of item ids), on the CPU."""
    model.eval()
    padded = pad_histories(histories, model.num_items, model.max_len)
    return torch.cat([model(chunk.to(device)).float().cpu() for chunk in padded.split(batch_size)])


def evaluate(model, titles, splits, split, device="cpu", accuracy_only=False) -> dict:
    """The paper's metrics of the top-10 titles of `split`'s rows (metrics.accuracy, fairness,
    diversity: the LLM's metrics, so the rows compare); model None: the popularity
    baseline, every row given the items most frequent in the training histories.
    accuracy_only: HR and NDCG alone (what early stopping reads each epoch)."""
    rows = splits[split]
    counts = history_counts(len(titles), splits["train"]) if model is None or not accuracy_only else None
    if model is None:
        ranking = torch.from_numpy(np.argsort(-counts, kind="stable"))
        top = ranking.expand(len(rows), -1)
    else:
        top = scores(model, [h for h, _ in rows], device).argsort(dim=1, descending=True, stable=True)
    ranked = []
    for order in top[:, :256].tolist():  # 10 distinct titles lie among the first few dozen items
        seen = []
        for item in order:
            if titles[item] not in seen:
                seen.append(titles[item])
            if len(seen) == 10:
                break
        ranked.append(seen)
    result = metrics.accuracy(ranked, [titles[t] for _, t in rows])
    if accuracy_only:
        return result
    groups, p_train = popularity_groups(titles, counts)
    title_group = {t: int(g) for t, g in zip(titles, groups)}
    result.update(metrics.fairness([[title_group[t] for t in row] for row in ranked], p_train))
    result.update(metrics.diversity(ranked))
    return result


def _summary(result) -> dict:
    return {k: round(v, 6) for k, v in result.items() if isinstance(v, float)}


# ---- saved and cached models -----------------------------------------------------------------

def save(model, report, directory):
    os.makedirs(directory, exist_ok=True)
    torch.save(model.state_dict(), os.path.join(directory, "model.pt"))
    with open(os.path.join(directory, "report.json"), "w") as f:
        json.dump(report, f, indent=1)


def load(directory, titles, splits, device="cpu"):
    """(model, report) saved in `directory`, refused with a DataError when it was made for
    other data (items or splits) or by another version of this file."""
    report_path = os.path.join(directory, "report.json")
    try:
        with open(report_path) as f:
            report = json.load(f)
        state = torch.load(os.path.join(directory, "model.pt"), map_location="cpu", weights_only=True)
    except (OSError, ValueError, RuntimeError) as error:
        raise DataError(f"SASRec {directory}: cannot load it ({str(error).splitlines()[0]})") from None
    if not isinstance(report, dict) or report.get("data") != data_fingerprint(titles, splits):
        raise DataError(f"SASRec {directory}: made for other data (the items or splits differ); retrain it with "
                        f"python -m flowkern.sasrec --data DIR --out {directory}")
    if report.get("version") != VERSION:
        raise DataError(f"SASRec {directory}: made by another flowkern SASRec (version {report.get('version')}, "
                        f"this is {VERSION}); retrain it")
    model = SASRec(len(titles), SASRecConfig(**report["config"])).to(device)
    model.load_state_dict(state)
    model.eval()
    return model, report


def splits_of(task) -> dict:
    """A flowkern.data.Task's splits as (history item ids, next item id) rows."""
    return {name: [(list(e.history), e.target) for e in getattr(task, name)] for name in ("train", "valid", "test")}


def cache_dir() -> str:
    return os.environ.get("FLOWKERN_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "flowkern")


def trained(titles, splits, config: SASRecConfig, device="cpu", log=print):
    """(model, report) for this data and config: from the cache (FLOWKERN_CACHE, default
    ~/.cache/flowkern/sasrec/<data hash>-<settings hash>) or trained and cached.  A cache entry
    that fails to load, or whose data differs, is retrained and replaced."""
    settings = hashlib.sha256(json.dumps([asdict(config), VERSION], sort_keys=True).encode()).hexdigest()[:12]
    directory = os.path.join(cache_dir(), "sasrec", f"{data_fingerprint(titles, splits)}-{settings}")
    if os.path.exists(os.path.join(directory, "report.json")):
        try:
            model, report = load(directory, titles, splits, device)
            log(f"sasrec: cached model {directory}")
            return model, report
        except DataError as error:
            log(f"sasrec: {error}: retraining")
    model, report = train(titles, splits, config, device, log)
    save(model, report, directory)
    return model, report


def warn_unless_better(report, log=print):
    if not report["beats_popularity"]:
        log(f"WARNING: SASRec valid NDCG@10 {report['valid']['NDCG@10']:.4f} does not beat the popularity "
            f"baseline's {report['popularity_valid']['NDCG@10']:.4f}: its preferences will not personalise "
            f"the reward usefully")


class SASRecPreferences:
    """Per-row preference scores of the training rows, computed when rows are read:
    preferences[rows] is (len(rows), items), normalise_preferences of the SASRec's scores
    after each row's history.  `shape` is (train rows, items), as the dense tensor's."""

    def __init__(self, model, histories, mode, device="cpu"):
        self.model, self.mode, self.device = model, mode, device
        self.padded = pad_histories(histories, model.num_items, model.max_len)
        self.shape = (len(histories), model.num_items)

    @torch.no_grad()
    def __getitem__(self, rows):
        self.model.eval()
        return normalise_preferences(self.model(self.padded[rows].to(self.device)).float(), self.mode)


def item_probabilities(model, device="cpu"):
    """histories (lists of item ids) -> (rows, items) softmax of the SASRec's scores: the
    collaborative distribution D3 mixes into decoding (FlowerTrainer's `collaborative`)."""
    return lambda histories: torch.softmax(scores(model, histories, device), -1)


# ---- command line ---------------------------------------------------------------------------

def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m flowkern.sasrec", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--data", required=True, help="a directory with history (items.tsv, train/valid/test.csv) "
                                                      "or a shipped set's name")
    parser.add_argument("--out", required=True, help="where model.pt and report.json go")
    for name, value in asdict(SASRecConfig()).items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value)
    args = parser.parse_args(argv)
    path = resolve(args.data)
    try:
        if not os.path.isdir(path):
            raise DataError(f"--data {args.data}: SASRec needs a directory with history (items.tsv, "
                            f"train/valid/test.csv)")
        titles, splits = read_history_data(path)
    except DataError as error:
        print(f"python -m flowkern.sasrec: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    try:
        config = SASRecConfig(**{name: getattr(args, name) for name in asdict(SASRecConfig())})
    except ValueError as error:
        parser.error(str(error))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, report = train(titles, splits, config, device)
    save(model, report, args.out)
    names = ("HR@5", "NDCG@5", "HR@10", "NDCG@10", "DGU@10", "MGU@10", "H", "TTR")
    print(f"{'':20s}" + "".join(f"{n:>9s}" for n in names))
    for key in ("valid", "test", "popularity_valid", "popularity_test"):
        print(f"{key:20s}" + "".join(f"{report[key][n]:9.4f}" for n in names))
    warn_unless_better(report, lambda line: print(line, file=sys.stderr))
    print(f"sasrec: best epoch {report['best_epoch']} of {report['epochs']}, {report['seconds']} s; in {args.out}")


if __name__ == "__main__":
    main()
