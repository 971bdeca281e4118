"""FlowerTrainer: Flower fine-tuning (arXiv 2503.07377) on the Hugging Face Trainer.

    loss = (1 − w)·SFT + w·SubTB                                        (Eq. 12)
    SFT    token cross-entropy of the ground-truth title and its "\\n" (BIGRec), over the full
           vocabulary, or with `sft_normalize="trie"` over the trie children
    SubTB  flowkern.subtb_loss (Eq. 11) on the model's own trie-constrained rollouts:
           `rollouts` per prompt, each at a temperature drawn from `rollout_temperature`

GFlowGR (arXiv 2506.16114), `gflowgr_loss="tb"|"db"`, replaces the rollouts and SubTB:

    loss = SFT + λ·GFN,  GFN = flowkern.balance_loss over N trajectories per user
    the ground truth and N − 1 augmented items (flowkern.augment: the user's log, random,
    a collaborative-model curriculum, or the model's own beam search), each with its fused
    reward; log Z (TB) or log F(s_t) (DB) from a linear flow head on the hidden states

`compute_loss` holds only that.  The optimiser, schedule and warmup, clipping, gradient
accumulation, mixed precision, distributed training (accelerate: DDP, DeepSpeed ZeRO-2;
not FSDP or ZeRO-3, see __init__), checkpointing, `resume_from_checkpoint`, `report_to` and callbacks
are the Trainer's.  `evaluate` computes the paper's metrics instead of a loss: with
history, top-10 trie-constrained beam search → NDCG@5/10, HR@5/10, DGU@10, MGU@10, H, TTR;
history-free, the exact title distribution (KL both ways, JS) and a sampled one.

    config = FlowerConfig(output_dir="runs/mine", max_steps=300, learning_rate=3e-3)
    trainer = FlowerTrainer(model, config, task)          # task: flowkern.data.load_task(...)
    trainer.train()
    print(trainer.evaluate(task.test, metric_key_prefix="test"))
"""

import json
import math
import os
from dataclasses import dataclass, field
from typing import Callable, Literal, Optional

import numpy as np
import torch
from transformers import Trainer, TrainerState, TrainingArguments
from transformers.trainer_utils import TrainOutput

import flowkern
from flowkern import checkpoints, metrics
from flowkern.augment import RewardWeights, augment, curriculum_progress, trajectory_rewards
from flowkern.data import ifair_weights
from flowkern.head import linear_head
from flowkern.models import forward_parameters

RUN_SETTINGS = "flowkern_run.json"  # in each checkpoint: what a resume must not change silently


class ResumeError(ValueError):
    """A resume that cannot continue the run as it was: no complete checkpoint, or changed settings."""


def default_gfn_weight(task, gflowgr_loss=None) -> float:
    """0.9 history-free (the best of benchmarks/results/train-embedded-history-free-*.md),
    0.01 with history (the paper's range; w = 0.5 hurt, train-embedded-movies-history-*.md);
    GFlowGR's λ = 1 (the paper's)."""
    if gflowgr_loss is not None:
        return 1.0
    return 0.9 if task.mode == "history_free" else 0.01


@dataclass
class FlowerConfig(TrainingArguments):
    """TrainingArguments plus Flower's options; defaults differ from the Trainer's where
    the paper's recipe or the embedded run needs it (constant learning rate, no decay)."""

    gfn_weight: Optional[float] = field(default=None, metadata={
        "help": "w in (1 − w)·SFT + w·SubTB; 0 is plain SFT. Default: 0.9 history-free, 0.01 with history. "
                "GFlowGR: λ >= 0 in SFT + λ·GFN, default 1"})
    lam: float = field(default=1.0, metadata={"help": "SubTB subtrajectory decay λ > 0"})
    granularity: str = field(default="1", metadata={
        "help": "SubTB states every N tokens (paper Fig. 5), or 'item': the first and last only (trajectory balance)"})
    ifair_strength: float = field(default=0.0, metadata={
        "help": "IFairLRS: each SFT example weighs w(g)^β, g its target's popularity group (flowkern.data."
                "ifair_weights; β = 1 is the published weighting, 0 none)"})
    rollouts: int = field(default=1, metadata={"help": "on-policy rollouts per prompt of the batch"})
    rollout_temperature: list[float] = field(default_factory=lambda: [1.0, 1.5], metadata={
        "help": "MIN MAX: each rollout's temperature is drawn uniformly from [MIN, MAX]"})
    pref_mode: Literal["div", "add"] = field(default="div", metadata={
        "help": "how preference scores personalise the process reward: log r / p (div) or log r + log p (add)"})
    subtb_params: Literal["all", "body"] = field(default="all", metadata={
        "help": "what the SubTB term trains: every trained weight, or all but the output layer (its weight and "
                "bias, the input embeddings when tied, get the SFT gradient only; needs the restricted head)"})
    gflowgr_loss: Optional[Literal["tb", "db"]] = field(default=None, metadata={
        "help": "GFlowGR instead of Flower: trajectory balance (tb, learned log Z per user) or detailed balance "
                "(db, learned state flows) over num_trajectories items per user (needs semantic-ID items)"})
    augment: Literal["logs", "random", "cm", "onpolicy"] = field(default="cm", metadata={
        "help": "GFlowGR's augmented items: from the user's log, random unobserved, the collaborative model's "
                "curriculum (easy to hard over training), or the model's own beam search"})
    num_trajectories: int = field(default=3, metadata={
        "help": "GFlowGR: trajectories N per user, the ground truth and N − 1 augmented items"})
    reward_weights: list[float] = field(default_factory=lambda: [1.0, 1.0, 1.0], metadata={
        "help": "GFlowGR: INTERACTION COLLABORATIVE PREFIX weights of the reward's signals "
                "(flowkern.augment.trajectory_rewards)"})
    reward_floor: float = field(default=0.01, metadata={"help": "GFlowGR: added to every trajectory's reward"})
    early_stopping_patience: Optional[int] = field(default=None, metadata={
        "help": "stop after N evaluations without a better metric_for_best_model (needs load_best_model_at_end)"})
    sft_normalize: Literal["full", "trie"] = field(default="full", metadata={
        "help": "SFT cross-entropy over the full vocabulary (BIGRec) or over the trie children"})
    full_head: bool = field(default=False, metadata={
        "help": "compute all V logits (default: only those needed, from the body's hidden states, when the "
                "output layer is a plain Linear)"})
    eval_limit: Optional[int] = field(default=None, metadata={
        "help": "with history: evaluate on the first N rows of a split (default: all)"})
    eval_samples: int = field(default=10_000, metadata={"help": "history-free: samples drawn to evaluate"})
    eval_temperature: float = field(default=1.0, metadata={"help": "decoding temperature at evaluation (Temp)"})
    num_beams: int = field(default=10, metadata={"help": "beam width of the top-10 recommendation (>= 10)"})
    decode: Literal["beam", "d3"] = field(default="beam", metadata={
        "help": "with history: beam search by the LLM's log-probabilities, or D3's: mixed with a collaborative "
                "model's item scores pushed down the trie (weight d3_alpha; the trainer's `collaborative`)"})
    d3_alpha: float = field(default=0.5, metadata={"help": "D3: weight α in [0, 1] of the collaborative scores"})

    output_dir: str = field(default=os.path.join("runs", "default"), metadata={"help": "run directory"})
    per_device_train_batch_size: int = field(default=32, metadata={"help": "SFT examples per process and step"})
    per_device_eval_batch_size: int = field(default=64, metadata={"help": "prompts per beam search at evaluation"})
    learning_rate: float = field(default=1e-4, metadata={"help": "AdamW learning rate"})
    lr_scheduler_type: str = field(default="constant", metadata={"help": "learning-rate schedule"})
    num_train_epochs: float = field(default=1.0, metadata={"help": "passes over the training rows"})
    logging_steps: float = field(default=10, metadata={"help": "log the losses every N steps"})
    save_total_limit: Optional[int] = field(default=2, metadata={"help": "complete checkpoints kept"})
    report_to: Optional[list[str]] = field(default_factory=lambda: ["none"], metadata={
        "help": "integrations to log to, e.g. tensorboard"})
    remove_unused_columns: bool = field(default=False, metadata={"help": "kept False: the batches are row ids"})
    dataloader_pin_memory: bool = field(default=False, metadata={"help": "the batches are row ids: nothing to pin"})

    def __post_init__(self):
        if not (torch.cuda.is_available() or torch.backends.mps.is_available()):
            self.use_cpu = True  # without it accelerate leaves torchrun's CPU processes unaware of each other
        super().__post_init__()
        if self.gfn_weight is not None and self.gflowgr_loss is None and not 0.0 <= self.gfn_weight <= 1.0:
            raise ValueError(f"gfn_weight must lie in [0, 1], got {self.gfn_weight}")
        if self.gfn_weight is not None and not (self.gfn_weight >= 0 and math.isfinite(self.gfn_weight)):
            raise ValueError(f"gfn_weight must be a finite number >= 0, got {self.gfn_weight}")
        if self.num_trajectories < 1:
            raise ValueError(f"num_trajectories must be >= 1, got {self.num_trajectories}")
        if len(self.reward_weights) != 3:
            raise ValueError(f"reward_weights needs INTERACTION COLLABORATIVE PREFIX, got {self.reward_weights}")
        if not self.reward_floor > 0:
            raise ValueError(f"reward_floor must be > 0 (an augmented item may have every signal 0, and its log "
                             f"reward would be -inf), got {self.reward_floor}")
        self.reward_signals()  # raises on a negative or non-finite weight
        if len(self.rollout_temperature) != 2 or not 0 < self.rollout_temperature[0] <= self.rollout_temperature[1]:
            raise ValueError(f"rollout_temperature needs MIN MAX with 0 < MIN <= MAX, got {self.rollout_temperature}")
        if not (self.lam > 0 and math.isfinite(self.lam)):
            raise ValueError(f"lam must be a finite number > 0, got {self.lam}")
        if not (self.eval_temperature > 0 and math.isfinite(self.eval_temperature)):
            raise ValueError(f"eval_temperature must be a finite number > 0, got {self.eval_temperature}")
        for name in ("rollouts", "eval_samples", "per_device_train_batch_size", "per_device_eval_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.num_beams < 10:
            raise ValueError(f"num_beams must be >= 10 (the top-10 recommendation), got {self.num_beams}")
        if self.eval_limit is not None and self.eval_limit < 1:
            raise ValueError(f"eval_limit must be >= 1, got {self.eval_limit}")
        if self.granularity != "item" and not (self.granularity.isdigit() and int(self.granularity) >= 1):
            raise ValueError(f"granularity must be an integer >= 1 or 'item', got {self.granularity!r}")
        if not (self.ifair_strength >= 0 and math.isfinite(self.ifair_strength)):
            raise ValueError(f"ifair_strength must be a finite number >= 0, got {self.ifair_strength}")
        if not 0.0 <= self.d3_alpha <= 1.0:
            raise ValueError(f"d3_alpha must lie in [0, 1], got {self.d3_alpha}")
        if self.early_stopping_patience is not None and (self.early_stopping_patience < 1
                                                         or not self.load_best_model_at_end):
            raise ValueError(f"early_stopping_patience must be >= 1 and needs load_best_model_at_end (with an "
                             f"eval_strategy and a metric_for_best_model), got {self.early_stopping_patience}")

    def reward_signals(self) -> RewardWeights:
        """GFlowGR's reward weights (flowkern.augment.trajectory_rewards)."""
        return RewardWeights(*self.reward_weights, floor=self.reward_floor)


class FlowerTrainer(Trainer):
    """A Trainer whose loss is Flower's and whose evaluation is the paper's metrics.

    model:        a causal LM (peft-wrapped or not); its logits over the item titles' tokens
    args:         a FlowerConfig
    task:         a flowkern.data.Task: items, their token ids and rewards, the prompts
    preferences:  optional normalised preference scores that personalise the rewards (Sec. 3.3.3):
                  a (train rows, items) tensor (flowkern.data.load_preferences), or rows computed
                  when read (flowkern.sasrec.SASRecPreferences): anything with that `shape`
                  whose [row ids] gives those rows' scores
    collaborative: histories (lists of item ids) -> (rows, items) probabilities of a collaborative
                  model (flowkern.sasrec.item_probabilities): D3's decoding (decode="d3"), and
                  GFlowGR's curriculum (augment="cm") and reward signal
    Other keyword arguments go to transformers.Trainer (callbacks, processing_class, ...)."""

    loss_is_scaled_for_ga = False  # compute_loss returns a mean: the Trainer divides by accumulation

    def __init__(self, model, args: FlowerConfig, task, preferences: Optional[torch.Tensor] = None,
                 collaborative: Optional[Callable] = None, **kwargs):
        if not isinstance(args, FlowerConfig):
            raise TypeError(f"args must be a flowkern.FlowerConfig, got {type(args).__name__}")
        if preferences is not None and (task.mode != "history" or preferences.shape != (len(task.train),
                                                                                         len(task.titles))):
            raise ValueError(f"preferences need a task with history and shape (train rows, items) = "
                             f"({len(task.train)}, {len(task.titles)}), got {tuple(preferences.shape)}")
        if args.decode == "d3" and (task.mode != "history" or collaborative is None):
            raise ValueError("decode='d3' mixes in a collaborative model's scores of each row's history: it needs a "
                             "task with history and `collaborative`")
        if args.gfn_weight is None:
            args.gfn_weight = default_gfn_weight(task, args.gflowgr_loss)
        self.task, self.preferences, self.collaborative = task, preferences, collaborative
        self.example_weights = torch.from_numpy(ifair_weights(task) ** args.ifair_strength) \
            if args.ifair_strength > 0 else None
        self.head, self.full_head_because = _output_head(model, args.full_head)
        if args.subtb_params == "body" and self.head is None:
            raise ValueError(f"subtb_params='body' keeps the SubTB gradient out of the output layer, which needs the "
                             f"restricted head; here the full head is used ({self.full_head_because})")
        self.flow_head = _flow_head(model, self.head, task, args, collaborative) if args.gflowgr_loss else None
        self.codes = None if self.flow_head is None else torch.tensor(task.item_tokens)  # the prefix reward's
        if args.early_stopping_patience is not None:
            from transformers import EarlyStoppingCallback

            kwargs["callbacks"] = list(kwargs.get("callbacks") or []) + [
                EarlyStoppingCallback(args.early_stopping_patience)]
        evaluation_rows = task.valid[:args.eval_limit] if task.mode == "history" else task.train
        super().__init__(model=model, args=args, train_dataset=_TrainRows(task, args.seed),
                         eval_dataset=evaluation_rows, data_collator=_collate, **kwargs)
        plugin = getattr(self.accelerator.state, "deepspeed_plugin", None)
        if self.is_fsdp_enabled or getattr(plugin, "zero_stage", 0) == 3:
            raise ValueError("FSDP and DeepSpeed ZeRO-3 shard the parameters, so every forward is a collective, "
                             "while rollouts and beam search decode a data-dependent number of steps on each "
                             "process: not supported; use DDP or DeepSpeed ZeRO-2")
        self.trie = task.trie().to(self.args.device)
        self.keep_logits = "logits_to_keep" in forward_parameters(model)
        self.evaluation = {}  # the last evaluation's full result (lists included), for the artefacts
        self._micro = (-1, 0)  # (global step, micro-batch within it) of the last compute_loss
        self._parts = torch.zeros(3, dtype=torch.float64, device=self.args.device)  # Σ SFT, Σ SubTB, micro-batches
        self._fingerprint = task.fingerprint()  # the data a resume must match, hashed once

    # ---- training ---------------------------------------------------------------------------

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """(1 − w)·SFT + w·SubTB (Flower) or SFT + λ·GFN (GFlowGR) of one micro-batch: its
        trajectories (rollouts from the model as it is, or augmented items), then one forward
        over the ground-truth rows and those trajectories."""
        task, args, w = self.task, self.args, self.args.gfn_weight
        rows, targets = inputs["rows"].tolist(), inputs["targets"].tolist()
        prompts = [task.train[r].prompt for r in rows]
        continuations = [task.item_tokens[t] + [task.eos_token_id] for t in targets]
        extra_prompts, rewards = [], None
        if self.flow_head is not None and w > 0:
            items, rewards = self._augmented(prompts, rows, targets)
            extra_prompts = [p for p in prompts for _ in range(args.num_trajectories - 1)]
            continuations += [task.item_tokens[i] + [task.eos_token_id] for i in items[:, 1:].reshape(-1).tolist()]
        elif w > 0:
            samples = self._rollouts(prompts)
            extra_prompts = [p for p in prompts for _ in range(args.rollouts)]
            continuations += [row[:n].tolist() for row, n in zip(samples.tokens.cpu(), samples.lengths.tolist())]
            if self.preferences is not None:
                rewards = self.preferences[torch.tensor(rows).repeat_interleave(args.rollouts)].to(self.trie.device)
        scores, tokens = self._score(model, prompts + extra_prompts, continuations)
        n = len(prompts)
        log_p = self._sequence_log_probs(scores[:n], tokens[:n], args.sft_normalize)
        if self.example_weights is not None:  # IFairLRS
            log_p = log_p * self.example_weights[targets].to(log_p)
        sft = -log_p.sum() / sum(len(c) for c in continuations[:n])
        if w == 0:
            gfn = sft.new_zeros(())
        elif self.flow_head is not None:  # every trajectory: the ground truth's rows too
            gfn = self._balance(scores, tokens, rewards)
        else:
            gfn = self._subtb(scores[n:], tokens[n:], rewards)
        loss = sft + w * gfn if self.flow_head is not None else (1 - w) * sft + w * gfn
        self._parts += torch.stack([sft.detach(), gfn.detach(), torch.ones_like(sft)]).double()  # no host sync
        return (loss, {"sft": sft, "gfn": gfn}) if return_outputs else loss

    def _generator(self):
        """A generator seeded by (seed, step, micro-batch, process): reproducible on resume."""
        step, micro = self._micro
        self._micro = (self.state.global_step, micro + 1 if step == self.state.global_step else 0)
        step, micro = self._micro
        return torch.Generator().manual_seed(
            self.args.seed * 1_000_003 + step * 101 + micro * 7 + self.args.process_index * 13)

    def _rollouts(self, prompts):
        """`rollouts` trie-constrained samples per prompt, each at its own temperature."""
        generator = self._generator()
        low, high = self.args.rollout_temperature
        temperature = low + (high - low) * torch.rand(len(prompts) * self.args.rollouts, generator=generator)
        self.model.eval()
        samples = flowkern.sample(self.model, prompts, self.trie, num_samples=self.args.rollouts,
                                  temperature=temperature, generator=generator, restricted_head=self.head)
        self.model.train()
        return samples

    def _augmented(self, prompts, rows, targets):
        """GFlowGR's (B, N) items, column 0 the targets, and their (B·N,) log rewards in the order
        of the trajectories: the targets, then each row's N − 1 augmented items."""
        task, args = self.task, self.args
        histories = [list(task.train[r].history) for r in rows]
        probabilities = None if self.collaborative is None else self.collaborative(histories)
        proposals = None
        if args.augment == "onpolicy":
            self.model.eval()
            with torch.no_grad():
                proposals = flowkern.recommend(self.model, prompts, self.trie, k=args.num_trajectories,
                                               num_beams=max(10, args.num_trajectories), restricted_head=self.head,
                                               batch_size=args.per_device_eval_batch_size).items.cpu()
            self.model.train()
        progress = curriculum_progress(self.state.global_step, self.state.max_steps)
        items = augment(args.augment, histories, targets, len(task.titles), args.num_trajectories,
                        generator=self._generator(), scores=probabilities, progress=progress, proposals=proposals)
        rewards = trajectory_rewards(items, histories, self.codes, args.reward_signals(), probabilities)
        log_rewards = torch.cat([rewards[:, 0], rewards[:, 1:].reshape(-1)]).log()
        return items, log_rewards.to(self.trie.device)

    def log(self, logs, start_time=None):
        """The Trainer's logs, with the SFT and SubTB (or TB, DB) terms averaged over the micro-batches
        since the last log and over the processes."""
        if "loss" in logs:
            parts = self.accelerator.reduce(self._parts, reduction="sum").cpu()
            if parts[2] > 0:
                logs["sft"] = float(parts[0] / parts[2])
                logs[self.args.gflowgr_loss or "subtb"] = float(parts[1] / parts[2])
            self._parts.zero_()
        super().log(logs, start_time)

    # ---- the model's scores and the losses over them ------------------------------------------

    def _score(self, model, prompts, continuations):
        """What the losses read at the continuation positions, (N, T, H) hidden states with the
        restricted head or (N, T, V) logits, and the continuations (N, T) padded with the
        termination token.  Prompts are left-padded to a common end S, so what predicts
        continuation token t sits at position S − 1 + t of every row."""
        eos, device = self.task.eos_token_id, self.trie.device
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
        inputs = dict(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                      position_ids=position_ids.to(device), use_cache=False)
        start = width - 1
        if self.head is None:
            kept = input_ids.shape[1] - start
            logits = model(**inputs, **({"logits_to_keep": kept} if self.keep_logits else {})).logits
            return logits[:, -kept:][:, :steps], tokens.to(device)
        # Through the (possibly wrapped) model, so that DDP sees the forward; the body's
        # output is taken on the way, and the model computes the logits of one position only.
        captured = []
        hook = self.head.body.register_forward_hook(lambda module, args, out: captured.append(out.last_hidden_state))
        try:
            model(**inputs, **({"logits_to_keep": 1} if self.keep_logits else {}))
        finally:
            hook.remove()
        return captured[-1][:, start:start + steps], tokens.to(device)

    def _sequence_log_probs(self, scores, tokens, normalize, temperature=1.0):
        if self.head is None:
            logits = scores if temperature == 1.0 else scores / temperature
            return flowkern.sequence_log_probs(logits, self.trie, tokens=tokens, normalize=normalize)
        bias = self.head.bias
        if temperature != 1.0:
            scores, bias = scores / temperature, None if bias is None else bias / temperature
        return flowkern.linear_sequence_log_probs(scores, self.head.weight, self.trie, tokens=tokens, bias=bias,
                                                  normalize=normalize)

    def _subtb(self, scores, tokens, rewards):
        granularity = self.args.granularity
        options = dict(tokens=tokens, lam=self.args.lam, pref_mode=self.args.pref_mode,
                       granularity=granularity if granularity == "item" else int(granularity))
        if self.head is None:
            return flowkern.subtb_loss(scores, self.trie, rewards, **options)
        weight, bias = self.head.weight, self.head.bias
        if self.args.subtb_params == "body":
            weight, bias = weight.detach(), None if bias is None else bias.detach()
        return flowkern.linear_subtb_loss(scores, weight, self.trie, rewards, bias=bias, **options)

    def _balance(self, hidden, tokens, log_rewards):
        """GFlowGR's TB or DB over the trie policy; the flow head reads the same hidden states:
        at the prompt's end (log Z, TB) or at every state (log F(s_t), DB)."""
        flows = self.flow_head(hidden).squeeze(-1).float()
        flow = {"log_z": flows[:, 0]} if self.args.gflowgr_loss == "tb" else {"log_flows": flows}
        return flowkern.linear_balance_loss(hidden, self.head.weight, self.trie, log_rewards, tokens=tokens,
                                            bias=self.head.bias, form=self.args.gflowgr_loss, **flow)

    # ---- evaluation: the paper's metrics --------------------------------------------------------

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix="eval"):
        """The paper's metrics of the model as it is (with history: on `eval_dataset`, a list
        of flowkern.data.Examples, default the first `eval_limit` rows of valid), logged
        and returned with `metric_key_prefix`; the full result stays in `self.evaluation`.
        Rows and samples are split across processes and gathered."""
        examples = self.eval_dataset if eval_dataset is None else list(eval_dataset)[:self.args.eval_limit]
        training = self.model.training
        self.model.eval()
        with torch.no_grad():
            result = self._recommendations(examples) if self.task.mode == "history" else self._distribution()
        self.model.train(training)
        self.evaluation = result
        scalars = {f"{metric_key_prefix}_{k}": v for k, v in result.items() if isinstance(v, (int, float))}
        self.log(scalars)
        if metric_key_prefix == "eval":  # callbacks (best model, early stopping) see the selection split only
            self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, scalars)
        return scalars

    def _recommendations(self, examples):
        from accelerate.utils import gather_object

        task, args = self.task, self.args
        groups, p_train = task.popularity_groups()
        mine = list(range(args.process_index, len(examples), args.world_size))
        rows = []
        if mine:  # a process may have no rows when there are fewer than processes
            d3 = {}
            if args.decode == "d3":
                d3 = dict(item_scores=self.collaborative([examples[i].history for i in mine]).to(self.trie.device),
                          alpha=args.d3_alpha)
            recs = flowkern.recommend(self.model, [examples[i].prompt for i in mine], self.trie,
                                      k=min(10, len(task.titles)), num_beams=args.num_beams, titles=task.titles,
                                      temperature=args.eval_temperature, restricted_head=self.head,
                                      batch_size=args.per_device_eval_batch_size, **d3)
            for i, items, scores, titles in zip(mine, recs.items.tolist(), recs.scores.tolist(), recs.titles):
                target = examples[i].target
                rows.append({"row": i, "target_id": target, "target_title": task.titles[target],
                             "items": items[:len(titles)], "titles": titles, "scores": scores[:len(titles)]})
        rows = sorted(gather_object(rows) if args.world_size > 1 else rows, key=lambda r: r["row"])
        ranked = [r["titles"] for r in rows]
        result = metrics.accuracy(ranked, [r["target_title"] for r in rows])
        result.update(metrics.fairness([[int(groups[i]) for i in r["items"]] for r in rows], p_train))
        result.update(metrics.diversity(ranked))
        result.update(rows=len(rows), predictions=rows, p_train=p_train.tolist())
        return result

    def _distribution(self):
        from accelerate.utils import gather_object

        task, args = self.task, self.args
        prompt = task.train[0].prompt
        exact = torch.zeros(len(task.titles), dtype=torch.float64)
        for start in range(0, len(task.titles), 32):
            items = list(range(start, min(start + 32, len(task.titles))))
            scores, tokens = self._score(self.model, [prompt] * len(items),
                                         [task.item_tokens[i] + [task.eos_token_id] for i in items])
            exact[items] = self._sequence_log_probs(scores, tokens, "trie", args.eval_temperature).exp().double().cpu()
        counts = torch.zeros(len(task.titles))
        generator = torch.Generator().manual_seed(args.seed + 17 * args.process_index)
        share = args.eval_samples // args.world_size + (args.process_index < args.eval_samples % args.world_size)
        for start in range(0, share, 500):
            samples = flowkern.sample(self.model, [prompt], self.trie, num_samples=min(500, share - start),
                                      temperature=args.eval_temperature, generator=generator,
                                      restricted_head=self.head)
            counts += torch.bincount(samples.items.cpu(), minlength=len(task.titles))
        if args.world_size > 1:
            counts = torch.tensor(np.sum(gather_object([counts.tolist()]), axis=0), dtype=counts.dtype)
        target = task.target_distribution()
        result = {f"exact {name}": value for name, value in metrics.divergences(target, exact.numpy()).items()}
        result.update({f"sampled {name}": v for name, v in metrics.divergences(target, counts.numpy()).items()})
        result.update(samples=int(counts.sum()), exact_distribution=exact.tolist(),
                      sampled={title: int(c) for title, c in zip(task.titles, counts.tolist())})
        return result

    # ---- checkpoints that survive a kill, resumes that change nothing silently -----------------

    def train(self, resume_from_checkpoint=None, **kwargs):
        """As Trainer.train; `resume_from_checkpoint=True` takes the newest *complete*
        checkpoint of output_dir (incomplete ones, left by a kill, are removed), and a resume
        whose learning rate, batch size, accumulation, processes, seed, w, subtb_params or data
        differ from the checkpoint's is refused with a ResumeError (a ValueError) naming them."""
        if resume_from_checkpoint is True:
            if self.args.should_save:
                checkpoints.remove_incomplete(self.args.output_dir)
            self.accelerator.wait_for_everyone()
            resume_from_checkpoint = checkpoints.last_complete(self.args.output_dir)
            if resume_from_checkpoint is None:
                raise ResumeError(f"resume: no complete checkpoint in {self.args.output_dir}")
        if resume_from_checkpoint is not None:
            self._check_resume(resume_from_checkpoint)
            state = TrainerState.load_from_json(os.path.join(resume_from_checkpoint, "trainer_state.json"))
            if 0 < self.args.max_steps <= state.global_step:  # the Trainer would take one step more
                self._load_from_checkpoint(resume_from_checkpoint)
                self.state = state
                return TrainOutput(state.global_step, 0.0, {})
        return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)

    def _run_settings(self):
        return {"learning_rate": self.args.learning_rate, "batch_size": self.args.per_device_train_batch_size,
                "gradient_accumulation_steps": self.args.gradient_accumulation_steps,
                "world_size": self.args.world_size, "seed": self.args.seed, "gfn_weight": self.args.gfn_weight,
                "subtb_params": self.args.subtb_params, "granularity": self.args.granularity,
                "gflowgr_loss": self.args.gflowgr_loss, "augment": self.args.augment,
                "num_trajectories": self.args.num_trajectories, "reward_weights": self.args.reward_weights,
                "reward_floor": self.args.reward_floor,
                "ifair_strength": self.args.ifair_strength, "data": self._fingerprint}

    def _check_resume(self, directory):
        try:
            with open(os.path.join(directory, RUN_SETTINGS)) as f:
                saved = json.load(f)
        except FileNotFoundError:
            return  # a checkpoint from another trainer: nothing to compare
        changed = [f"{name} {saved[name]!r} -> {value!r}" for name, value in self._run_settings().items()
                   if name in saved and saved[name] != value]
        if changed:
            raise ResumeError(f"resume from {directory}: refused, the run changed ({'; '.join(changed)}); use the "
                             f"checkpoint's values or start a new run in another output_dir")

    def _save_checkpoint(self, model, trial):
        """The Trainer's checkpoint, then its manifest (flowkern.checkpoints), then rotation:
        older checkpoints are deleted only once the new one is complete."""
        limit, self.args.save_total_limit = self.args.save_total_limit, None
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self.args.save_total_limit = limit
        if self.args.should_save:
            run_dir = self._get_output_dir(trial=trial)
            directory = os.path.join(run_dir, f"checkpoint-{self.state.global_step}")
            with open(os.path.join(directory, RUN_SETTINGS), "w") as f:
                json.dump(self._run_settings(), f)
            checkpoints.mark_complete(directory)
            checkpoints.rotate(run_dir, limit, keep=self.state.best_model_checkpoint)


class _TrainRows(torch.utils.data.Dataset):
    """(training row, SFT target) pairs.  With history: train.csv's rows.  History-free:
    as many targets as there are interactions (Σ counts, at least one per item), drawn in
    proportion to the counts, all with the one prompt (row 0)."""

    def __init__(self, task, seed):
        if task.mode == "history":
            self.rows = torch.arange(len(task.train))
            self.targets = torch.tensor([example.target for example in task.train])
        else:
            weights = torch.as_tensor(task.train_counts, dtype=torch.float64)
            size = max(len(weights), math.ceil(float(weights.sum())))
            generator = torch.Generator().manual_seed(seed)
            self.targets = torch.multinomial(weights, size, replacement=True, generator=generator)
            self.rows = torch.zeros_like(self.targets)

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return {"rows": self.rows[i], "targets": self.targets[i]}


def _collate(features):
    return {name: torch.stack([f[name] for f in features]) for name in ("rows", "targets")}


def _flow_head(model, head, task, args, collaborative):
    """GFlowGR's flow head, a Linear(H, 1) on the hidden states, added to the model (so the
    Trainer optimises, saves and restores it) unless it has one; checks what GFlowGR needs."""
    if head is None:
        raise ValueError("GFlowGR reads log Z and the state flows from the body's hidden states: it needs the "
                         "restricted head (a plain Linear output layer, without full_head)")
    if task.mode != "history":
        raise ValueError("GFlowGR augments each user's trajectories from their history: it needs a task with history")
    if collaborative is None and (args.augment == "cm" or args.reward_weights[1] > 0):
        raise ValueError(f"GFlowGR with augment={args.augment!r} and a collaborative reward weight of "
                         f"{args.reward_weights[1]} needs `collaborative` (a collaborative model's probabilities)")
    if len({len(tokens) for tokens in task.item_tokens}) != 1:
        raise ValueError("GFlowGR's prefix reward compares items' codes position by position: it needs items of "
                         "equal-length codes (semantic IDs, --items semantic), not titles")
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not hasattr(base, "gflowgr_flow"):
        base.add_module("gflowgr_flow", torch.nn.Linear(head.weight.shape[1], 1, dtype=head.weight.dtype,
                                                        device=head.weight.device))
        torch.nn.init.zeros_(base.gflowgr_flow.weight)
        torch.nn.init.zeros_(base.gflowgr_flow.bias)
    return base.gflowgr_flow


def _output_head(model, full_head):
    """(the model's flowkern.head.LinearHead, None) for the restricted head, or (None, why not)."""
    if full_head:
        return None, "full_head"
    try:
        return linear_head(model), None
    except ValueError as error:
        return None, str(error)
