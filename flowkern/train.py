"""python -m flowkern.train: fine-tune an LLM recommender with Flower, or with plain SFT.

Flower (arXiv 2503.07377, Eq. 12):  loss = (1 − w)·SFT + w·SubTB
  SFT    token cross-entropy of the ground-truth title and its "\\n" (BIGRec), normalised over
         the full vocabulary, or with `--sft-normalize trie` over the trie children (the
         likelihood a constrained decoder uses)
  SubTB  flowkern.subtb_loss on the model's own rollouts: for every prompt of the batch,
         `--rollouts` items are sampled from the trie-constrained policy, each at a
         temperature drawn from `--rollout-temperature`, then re-scored with gradients
`--objective sft` is the BIGRec baseline (w = 0); `--eval-temperature` the "Temp" baseline.

When the model's output layer is a plain Linear (flowkern.head.linear_head), the losses,
rollouts and evaluation read the body's last hidden states and compute only the logits they
need (the restricted head: the trie children's, or the vocabulary in chunks for SFT over
it), never all V logits of every position; `--full-head` computes the logits as the model
does instead.

Every run evaluates the model before training (step 0) and after it, on the same split, with
the paper's metrics (flowkern.metrics), and writes under --out: config.json, metrics.jsonl,
final.json, predictions.jsonl (with history) or samples.json (history-free), plots, and a
checkpoint that --resume continues from.  `torchrun --nproc_per_node=N -m flowkern.train`
trains data-parallel (gloo on CPU, NCCL on GPU); --batch-size is per process.
"""

import argparse
import contextlib
import json
import os
import platform
import sys
import time

import numpy as np
import torch
import torch.distributed as dist

import flowkern
from flowkern import metrics, plots
from flowkern.data import load_task
from flowkern.head import linear_head
from flowkern.models import add_lora, forward_parameters, load_model, load_weights, save_checkpoint

DEFAULT_OUT = os.path.join("runs", "default")


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m flowkern.train", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", help="a directory with items.tsv and train/valid/test.csv (with history), or a .json "
                                  "of title -> count (history-free); default: the embedded 100-movie history-free set")
    p.add_argument("--model", help="nothing (embedded tiny Qwen2), 'smollm2', PATH/FILE.gguf, a model directory "
                                   "or a hub id available offline")
    p.add_argument("--lora-r", type=int, help="LoRA rank; 0 trains every weight. Default: 8 for pretrained "
                                               "models, 0 for the embedded one")
    p.add_argument("--objective", choices=["flower", "sft"], default="flower")
    p.add_argument("--gfn-weight", type=float,
                   help="w in (1 − w)·SFT + w·SubTB (ignored by sft). Default 0.9 history-free (the best of the "
                        "sweep in benchmarks/results/train-embedded-history-free-*.md) and 0.01 with history (the "
                        "paper's range; w = 0.5 hurt there, see train-embedded-movies-history-*.md)")
    p.add_argument("--lam", type=float, default=1.0, help="SubTB subtrajectory decay λ")
    p.add_argument("--rollouts", type=int, default=1, help="rollouts per prompt of the batch (history-free: per step, "
                                                           "× batch size)")
    p.add_argument("--rollout-temperature", type=float, nargs=2, default=[1.0, 1.5], metavar=("MIN", "MAX"),
                   help="each rollout's temperature is drawn uniformly from [MIN, MAX]")
    p.add_argument("--pref-scores", help="with history: a .npy (train rows × items) of preference scores from an "
                                         "auxiliary recommender, row i for train.csv row i")
    p.add_argument("--pref-mode", choices=["div", "add"], default="div")
    p.add_argument("--max-steps", type=int, help="optimiser steps (default: --epochs over train.csv with history, "
                                                 "120 history-free)")
    p.add_argument("--epochs", type=float, default=1.0, help="passes over train.csv when --max-steps is not given")
    p.add_argument("--batch-size", type=int, default=32, help="SFT examples per process and micro-batch")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimiser step")
    p.add_argument("--lr", type=float, help="AdamW learning rate (default 3e-3 embedded, 1e-4 pretrained)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-every", type=int, default=0, help="evaluate on valid every N steps (0: never)")
    p.add_argument("--eval-limit", type=int, help="evaluate on the first N rows of a split (with history)")
    p.add_argument("--eval-samples", type=int, default=10_000, help="history-free: samples drawn to evaluate")
    p.add_argument("--eval-temperature", type=float, default=1.0, help="decoding temperature at evaluation")
    p.add_argument("--num-beams", type=int, default=10, help="beam width of the top-10 recommendation")
    p.add_argument("--sft-normalize", choices=["full", "trie"], default="full",
                   help="SFT cross-entropy over the full vocabulary (BIGRec) or over the trie children (restricted SFT)")
    p.add_argument("--full-head", action="store_true",
                   help="compute all V logits for the losses, rollouts and evaluation (default: only those needed, "
                        "from the body's hidden states, when the model's output layer is a plain Linear)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--out", default=DEFAULT_OUT, help="run directory")
    p.add_argument("--save-every", type=int, default=0, help="checkpoint every N steps (always at the end)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint")
    args = p.parse_args(argv)
    if args.objective == "sft":
        args.gfn_weight = 0.0
    if args.gfn_weight is not None and not 0.0 <= args.gfn_weight <= 1.0:
        p.error(f"--gfn-weight must lie in [0, 1], got {args.gfn_weight}")
    low, high = args.rollout_temperature
    if not 0 < low <= high:
        p.error(f"--rollout-temperature needs 0 < MIN <= MAX, got {low} {high}")
    for name in ("batch_size", "grad_accum", "rollouts", "num_beams", "eval_samples"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


def main(argv=None):
    args = parse_args(argv)
    rank, world, device = setup_distributed(args.device)
    dtype = getattr(torch, args.dtype)
    loaded = load_model(args.model, seed=args.seed, dtype=dtype)
    lora_r = args.lora_r if args.lora_r is not None else (8 if loaded.pretrained else 0)
    model = (add_lora(loaded.model, lora_r) if lora_r > 0 else loaded.model).to(device)
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    head, why_full = output_head(model, args.full_head)
    scorer = Scorer(model, head)
    task = load_task(args.data, loaded.tokenizer)
    args.gfn_weight = gfn_weight(args, task)
    if args.pref_scores and task.mode != "history":
        raise SystemExit("--pref-scores needs a dataset with history")
    trie = task.trie().to(device)
    preferences = load_preferences(args.pref_scores, args.pref_mode, task) if args.pref_scores else None
    lr = args.lr if args.lr is not None else (1e-4 if loaded.pretrained else 3e-3)
    steps_per_epoch = max(1, len(task.train) // (args.batch_size * args.grad_accum * world))
    max_steps = args.max_steps if args.max_steps is not None else (
        round(args.epochs * steps_per_epoch) if task.mode == "history" else 120)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)

    run = Run(args.out, rank == 0, fresh=not args.resume)
    checkpoint = os.path.join(args.out, "checkpoint")
    start = 0
    if args.resume and os.path.isdir(checkpoint):
        load_weights(model, checkpoint)
        state = torch.load(os.path.join(checkpoint, "trainer_state.pt"), weights_only=True)
        optimizer.load_state_dict(state["optimizer"])
        start = state["step"]
        run.say(f"resumed from {checkpoint} at step {start}")
    elif args.resume:
        raise SystemExit(f"--resume: no checkpoint at {checkpoint}")
    trained = scorer
    if world > 1:
        trained = torch.nn.parallel.DistributedDataParallel(scorer, device_ids=[device.index] if device.type == "cuda"
                                                            else None)
    run.write_config(args, loaded, task, trie, lora_r, lr, max_steps, world, why_full)
    evaluator = Evaluator(task, trie, args, rank, world, scorer)
    final_split, eval_split = ("test", "valid") if task.mode == "history" else ("all", "all")

    if start == 0:
        run.log_eval(0, final_split, evaluator(final_split))
    progress = run.progress(range(start, max_steps), total=max_steps, initial=start)
    for step in progress:
        torch.manual_seed(args.seed * 1_000_003 + step * 101 + rank)
        losses = train_step(trained, optimizer, task, trie, preferences, args, step, rank, world, steps_per_epoch)
        progress.set_postfix(sft=f"{losses['sft']:.3f}", subtb=f"{losses['subtb']:.3f}")
        run.log({"step": step + 1, "split": "train", **losses})
        if args.eval_every and (step + 1) % args.eval_every == 0 and step + 1 < max_steps:
            run.log_eval(step + 1, eval_split, evaluator(eval_split))
        if rank == 0 and args.save_every and (step + 1) % args.save_every == 0:
            save_checkpoint(model, loaded.tokenizer, {"step": step + 1, "optimizer": optimizer.state_dict()},
                            checkpoint)
    if rank == 0 and start < max_steps:
        save_checkpoint(model, loaded.tokenizer, {"step": max_steps, "optimizer": optimizer.state_dict()}, checkpoint)
    after = evaluator(final_split)
    run.log_eval(max_steps, final_split, after)
    run.finish(task, evaluator, after)
    if world > 1:
        dist.destroy_process_group()


def gfn_weight(args, task):
    """--gfn-weight, or its default for the task: 0.9 history-free, 0.01 with history."""
    if args.gfn_weight is not None:
        return args.gfn_weight
    return 0.9 if task.mode == "history_free" else 0.01


# ---- one optimiser step --------------------------------------------------------------------

def train_step(model, optimizer, task, trie, preferences, args, step, rank, world, steps_per_epoch):
    """(1 − w)·SFT + w·SubTB over `grad_accum` micro-batches; returns the mean losses.
    `model` is the Scorer, or the DistributedDataParallel wrapping it."""
    model.train()
    optimizer.zero_grad(set_to_none=True)
    totals = {"sft": 0.0, "subtb": 0.0, "loss": 0.0}
    for micro in range(args.grad_accum):
        last = micro == args.grad_accum - 1
        with model.no_sync() if world > 1 and not last else contextlib.nullcontext():  # all-reduce once per step
            losses = micro_step(model, task, trie, preferences, args, step, micro, rank, world, steps_per_epoch)
        for name, value in losses.items():
            totals[name] += value / args.grad_accum
    optimizer.step()
    return totals


def micro_step(model, task, trie, preferences, args, step, micro, rank, world, steps_per_epoch):
    """Rollouts, forward and backward of one micro-batch (DistributedDataParallel's no_sync
    must hold over the forward too); returns its losses."""
    scorer = unwrap(model)
    generator = torch.Generator().manual_seed(args.seed * 1_000_003 + step * 101 + micro * 7 + rank * 13)
    rows, targets = batch_rows(task, args, step, micro, rank, world, steps_per_epoch, generator)
    prompts = [task.train[r].prompt for r in rows]
    continuations = [task.item_tokens[t] + [task.eos_token_id] for t in targets]
    rollout_prompts, rewards = [], None
    if args.gfn_weight > 0:
        samples = rollouts(scorer, prompts, trie, args, generator)
        rollout_prompts = [p for p in prompts for _ in range(args.rollouts)]
        continuations += [row[:n].tolist() for row, n in zip(samples.tokens.cpu(), samples.lengths.tolist())]
        if preferences is not None:
            rewards = preferences[torch.tensor(rows).repeat_interleave(args.rollouts)].to(trie.device)
    scores, tokens = score(model, prompts + rollout_prompts, continuations, task.eos_token_id, trie.device)
    sft_rows = len(prompts)
    log_p = scorer.sequence_log_probs(scores[:sft_rows], trie, tokens[:sft_rows], args.sft_normalize)
    sft = -log_p.sum() / sum(len(c) for c in continuations[:sft_rows])
    subtb = (scorer.subtb_loss(scores[sft_rows:], trie, rewards, tokens[sft_rows:], lam=args.lam,
                               pref_mode=args.pref_mode) if args.gfn_weight > 0 else torch.zeros(()))
    loss = (1 - args.gfn_weight) * sft + args.gfn_weight * subtb
    (loss / args.grad_accum).backward()
    return {"sft": float(sft.detach()), "subtb": float(subtb.detach()), "loss": float(loss.detach())}


def batch_rows(task, args, step, micro, rank, world, steps_per_epoch, generator):
    """(training rows, SFT target items) of one micro-batch of this process.  With history:
    a fresh shuffle of train.csv every epoch, split across micro-batches and processes;
    history-free: targets drawn in proportion to the counts."""
    size = args.batch_size
    if task.mode == "history_free":
        weights = torch.as_tensor(task.train_counts, dtype=torch.float64)
        return [0] * size, torch.multinomial(weights, size, replacement=True, generator=generator).tolist()
    epoch, position = divmod(step, steps_per_epoch)
    order = torch.randperm(len(task.train), generator=torch.Generator().manual_seed(args.seed * 7919 + epoch))
    start = ((position * args.grad_accum + micro) * world + rank) * size
    rows = order[start:start + size].tolist()
    return rows, [task.train[r].target for r in rows]


def rollouts(scorer, prompts, trie, args, generator):
    """`args.rollouts` trie-constrained samples per prompt, each at its own temperature."""
    low, high = args.rollout_temperature
    temperature = low + (high - low) * torch.rand(len(prompts) * args.rollouts, generator=generator)
    scorer.model.eval()
    samples = flowkern.sample(scorer.model, prompts, trie, num_samples=args.rollouts, temperature=temperature,
                              generator=generator, restricted_head=scorer.head)
    scorer.model.train()
    return samples


def output_head(model, full_head):
    """(the model's LinearHead, None) for the restricted head, or (None, why not)."""
    if full_head:
        return None, "--full-head"
    try:
        return linear_head(model), None
    except ValueError as error:
        return None, str(error)


class Scorer(torch.nn.Module):
    """The model as the losses read it, in one forward that DistributedDataParallel can wrap:
    the last hidden states with the restricted head (`head`, a flowkern.head.LinearHead of
    `model`), else the logits; and the losses over what that forward returns."""

    def __init__(self, model, head):
        super().__init__()
        self.model, self.head = model, head
        self.keep_logits = "logits_to_keep" in forward_parameters(model)

    def forward(self, input_ids, attention_mask, position_ids, start, steps):
        """Hidden states or logits at positions start .. start + steps − 1, (N, steps, H or V);
        of the logits only those positions are computed when the model allows it."""
        inputs = dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
        if self.head is not None:
            return self.head.body(**inputs).last_hidden_state[:, start:start + steps]
        kept = input_ids.shape[1] - start  # the positions from `start` to the end
        logits = self.model(**inputs, **({"logits_to_keep": kept} if self.keep_logits else {})).logits
        return logits[:, -kept:][:, :steps]

    def sequence_log_probs(self, scores, trie, tokens, normalize, temperature=1.0):
        """flowkern's sequence_log_probs of the continuations `tokens` from forward's `scores`,
        the logits divided by `temperature`."""
        if self.head is None:
            logits = scores if temperature == 1.0 else scores / temperature
            return flowkern.sequence_log_probs(logits, trie, tokens=tokens, normalize=normalize)
        hidden, bias = (scores, self.head.bias) if temperature == 1.0 else (
            scores / temperature, None if self.head.bias is None else self.head.bias / temperature)
        return flowkern.linear_sequence_log_probs(hidden, self.head.weight, trie, tokens=tokens, bias=bias,
                                                  normalize=normalize)

    def subtb_loss(self, scores, trie, rewards, tokens, **options):
        if self.head is None:
            return flowkern.subtb_loss(scores, trie, rewards, tokens=tokens, **options)
        return flowkern.linear_subtb_loss(scores, self.head.weight, trie, rewards, tokens=tokens, bias=self.head.bias,
                                          **options)


def score(model, prompts, continuations, eos, device):
    """What the Scorer `model` returns at the continuation positions, (N, T, H or V), and the
    continuations (N, T) padded with the termination token.  Prompts are left-padded to a
    common end S, so what predicts continuation token t sits at position S − 1 + t of every
    row."""
    width, steps = max(map(len, prompts)), max(map(len, continuations))
    input_ids = torch.full((len(prompts), width + steps), eos, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    tokens = torch.full((len(prompts), steps), eos, dtype=torch.long)
    for i, (prompt, continuation) in enumerate(zip(prompts, continuations)):
        input_ids[i, width - len(prompt):width] = torch.tensor(prompt)
        input_ids[i, width:width + len(continuation)] = torch.tensor(continuation)
        attention_mask[i, width - len(prompt):width + len(continuation)] = 1
        tokens[i, :len(continuation)] = torch.tensor(continuation)
    position_ids = (attention_mask.cumsum(1) - 1).clamp(min=0)
    scores = model(input_ids.to(device), attention_mask.to(device), position_ids.to(device), width - 1, steps)
    return scores, tokens.to(device)


def unwrap(model):
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def load_preferences(path, mode, task):
    """Per-row normalised preference scores (Sec. 3.3.3): div: (s − mean)/(max − min) + 1,
    add: (s − min)/(max − min) + 0.5; rows with max = min become all 1; clamped at 1e-3."""
    scores = np.load(path)
    expected = (len(task.train), len(task.titles))
    if scores.shape != expected:
        raise SystemExit(f"--pref-scores {path}: expected shape (train rows, items) = {expected}, got {scores.shape}")
    if not np.isfinite(scores).all():
        raise SystemExit(f"--pref-scores {path}: holds NaN or inf")
    low, high = scores.min(1, keepdims=True), scores.max(1, keepdims=True)
    spread = np.where(high > low, high - low, 1.0)
    if mode == "div":
        normalised = (scores - scores.mean(1, keepdims=True)) / spread + 1.0
    else:
        normalised = (scores - low) / spread + 0.5
    normalised = np.where(high > low, normalised, 1.0)
    return torch.from_numpy(np.maximum(normalised, 1e-3))


# ---- evaluation ----------------------------------------------------------------------------

class Evaluator:
    """The paper's metrics of the model as it is, on a split (with history: top-10 beam
    search over the first --eval-limit rows; history-free: the exact title distribution
    and --eval-samples samples).  Work is split across processes; rank 0 gets the metrics."""

    def __init__(self, task, trie, args, rank, world, scorer):
        self.task, self.trie, self.args, self.rank, self.world, self.scorer = task, trie, args, rank, world, scorer
        if task.mode == "history":
            self.groups, self.p_train = task.popularity_groups()
        self.predictions, self.samples = [], {}

    @torch.no_grad()
    def __call__(self, split):
        model = self.scorer.model
        model.eval()
        result = self._history(model, split) if self.task.mode == "history" else self._history_free(model)
        model.train()
        return result

    def _history(self, model, split):
        examples = getattr(self.task, split)[: self.args.eval_limit]
        mine = list(range(self.rank, len(examples), self.world))
        rows = []
        for start in range(0, len(mine), 8):
            chunk = mine[start:start + 8]
            recs = flowkern.recommend(model, [examples[i].prompt for i in chunk], self.trie,
                                      k=min(10, len(self.task.titles)),
                                      num_beams=max(self.args.num_beams, 10), titles=self.task.titles,
                                      temperature=self.args.eval_temperature, restricted_head=self.scorer.head)
            for i, items, scores, titles in zip(chunk, recs.items.tolist(), recs.scores.tolist(), recs.titles):
                target = examples[i].target
                rows.append({"row": i, "target_id": target, "target_title": self.task.titles[target],
                             "items": items[: len(titles)], "titles": titles, "scores": scores[: len(titles)]})
        rows = sorted(gather(rows, self.world), key=lambda r: r["row"])
        self.predictions = rows
        ranked = [r["titles"] for r in rows]
        result = metrics.accuracy(ranked, [r["target_title"] for r in rows])
        result.update(metrics.fairness([[int(self.groups[i]) for i in r["items"]] for r in rows], self.p_train))
        result.update(metrics.diversity(ranked))
        result["rows"] = len(rows)
        return result

    def _history_free(self, model):
        task, trie = self.task, self.trie
        prompt = task.train[0].prompt
        exact = torch.zeros(len(task.titles), dtype=torch.float64)
        for start in range(0, len(task.titles), 32):
            items = range(start, min(start + 32, len(task.titles)))
            continuations = [task.item_tokens[i] + [task.eos_token_id] for i in items]
            scores, tokens = score(self.scorer, [prompt] * len(items), continuations, task.eos_token_id, trie.device)
            log_p = self.scorer.sequence_log_probs(scores, trie, tokens, "trie", self.args.eval_temperature)
            exact[list(items)] = log_p.exp().double().cpu()
        counts = torch.zeros(len(task.titles))
        generator = torch.Generator().manual_seed(self.args.seed + 17 * self.rank)
        share = self.args.eval_samples // self.world + (self.rank < self.args.eval_samples % self.world)
        for start in range(0, share, 500):
            samples = flowkern.sample(model, [prompt], trie, num_samples=min(500, share - start),
                                      temperature=self.args.eval_temperature, generator=generator,
                                      restricted_head=self.scorer.head)
            counts += torch.bincount(samples.items.cpu(), minlength=len(task.titles))
        counts = sum(gather([counts], self.world))
        target = task.target_distribution()
        self.samples = {title: int(c) for title, c in zip(task.titles, counts.tolist())}
        result = {f"exact {name}": value for name, value in metrics.divergences(target, exact.numpy()).items()}
        result.update({f"sampled {name}": value for name, value in metrics.divergences(target, counts.numpy()).items()})
        result["samples"] = int(counts.sum())
        result["exact_distribution"] = exact.tolist()
        return result


def gather(items: list, world: int) -> list:
    """All processes' lists, concatenated (every process gets them)."""
    if world == 1:
        return items
    everything = [None] * world
    dist.all_gather_object(everything, items)
    return [item for part in everything for item in part]


def setup_distributed(device_arg):
    """(rank, world size, device); under torchrun, joins the process group."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if device_arg is None:
        device_arg = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device_arg)
    if world == 1:
        return 0, 1, device
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), world, device


# ---- artefacts -----------------------------------------------------------------------------

class Run:
    """The run directory; only rank 0 writes or prints."""

    def __init__(self, out, writer, fresh):
        self.out, self.writer, self.started = out, writer, time.time()
        if writer:
            os.makedirs(out, exist_ok=True)
            if fresh and os.path.exists(os.path.join(out, "metrics.jsonl")):
                os.remove(os.path.join(out, "metrics.jsonl"))  # a new run's log starts empty

    def say(self, text):
        if self.writer:
            print(text, flush=True)

    def progress(self, steps, total, initial):
        if not self.writer:
            return _Quiet(steps)
        from tqdm import tqdm

        return tqdm(steps, total=total, initial=initial, desc="training", dynamic_ncols=True)

    def write_config(self, args, loaded, task, trie, lora_r, lr, max_steps, world, why_full):
        config = {**vars(args), "lora_r": lora_r, "lr": lr, "max_steps": max_steps, "world_size": world,
                  "restricted_head": why_full is None, "full_head_because": why_full,
                  "model_description": loaded.description, "tokenizer": loaded.tokenizer.name,
                  "mode": task.mode, "data_source": task.source, "num_items": len(task.titles),
                  "trie": {"nodes": trie.num_nodes, "depth": trie.depth},
                  "versions": {"flowkern": flowkern.__version__, "torch": torch.__version__,
                               "python": platform.python_version(), **_package_versions()}}
        self._write_json("config.json", config)
        self.say(f"flowkern.train: {loaded.description}, {task.mode} data {task.source} ({len(task.titles)} items), "
                 f"objective {args.objective} (w = {args.gfn_weight}), {max_steps} steps, out {self.out}")
        self.say("head: restricted (logits from the body's hidden states, only those needed)" if why_full is None
                 else f"head: full, all V logits ({why_full})")

    def log(self, record):
        if self.writer:
            with open(os.path.join(self.out, "metrics.jsonl"), "a") as f:
                f.write(json.dumps(record) + "\n")

    def log_eval(self, step, split, result):
        self.log({"step": step, "split": split, **result})
        shown = {k: v for k, v in result.items() if not isinstance(v, list)}
        self.say(f"step {step} [{split}] " + ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                                                        for k, v in shown.items()))

    def finish(self, task, evaluator, after):
        if not self.writer:
            return
        with open(os.path.join(self.out, "metrics.jsonl")) as f:  # this run's, or the resumed run's
            before = next((record for record in map(json.loads, f) if record["step"] == 0), None)
        self._write_json("final.json", {"before": before, "after": after, "seconds": time.time() - self.started})
        if task.mode == "history":
            with open(os.path.join(self.out, "predictions.jsonl"), "w") as f:
                for row in evaluator.predictions:
                    f.write(json.dumps(row) + "\n")
            plots.popularity_shares(os.path.join(self.out, "popularity.png"), evaluator.p_train,
                                    before.get("p_rec") if before else None, after["p_rec"])
        else:
            self._write_json("samples.json", evaluator.samples)
            plots.title_frequencies(os.path.join(self.out, "titles.png"), task.target_distribution(),
                                    before.get("exact_distribution") if before else None,
                                    after["exact_distribution"], np.array(list(evaluator.samples.values())))
        rows = [(k, before.get(k) if before else None, v) for k, v in after.items() if isinstance(v, float)]
        self.say("\n" + "\n".join(f"{name:28s} {_fmt(b):>10s} {_fmt(a):>10s}"
                                  for name, b, a in [("metric", "before", "after")] + rows))
        self.say(f"artefacts in {self.out}")

    def _write_json(self, name, value):
        if self.writer:
            with open(os.path.join(self.out, name), "w") as f:
                json.dump(value, f, indent=1)


class _Quiet:
    def __init__(self, steps):
        self.steps = steps

    def __iter__(self):
        return iter(self.steps)

    def set_postfix(self, **_):
        pass


def _fmt(value):
    return value if isinstance(value, str) else ("-" if value is None else f"{value:.4f}")


def _package_versions():
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in ("transformers", "peft", "numpy"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            pass
    return found


if __name__ == "__main__":
    sys.exit(main())
