"""python -m flowkern.train: fine-tune an LLM recommender with Flower, or with plain SFT.

A command line over flowkern.FlowerTrainer (a Hugging Face Trainer): every
TrainingArguments flag works (`--bf16`, `--warmup_steps`, `--report_to tensorboard`,
`--save_steps` ...), `--config FILE.yaml|.json` sets any field, and `accelerate launch` or
`torchrun` run it on several processes.  With history, every evaluation reads valid (before
training, during it, and the final model) and test is read once, by the final model;
history-free, the distribution is evaluated before and after.  Writes under --out:
run_config.json, metrics.jsonl, before.json, final.json, predictions.jsonl and
valid_predictions.jsonl (with history) or samples.json (history-free), a plot, checkpoints
(checkpoint-N) and the final weights.  `--resume` continues from the newest complete
checkpoint.
"""

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from typing import Literal, Optional

import numpy as np
import torch
from transformers import TrainerCallback

import flowkern
from flowkern import plots, sasrec, semantic_ids
from flowkern.data import BUILTIN, DataError, load_preferences, load_task, read_history_data, resolve
from flowkern.models import add_lora, load_model
from flowkern.trainer import FlowerConfig, FlowerTrainer, ResumeError

EMBEDDED_LR, PRETRAINED_LR = 3e-3, 1e-4
HISTORY_FREE_STEPS = 120
ALIASES = {"--out": "output_dir", "--batch-size": "per_device_train_batch_size", "--lr": "learning_rate",
           "--grad-accum": "gradient_accumulation_steps", "--epochs": "num_train_epochs",
           "--eval-every": "eval_steps", "--save-every": "save_steps", "--eval-batch-size": "per_device_eval_batch_size"}


@dataclass
class ScriptArguments:
    """What the command line adds to FlowerConfig: the data, the model and how to start."""

    data: Optional[str] = field(default=None, metadata={
        "help": f"a directory with items.tsv and train/valid/test.csv (with history), a .json of title -> count "
                f"(history-free), or a shipped set {sorted(BUILTIN)}; default: the embedded 100-movie history-free "
                f"set"})
    model: Optional[str] = field(default=None, metadata={
        "help": "nothing (embedded tiny Qwen2), 'smollm2', PATH/FILE.gguf, a model directory or a hub id "
                "available offline"})
    objective: Literal["flower", "sft", "ifair", "gflowgr"] = field(default="flower", metadata={
        "help": "sft: the BIGRec baseline, w = 0; ifair: IFairLRS, SFT reweighted by popularity group "
                "(--ifair-strength, default 1); gflowgr: GFlowGR (--gflowgr-loss tb|db, default tb; needs "
                "--items semantic)"})
    items: Literal["titles", "semantic"] = field(default="titles", metadata={
        "help": "what the model generates: item titles, or semantic IDs (RQ-KMeans codes of item embeddings, added "
                "to the tokenizer; with history)"})
    semantic_embeddings: Literal["sasrec", "title"] = field(default="sasrec", metadata={
        "help": "--items semantic: quantise the SASRec's item embeddings, or the LLM's mean-pooled title embeddings"})
    semantic_levels: int = field(default=3, metadata={"help": "--items semantic: RQ-KMeans levels (then one level "
                                                              "that separates colliding items)"})
    codebook_size: int = field(default=64, metadata={"help": "--items semantic: codes per level"})
    lora_r: Optional[int] = field(default=None, metadata={
        "help": "LoRA rank; 0 trains every weight. Default: 8 for pretrained models, 0 for the embedded one"})
    pref: Optional[Literal["sasrec"]] = field(default=None, metadata={
        "help": "with history: personalise the reward with a SASRec's scores of each row's history, computed "
                "when the row is used (trained on the data, or cached; see --pref-model)"})
    pref_model: Optional[str] = field(default=None, metadata={
        "help": "with --pref sasrec: a directory from python -m flowkern.sasrec --out DIR (default: train one "
                "for the data and --seed, cached under $FLOWKERN_CACHE or ~/.cache/flowkern)"})
    pref_scores: Optional[str] = field(default=None, metadata={
        "help": "with history: a .npy (train rows x items) of preference scores from an auxiliary recommender"})
    item_noun: Optional[str] = field(default=None, metadata={
        "help": "what an item is called in the prompt (default: from the data's meta.json or name)"})
    prompt_template: Optional[str] = field(default=None, metadata={
        "help": "a text file with the prompt, using {history} and optionally {item} {items} {a_item} {done} {do}"})
    max_history: Optional[int] = field(default=None, metadata={"help": "keep each history's N most recent items"})
    chat_template: bool = field(default=False, metadata={"help": "wrap prompts in the tokenizer's chat template"})
    resume: bool = field(default=False, metadata={"help": "continue from the newest complete checkpoint in --out"})
    eval_only: bool = field(default=False, metadata={
        "help": "with history: no training; evaluate --model as it is on valid, then test once (e.g. another "
                "decoding of a trained run: --model RUN_DIR --decode d3)"})


class UsageError(Exception):
    """A bad command line or config: one line, exit code 2."""


def main(argv=None):
    """Run; a usage or data error is one line on stderr and exit code 2."""
    try:
        run(argv)
    except (UsageError, DataError) as error:
        print(f"python -m flowkern.train: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None


def run(argv=None):
    """The run `argv` describes; returns its FlowerTrainer."""
    script, config = parse(sys.argv[1:] if argv is None else argv)
    try:
        loaded = load_model(script.model, seed=config.seed)
    except ValueError as error:
        raise UsageError(error) from None
    titles, splits = read_history_data(resolve(script.data)) if os.path.isdir(resolve(script.data)) else (None, None)
    collaborative = _sasrec(script, config, loaded, titles, splits)
    codes = _semantic_ids(script, config, loaded, titles, collaborative)
    task = load_task(script.data, loaded.tokenizer, item_noun=script.item_noun,
                     prompt_template=script.prompt_template, max_history=script.max_history,
                     chat_template=script.chat_template, item_texts=None if codes is None else codes.texts())
    preferences = _preferences(script, config, task, collaborative)
    lora_r = 0 if script.eval_only else script.lora_r if script.lora_r is not None else (8 if loaded.pretrained else 0)
    model = add_lora(loaded.model, lora_r) if lora_r > 0 else loaded.model
    if config.gradient_checkpointing:
        config.gradient_checkpointing_kwargs = {"use_reentrant": False}
    trainer = FlowerTrainer(model, config, task, preferences, processing_class=loaded.tokenizer,
                            collaborative=None if collaborative is None else sasrec.item_probabilities(
                                collaborative, config.device),
                            callbacks=[JsonLines(os.path.join(config.output_dir, "metrics.jsonl"), script.resume)])
    # With history the model is chosen on valid (before and during training, and at the end)
    # and test is read once, by the final model; history-free there is one distribution.
    history = task.mode == "history"
    main_process = trainer.is_world_process_zero()
    started = time.time()
    if main_process:
        write_config(config, script, loaded, task, trainer, lora_r)
    before_path = os.path.join(config.output_dir, "before.json")
    if script.eval_only:
        before = None
    elif script.resume and os.path.exists(before_path):
        with open(before_path) as f:
            before = json.load(f)
    else:
        trainer.evaluate(metric_key_prefix="eval" if history else "all")
        before = summary(trainer.evaluation)
        if main_process:
            with open(before_path, "w") as f:
                json.dump(before, f)
    if not script.eval_only:
        try:
            trainer.train(resume_from_checkpoint=True if script.resume else None)
        except ResumeError as error:
            raise UsageError(error) from None
        trainer.save_model()
    valid = None
    if history:
        trainer.evaluate(metric_key_prefix="eval")
        valid = trainer.evaluation
        before = before or summary(valid)  # --eval-only: the model as it is
        trainer.evaluate(task.test, metric_key_prefix="test")
    else:
        trainer.evaluate(metric_key_prefix="all")
    if main_process:
        write_results(config.output_dir, task, trainer, before, valid, time.time() - started)
    # Every process leaves together, through the process group's own teardown: a process that
    # exits with its group alive can abort at shutdown (gloo's threads) while another still works.
    trainer.accelerator.wait_for_everyone()
    trainer.accelerator.end_training()
    return trainer


def _sasrec(script, config, loaded, titles, splits):
    """The SASRec that --pref sasrec, --decode d3, GFlowGR's collaborative signals or SASRec
    semantic IDs need (loaded from --pref-model, or trained and cached), or None."""
    gflowgr = config.gflowgr_loss is not None and (config.augment == "cm" or config.reward_weights[1] > 0)
    semantic = script.items == "semantic" and script.semantic_embeddings == "sasrec" \
        and not isinstance(loaded.tokenizer, semantic_ids.CodeTokenizer)  # else the model brings its codes
    if script.pref != "sasrec" and config.decode != "d3" and not gflowgr and not semantic:
        return None
    device = config.device
    if script.pref_model:
        model, report = sasrec.load(script.pref_model, titles, splits, device)
    else:
        with config.main_process_first(desc="SASRec"):  # one process trains and caches, the others load it
            model, report = sasrec.trained(titles, splits, sasrec.SASRecConfig(seed=config.seed), device)
    sasrec.warn_unless_better(report, lambda line: print(line, file=sys.stderr, flush=True))
    print(f"flowkern.train: SASRec valid NDCG@10 {report['valid']['NDCG@10']:.4f}, test NDCG@10 "
          f"{report['test']['NDCG@10']:.4f}", flush=True)
    return model


def _semantic_ids(script, config, loaded, titles, collaborative):
    """--items semantic: the items' codes, added to `loaded`'s tokenizer and model (a model
    trained on semantic IDs brings its own codebook); None for titles."""
    if script.items != "semantic":
        return None
    if isinstance(loaded.tokenizer, semantic_ids.CodeTokenizer):
        codes = loaded.tokenizer.semantic_ids
        if len(codes.codes) != len(titles):
            raise UsageError(f"--model {script.model}: its semantic IDs cover {len(codes.codes)} items, the data "
                             f"{len(titles)}")
        return codes
    if script.semantic_embeddings == "sasrec":
        embeddings = semantic_ids.sasrec_item_embeddings(collaborative)
    else:
        embeddings = semantic_ids.title_embeddings(loaded.model, loaded.tokenizer, titles)
    codes = semantic_ids.SemanticIDs.fit(embeddings, levels=script.semantic_levels, codebook_size=script.codebook_size,
                                         seed=config.seed)
    loaded.tokenizer = semantic_ids.add_code_tokens(loaded.model, loaded.tokenizer, codes, seed=config.seed)
    print(f"flowkern.train: semantic IDs of {len(titles)} items from {script.semantic_embeddings} embeddings, "
          f"{script.semantic_levels} levels of {script.codebook_size} codes", flush=True)
    return codes


def _preferences(script, config, task, model):
    """The preference scores --pref or --pref-scores asks for, or None."""
    if script.pref_scores:
        return load_preferences(script.pref_scores, config.pref_mode, task)
    if script.pref != "sasrec":
        return None
    print(f"flowkern.train: SASRec preferences ({config.pref_mode})", flush=True)
    return sasrec.SASRecPreferences(model, [example.history for example in task.train], config.pref_mode,
                                    config.device)


def parse(argv):
    """(ScriptArguments, FlowerConfig) from the command line and an optional --config file;
    flags override the file.  Raises UsageError with one line."""
    from transformers import HfArgumentParser

    parser = HfArgumentParser((ScriptArguments, FlowerConfig), prog="python -m flowkern.train",
                              description=__doc__.split("\n\n")[0], allow_abbrev=False, formatter_class=_Help)
    parser.add_argument("--config", help="a .yaml or .json file of any of these fields (flags override it)")
    for alias, dest in ALIASES.items():
        action = next(a for a in parser._actions if a.dest == dest)
        action.option_strings.append(alias)
        parser._option_string_actions[alias] = action
        action.help = f"{action.help} (alias {alias})" if action.help else f"alias {alias}"
    parser.set_defaults(learning_rate=None)  # then by model: the help says which
    for dest, text in (("learning_rate", f"AdamW learning rate. Default: {EMBEDDED_LR} for the embedded model, "
                                         f"{PRETRAINED_LR} for pretrained ones"),
                       ("max_steps", f"optimiser steps. Default: {HISTORY_FREE_STEPS} history-free; with history "
                                     f"num_train_epochs over train.csv")):
        next(a for a in parser._actions if a.dest == dest).help = text
    parser.error = _usage_error
    argv = list(argv)
    if "--config" in argv:
        at = argv.index("--config")
        if at + 1 == len(argv):
            raise UsageError("--config needs a file")
        argv = _config_flags(parser, argv[at + 1]) + argv[:at] + argv[at + 2:]
    namespace = parser.parse_args(argv)
    values = vars(namespace)
    values.pop("config", None)
    if values["eval_steps"] is not None and str(values["eval_strategy"]) in ("no", "IntervalStrategy.NO"):
        values["eval_strategy"] = "steps"  # --eval-every N alone turns evaluation on
    try:
        script = ScriptArguments(**{f.name: values.pop(f.name) for f in fields(ScriptArguments)})
        history = _check(script, values)
        if script.objective in ("sft", "ifair"):
            values["gfn_weight"] = 0.0
        if script.objective == "gflowgr" and values["gflowgr_loss"] is None:
            values["gflowgr_loss"] = "tb"
        if script.objective == "ifair" and not values.get("ifair_strength"):
            values["ifair_strength"] = 1.0
        if values["learning_rate"] is None:
            values["learning_rate"] = EMBEDDED_LR if script.model is None else PRETRAINED_LR
        if not history and values["max_steps"] <= 0:
            values["max_steps"] = HISTORY_FREE_STEPS
        config = FlowerConfig(**{k: v for k, v in values.items() if k in {f.name for f in fields(FlowerConfig)}})
    except ValueError as error:
        raise UsageError(str(error).splitlines()[0]) from None
    return script, config


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """Each option's default once: from its help text when that names it, else appended."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default in (None, argparse.SUPPRESS) or "default" in text.lower():
            return text
        return super()._get_help_string(action)


def _usage_error(message):
    raise UsageError(message)


def _config_flags(parser, path) -> list:
    """A config file's fields as command-line flags (so they are type-checked the same way)."""
    try:
        with open(path, encoding="utf-8") as f:
            if path.endswith((".yaml", ".yml")):
                import yaml

                values = yaml.safe_load(f)
            else:
                values = json.load(f)
    except (OSError, ValueError) as error:
        raise UsageError(f"--config {path}: cannot read it ({str(error).splitlines()[0]})") from None
    if not isinstance(values, dict):
        raise UsageError(f"--config {path}: expected a mapping of field -> value")
    known = {a.dest for a in parser._actions}
    flags = []
    for name, value in values.items():
        if name not in known or name == "config":
            raise UsageError(f"--config {path}: unknown field {name!r}")
        flags += [f"--{name}", *map(str, value if isinstance(value, list) else [value])]
    return flags


def _check(script, values):
    """Refuse missing paths and conflicting options before any model is loaded; returns
    whether the data has history."""
    if script.data is not None and not os.path.exists(resolve(script.data)):
        raise ValueError(f"--data {script.data}: no such file or directory (nor a shipped set: {sorted(BUILTIN)})")
    for name in ("pref_scores", "prompt_template"):
        path = getattr(script, name)
        if path is not None and not os.path.isfile(path):
            raise ValueError(f"--{name.replace('_', '-')} {path}: no such file")
    if script.model is not None and os.sep in script.model and not os.path.exists(script.model):
        raise ValueError(f"--model {script.model}: no such file or directory")
    if script.objective in ("sft", "ifair") and values.get("gfn_weight") not in (None, 0.0):
        raise ValueError(f"--objective {script.objective} trains with w = 0; --gfn-weight {values['gfn_weight']} "
                         f"contradicts it")
    if values.get("gflowgr_loss") and script.objective != "gflowgr":
        raise ValueError(f"--gflowgr-loss {values['gflowgr_loss']} is GFlowGR's loss: it needs --objective gflowgr")
    if script.objective == "gflowgr" and script.items != "semantic":
        raise ValueError("--objective gflowgr compares items' codes (its prefix reward): it needs --items semantic")
    if script.objective == "gflowgr" and (script.pref or script.pref_scores):
        raise ValueError("preference scores personalise Flower's SubTB reward; GFlowGR fuses its own "
                         "(--reward-weights): drop --pref / --pref-scores")
    if script.objective != "ifair" and values.get("ifair_strength"):
        raise ValueError("--ifair-strength weights IFairLRS's SFT examples: it needs --objective ifair")
    history = os.path.isdir(resolve(script.data))
    for name in ("pref_scores", "pref"):
        if getattr(script, name) and not history:
            raise ValueError(f"--{name.replace('_', '-')} personalises rewards per training row: it needs a data set "
                             f"with history")
    if script.pref and script.pref_scores:
        raise ValueError("--pref and --pref-scores both give preference scores: choose one")
    if script.items == "semantic" and not history:
        raise ValueError("--items semantic quantises the items of a data set with history: give a directory")
    if values.get("decode") == "d3" and not history:
        raise ValueError("--decode d3 mixes in a SASRec's scores of each row's history: it needs a data set with "
                         "history")
    if script.pref_model and script.pref != "sasrec" and values.get("decode") != "d3" \
            and script.objective != "gflowgr" and script.items != "semantic":
        raise ValueError("--pref-model is the SASRec of --pref sasrec, --decode d3, --objective gflowgr or --items "
                         "semantic: give one of them")
    if script.eval_only and (not history or script.resume):
        raise ValueError("--eval-only evaluates a model on valid and test: it needs a data set with history, and "
                         "no --resume")
    if script.pref_model and not os.path.isdir(script.pref_model):
        raise ValueError(f"--pref-model {script.pref_model}: no such directory")
    if (script.pref or script.pref_scores) and (script.objective == "sft" or values.get("gfn_weight") == 0.0):
        raise ValueError("preference scores personalise the SubTB reward: with w = 0 (SFT) there is none")
    if script.resume and not os.path.isdir(values.get("output_dir") or ""):
        raise ValueError(f"--resume: no run directory {values.get('output_dir')}")
    return history


# ---- artefacts ------------------------------------------------------------------------------

class JsonLines(TrainerCallback):
    """Appends every log record, with its step, to metrics.jsonl (a fresh run starts it empty)."""

    def __init__(self, path, resume):
        self.path = path
        if not resume and os.path.exists(path):
            os.remove(path)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero:
            with open(self.path, "a") as f:
                f.write(json.dumps({"step": state.global_step, **logs}) + "\n")


def summary(evaluation) -> dict:
    """An evaluation's result without the per-row predictions and sample counts."""
    return {k: v for k, v in evaluation.items() if k not in ("predictions", "sampled")}


def write_config(config, script, loaded, task, trainer, lora_r):
    os.makedirs(config.output_dir, exist_ok=True)
    record = {"script": asdict(script), "config": json.loads(config.to_json_string()), "lora_r": lora_r,
              "restricted_head": trainer.head is not None, "full_head_because": trainer.full_head_because,
              "model_description": loaded.description, "tokenizer": loaded.tokenizer.name, "mode": task.mode,
              "data_source": task.source, "num_items": len(task.titles), "world_size": config.world_size,
              "trie": {"nodes": trainer.trie.num_nodes, "depth": trainer.trie.depth},
              "versions": {"flowkern": flowkern.__version__, "torch": torch.__version__,
                           "python": platform.python_version(), **_package_versions()}}
    with open(os.path.join(config.output_dir, "run_config.json"), "w") as f:
        json.dump(record, f, indent=1)
    print(f"flowkern.train: {loaded.description}, {task.mode} data {task.source} ({len(task.titles)} items), "
          f"w = {config.gfn_weight}, out {config.output_dir}; head: "
          f"{'restricted' if trainer.head is not None else 'full (' + trainer.full_head_because + ')'}", flush=True)


def write_results(out, task, trainer, before, valid, seconds):
    """final.json, predictions.jsonl (and valid_predictions.jsonl) or samples.json, the plot,
    and the table of results.  With history: before = valid at step 0, valid = the final
    (selected) model's valid evaluation, after = its test; history-free: the distribution
    before and after."""
    evaluation = trainer.evaluation
    after = summary(evaluation)
    record = {"before": before, "after": after, "seconds": seconds}
    if valid is not None:
        for name, result in (("valid_predictions.jsonl", valid), ("predictions.jsonl", evaluation)):
            with open(os.path.join(out, name), "w") as f:
                f.writelines(json.dumps(row) + "\n" for row in result["predictions"])
        valid, state = summary(valid), trainer.state
        record.update(before_split="valid", valid=valid, after_split="test",
                      best={"metric": trainer.args.metric_for_best_model, "value": state.best_metric,
                            "checkpoint": state.best_model_checkpoint, "steps": state.global_step})
    with open(os.path.join(out, "final.json"), "w") as f:
        json.dump(record, f, indent=1)
    if task.mode == "history":
        plots.popularity_shares(os.path.join(out, "popularity.png"), evaluation["p_train"], before["p_rec"],
                                after["p_rec"])
        rows = [("metric", "valid before", "valid after", "test after")] + [
            (k, _fmt(before.get(k)), _fmt(valid.get(k)), _fmt(v)) for k, v in after.items() if isinstance(v, float)]
    else:
        with open(os.path.join(out, "samples.json"), "w") as f:
            json.dump(evaluation["sampled"], f, indent=1)
        plots.title_frequencies(os.path.join(out, "titles.png"), task.target_distribution(),
                                before["exact_distribution"], after["exact_distribution"],
                                np.array(list(evaluation["sampled"].values())))
        rows = [("metric", "before", "after")] + [(k, _fmt(before.get(k)), _fmt(v)) for k, v in after.items()
                                                  if isinstance(v, float)]
    print("\n".join(f"{name:34s}" + "".join(f" {cell:>12s}" for cell in cells) for name, *cells in rows))
    print(f"artefacts in {out}")


def _fmt(value):
    return "-" if value is None else f"{value:.4f}"


def _package_versions():
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in ("transformers", "accelerate", "peft", "numpy"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            pass
    return found


if __name__ == "__main__":
    sys.exit(main())
