"""FlowerTrainer and `python -m flowkern.train`: smoke runs, the two heads, resume after a kill
at any point, 2-process runs, domains and prompts, the command line's errors."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from flowkern import checkpoints
from flowkern.data import DataError, load_task
from flowkern.tokenizer import QwenTokenizer
from flowkern.train import main
from tests.strategies import TITLES, write_dataset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A 2-layer Qwen2 with a byte-level tokenizer (every byte one token, so "\\n" is one),
    saved with save_pretrained: what `--model DIR` loads."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    directory = str(tmp_path_factory.mktemp("tiny-model"))
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    backend = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|end|>", pad_token="<|end|>")
    tokenizer.chat_template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}<assistant>"
    tokenizer.save_pretrained(directory)
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=True)
    Qwen2ForCausalLM(config).save_pretrained(directory)
    return directory


def common(tiny_model, data, out):
    return ["--model", tiny_model, "--lora-r", "0", "--data", data, "--batch-size", "4", "--eval-limit", "4",
            "--eval-samples", "64", "--out", out, "--logging_steps", "1", "--disable_tqdm", "True"]


def run(tmp_path, tiny_model, data, name, *extra):
    out = str(tmp_path / name)
    main(common(tiny_model, data, out) + ["--max-steps", "4", *extra])
    return out


def history_free_file(tmp_path):
    path = tmp_path / "counts.json"
    path.write_text(json.dumps(dict(zip(TITLES, [40, 30, 10, 10, 6, 4]))))
    return str(path)


def records(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def train_records(out):
    return [r for r in records(out) if "loss" in r]


def read(out, name):
    with open(os.path.join(out, name)) as f:
        return json.load(f)


# ---- smoke runs ---------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["history", "history_free"])
@pytest.mark.parametrize("objective", ["flower", "sft"])
def test_smoke_run_writes_every_artefact(tmp_path, tiny_model, mode, objective):
    data = write_dataset(str(tmp_path / "data")) if mode == "history" else history_free_file(tmp_path)
    out = run(tmp_path, tiny_model, data, "run", "--objective", objective, "--rollouts", "2", "--eval-every", "2")
    expected = {"run_config.json", "metrics.jsonl", "final.json", "checkpoint-4", "model.safetensors"}
    expected |= {"predictions.jsonl", "valid_predictions.jsonl", "popularity.png"} if mode == "history" else {
        "samples.json", "titles.png"}
    assert expected <= set(os.listdir(out))
    assert checkpoints.is_complete(os.path.join(out, "checkpoint-4"))
    default_weight = {"flower": 0.01 if mode == "history" else 0.9, "sft": 0.0}[objective]
    assert read(out, "run_config.json")["config"]["gfn_weight"] == default_weight
    final = read(out, "final.json")
    assert set(final["before"]) == set(final["after"])
    train = train_records(out)
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    assert all((r["subtb"] > 0) == (objective == "flower") for r in train)
    assert all(r["loss"] == pytest.approx((1 - default_weight) * r["sft"] + default_weight * r["subtb"], rel=1e-5)
               for r in train)
    evaluations = [r["step"] for r in records(out) if any(k.startswith("eval_") for k in r)]
    if mode == "history":  # valid before training, every 2 steps and at the end; test once, at the end
        assert evaluations == [0, 2, 4, 4]
        assert [r["step"] for r in records(out) if "test_rows" in r] == [4]
    else:
        assert evaluations == [2, 4]
        assert [r["step"] for r in records(out) if "all_samples" in r] == [0, 4]
    if mode == "history":
        with open(os.path.join(out, "predictions.jsonl")) as f:
            predictions = [json.loads(line) for line in f]
        assert len(predictions) == 4 and all(len(p["titles"]) == len(TITLES) for p in predictions)
        assert {"NDCG@5", "NDCG@10", "HR@5", "HR@10", "DGU@10", "MGU@10", "H", "TTR"} <= set(final["after"])
    else:
        assert sum(read(out, "samples.json").values()) == 64
        assert {"exact JS", "sampled JS", "sampled KL(target||model)"} <= set(final["after"])


def test_final_evaluation_is_on_test_and_periodic_on_valid(tmp_path, tiny_model):
    """The final evaluation reads test.csv's rows, the periodic one valid.csv's."""
    data = write_dataset(str(tmp_path / "data"))
    out = run(tmp_path, tiny_model, data, "splits", "--eval-every", "2", "--max-steps", "3")
    task = load_task(data, QwenTokenizer())
    with open(os.path.join(out, "predictions.jsonl")) as f:
        targets = [json.loads(line)["target_id"] for line in f]
    assert targets == [example.target for example in task.test[:4]]
    assert targets != [example.target for example in task.valid[:4]]
    with open(os.path.join(out, "valid_predictions.jsonl")) as f:
        assert [json.loads(line)["target_id"] for line in f] == [example.target for example in task.valid[:4]]


@pytest.mark.parametrize("mode", ["history", "history_free"])
def test_restricted_head_trains_like_the_full_head(tmp_path, tiny_model, mode):
    """The default (restricted head) and --full-head draw the same rollouts, give the same
    losses and metrics to float32 rounding, and end with the same weights."""
    data = write_dataset(str(tmp_path / "data")) if mode == "history" else history_free_file(tmp_path)
    outs = [run(tmp_path, tiny_model, data, name, "--max-steps", "3", *flags)
            for name, flags in (("restricted", []), ("full", ["--full-head", "True"]))]
    configs = [read(out, "run_config.json") for out in outs]
    assert configs[0]["restricted_head"] and configs[0]["full_head_because"] is None
    assert not configs[1]["restricted_head"] and configs[1]["full_head_because"] == "full_head"
    for got, want in zip(*(train_records(out) for out in outs)):
        for name in ("sft", "subtb", "loss"):
            assert got[name] == pytest.approx(want[name], rel=1e-4, abs=1e-6)
    finals = [read(out, "final.json")["after"] for out in outs]
    for name, value in finals[1].items():
        if isinstance(value, float):
            assert finals[0][name] == pytest.approx(value, rel=1e-3, abs=1e-5), name
    weights = [load_file(os.path.join(out, "model.safetensors")) for out in outs]
    for name in weights[1]:
        torch.testing.assert_close(weights[0][name], weights[1][name], rtol=1e-4, atol=1e-5, msg=name)


def test_restricted_sft_normalises_over_the_trie_children(tmp_path, tiny_model):
    data = write_dataset(str(tmp_path / "data"))
    sft = {}
    for name, flags in (("full", []), ("trie", ["--sft-normalize", "trie"]),
                        ("trie-full-head", ["--sft-normalize", "trie", "--full-head", "True"])):
        out = run(tmp_path, tiny_model, data, name, "--objective", "sft", "--max-steps", "1", *flags)
        sft[name] = train_records(out)[0]["sft"]
    assert 0 < sft["trie"] < sft["full"]
    assert sft["trie"] == pytest.approx(sft["trie-full-head"], rel=1e-5)


@pytest.mark.parametrize("mode", ["div", "add"])
def test_preference_scores(tmp_path, tiny_model, mode):
    data = write_dataset(str(tmp_path / "data"))
    scores = np.random.default_rng(0).normal(size=(12, len(TITLES)))
    scores[3] = 1.0  # a row without spread: every preference 1
    np.save(tmp_path / "prefs.npy", scores)
    out = run(tmp_path, tiny_model, data, "prefs", "--pref-scores", str(tmp_path / "prefs.npy"), "--pref-mode", mode)
    assert all(r["subtb"] > 0 for r in train_records(out))
    np.save(tmp_path / "wrong.npy", scores[:5])
    with pytest.raises(SystemExit) as exit_info:
        run(tmp_path, tiny_model, data, "wrong", "--pref-scores", str(tmp_path / "wrong.npy"))
    assert exit_info.value.code == 2


def test_pref_sasrec_personalises_the_reward_from_each_rows_history(tmp_path, tiny_model, monkeypatch, capsys):
    """--pref sasrec trains a SASRec for the data (cached under FLOWKERN_CACHE) and reads
    each row's preferences when the row is used; --pref-model reuses a saved one, refused
    for other data."""
    from flowkern import sasrec

    monkeypatch.setenv("FLOWKERN_CACHE", str(tmp_path / "cache"))
    data = write_dataset(str(tmp_path / "data"))
    read_rows = []
    original = sasrec.SASRecPreferences.__getitem__
    monkeypatch.setattr(sasrec.SASRecPreferences, "__getitem__",
                        lambda self, rows: read_rows.append(rows.tolist()) or original(self, rows))
    out = run(tmp_path, tiny_model, data, "sasrec", "--pref", "sasrec", "--pref-mode", "add", "--rollouts", "2")
    assert all(r["subtb"] > 0 for r in train_records(out))
    assert len(read_rows) == 4 and all(len(rows) == 8 and rows[::2] == rows[1::2] for rows in read_rows)
    assert "SASRec preferences (add)" in capsys.readouterr().out
    (entry,) = os.listdir(tmp_path / "cache" / "sasrec")
    saved = str(tmp_path / "cache" / "sasrec" / entry)
    run(tmp_path, tiny_model, data, "saved", "--pref", "sasrec", "--pref-model", saved)
    other = write_dataset(str(tmp_path / "other"), rows=11)
    with pytest.raises(SystemExit) as exit_info:
        run(tmp_path, tiny_model, other, "other", "--pref", "sasrec", "--pref-model", saved)
    assert exit_info.value.code == 2
    assert "made for other data (the items or splits differ)" in capsys.readouterr().err


def test_test_is_read_once_at_the_end_by_the_model_selected_on_valid(tmp_path, tiny_model, monkeypatch):
    """Every evaluation before the last reads valid; the last reads test, once; the final model
    is the best checkpoint on valid (its valid metric is the best one logged)."""
    from flowkern.trainer import FlowerTrainer

    data = write_dataset(str(tmp_path / "data"))
    task = load_task(data, QwenTokenizer())
    valid, test = [e.target for e in task.valid[:4]], [e.target for e in task.test[:4]]
    assert valid != test
    reads = []
    original = FlowerTrainer._recommendations
    monkeypatch.setattr(FlowerTrainer, "_recommendations",
                        lambda self, examples: reads.append([e.target for e in examples]) or original(self, examples))
    out = run(tmp_path, tiny_model, data, "best", "--eval-every", "1", "--save-every", "1", "--max-steps", "6",
              "--load_best_model_at_end", "--metric_for_best_model", "DGU@10", "--greater_is_better", "False",
              "--early-stopping-patience", "2", "--lr", "3e-2")
    assert reads[-1] == test and reads[:-1] == [valid] * (len(reads) - 1)
    final = read(out, "final.json")
    logged = [r["eval_DGU@10"] for r in records(out) if "eval_DGU@10" in r][1:-1]  # the periodic ones
    assert final["best"]["value"] == min(logged) == final["valid"]["DGU@10"]
    assert final["before_split"] == "valid" and final["after_split"] == "test"


def test_subtb_params_body_keeps_the_subtb_gradient_out_of_the_output_layer(tmp_path, tiny_model):
    """With w = 1 (SubTB alone; SFT's term is there with weight 0): subtb_params="body" gives
    the untied output layer a zero gradient and the body the same gradient as "all"."""
    from transformers import AutoModelForCausalLM

    from flowkern.models import load_model
    from flowkern.trainer import FlowerConfig, FlowerTrainer

    tokenizer = load_model(tiny_model, seed=0).tokenizer
    task = load_task(write_dataset(str(tmp_path / "data")), tokenizer)
    grads = {}
    for params in ("all", "body"):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(tiny_model, tie_word_embeddings=False)
        config = FlowerConfig(output_dir=str(tmp_path / params), report_to=["none"], gfn_weight=1.0,
                              subtb_params=params, rollouts=2)
        trainer = FlowerTrainer(model, config, task)
        inputs = {"rows": torch.arange(4), "targets": torch.tensor([e.target for e in task.train[:4]])}
        trainer.compute_loss(model, inputs).backward()
        grads[params] = {name: p.grad for name, p in model.named_parameters()}
    assert grads["body"]["lm_head.weight"].abs().sum() == 0 < grads["all"]["lm_head.weight"].abs().sum()
    body = [name for name in grads["all"] if name != "lm_head.weight" and grads["all"][name] is not None]
    assert len(body) > 10
    for name in body:
        torch.testing.assert_close(grads["body"][name], grads["all"][name])
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    with pytest.raises(ValueError, match=r"subtb_params='body' .* needs the restricted head; here the full head is "
                                         r"used \(full_head\)"):
        FlowerTrainer(model, FlowerConfig(output_dir=str(tmp_path / "x"), report_to=["none"], subtb_params="body",
                                          full_head=True), task)


def test_the_sweeps_quick_mode_runs(tmp_path, tiny_model):
    data = write_dataset(str(tmp_path / "data"))
    env = {**os.environ, "FLOWKERN_CACHE": str(tmp_path / "cache")}
    result = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "train_sweep.py"), "--quick",
                             "--runs", str(tmp_path / "runs"), "--name", "quick", "--", "--data", data,
                             "--model", tiny_model, "--lora-r", "0"],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "SASRec alone" in result.stdout and "Flower w=0.01, SASRec div" in result.stdout
    assert "Selection on valid (NDCG@10 of each run's final model)" in result.stdout
    assert sorted(os.listdir(tmp_path / "runs")) == ["quick-sasrec-seed0", "quick-w0.0-popularity-all-sft-full-seed0",
                                                    "quick-w0.01-div-all-sft-full-seed0",
                                                    "quick-w0.01-popularity-all-sft-full-seed0"]


def test_lora_on_a_local_model(tmp_path, tiny_model):
    out = run(tmp_path, tiny_model, history_free_file(tmp_path), "lora", "--lora-r", "4")
    assert "adapter_model.safetensors" in os.listdir(os.path.join(out, "checkpoint-4"))


def test_tensorboard_offline(tmp_path, tiny_model):
    out = run(tmp_path, tiny_model, history_free_file(tmp_path), "tb", "--report_to", "tensorboard", "--max-steps", "2")
    assert any(name.startswith("events.out.tfevents") for _, _, names in os.walk(out) for name in names)


# ---- resume ------------------------------------------------------------------------------------

def weights_of(directory):
    return load_file(os.path.join(directory, "model.safetensors"))


def assert_same_weights(a, b):
    assert a.keys() == b.keys() and all(torch.equal(a[name], b[name]) for name in a)


@pytest.fixture(scope="module")
def straight(tmp_path_factory, tiny_model):
    """An uninterrupted 4-step run with a checkpoint every 2 steps, all kept."""
    tmp_path = tmp_path_factory.mktemp("straight")
    data = write_dataset(str(tmp_path / "data"))
    out = str(tmp_path / "run")
    main(common(tiny_model, data, out) + ["--max-steps", "4", "--save-every", "2", "--save_total_limit", "4"])
    return data, out


def resume_from(tmp_path, tiny_model, straight, damage, *extra):
    """Copy the straight run as it was after step 2 (plus `damage`: what a kill left behind),
    resume it to step 4 and return the new run directory."""
    data, out = straight
    resumed = str(tmp_path / "resumed")
    os.makedirs(resumed)
    shutil.copytree(os.path.join(out, "checkpoint-2"), os.path.join(resumed, "checkpoint-2"))
    shutil.copy(os.path.join(out, "before.json"), resumed)
    damage(out, resumed)
    main(common(tiny_model, data, resumed) + ["--max-steps", "4", "--save-every", "2", "--resume", *extra])
    return resumed


def partial_save(out, resumed):
    """Killed while writing checkpoint-4: some of its files, no manifest."""
    os.makedirs(os.path.join(resumed, "checkpoint-4"))
    shutil.copy(os.path.join(out, "checkpoint-4", "model.safetensors"), os.path.join(resumed, "checkpoint-4"))


def partial_rotation(out, resumed):
    """Killed while deleting an old checkpoint: a manifest whose files are partly gone, newer
    than the complete checkpoint-2."""
    shutil.copytree(os.path.join(out, "checkpoint-4"), os.path.join(resumed, "checkpoint-4"))
    os.remove(os.path.join(resumed, "checkpoint-4", "optimizer.pt"))


def partial_manifest(out, resumed):
    """Killed between writing the manifest's temporary file and renaming it."""
    shutil.copytree(os.path.join(out, "checkpoint-4"), os.path.join(resumed, "checkpoint-4"))
    os.rename(os.path.join(resumed, "checkpoint-4", checkpoints.MANIFEST),
              os.path.join(resumed, "checkpoint-4", checkpoints.MANIFEST + ".tmp"))


def finished(out, resumed):
    """Killed after the last checkpoint: resuming trains nothing (the Trainer alone would
    take a step more)."""
    shutil.copytree(os.path.join(out, "checkpoint-4"), os.path.join(resumed, "checkpoint-4"))


@pytest.mark.parametrize("damage", [lambda out, resumed: None, partial_save, partial_rotation, partial_manifest,
                                    finished],
                         ids=["clean", "kill-during-save", "kill-during-rotation", "kill-before-rename", "finished"])
def test_resume_after_a_kill_matches_an_uninterrupted_run(tmp_path, tiny_model, straight, damage):
    resumed = resume_from(tmp_path, tiny_model, straight, damage)
    assert_same_weights(weights_of(resumed), weights_of(straight[1]))
    assert_same_weights(weights_of(os.path.join(resumed, "checkpoint-4")),
                        weights_of(os.path.join(straight[1], "checkpoint-4")))
    expected = [] if damage is finished else [r["loss"] for r in train_records(straight[1])][2:]
    assert [r["loss"] for r in train_records(resumed)] == expected
    assert read(resumed, "final.json")["after"] == read(straight[1], "final.json")["after"]


def test_resume_that_changes_the_run_is_refused(tmp_path, tiny_model, straight, capsys):
    with pytest.raises(SystemExit) as exit_info:
        resume_from(tmp_path, tiny_model, straight, lambda out, resumed: None, "--lr", "1e-2", "--batch-size", "2")
    assert exit_info.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and errors[0].startswith("python -m flowkern.train: error: resume from")
    assert "refused" in errors[0] and "learning_rate 0.0001 -> 0.01" in errors[0] and "batch_size 4 -> 2" in errors[0]


def test_a_real_kill_minus_nine_then_resume(tmp_path, tiny_model):
    """SIGKILL the command line at a random point of a run that saves every step, then
    --resume: the final weights equal an uninterrupted run's (all runs are processes with
    one thread, so that their float sums agree)."""
    data = write_dataset(str(tmp_path / "data"))
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}

    def command(out, *extra):
        return [sys.executable, "-m", "flowkern.train", *common(tiny_model, data, out), "--max-steps", "4",
                "--save-every", "1", "--save_total_limit", "1", *extra]

    straight, killed = str(tmp_path / "straight"), str(tmp_path / "killed")
    subprocess.run(command(straight), env=env, check=True, capture_output=True)
    process = subprocess.Popen(command(killed), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(600):  # until a checkpoint exists, then a random while more
        if checkpoints.last_complete(killed) is not None or process.poll() is not None:
            break
        subprocess.run(["sleep", "0.1"])
    subprocess.run(["sleep", str(np.random.default_rng().uniform(0, 1.5))])
    process.kill()
    process.wait()
    subprocess.run(command(killed, "--resume"), env=env, check=True, capture_output=True)
    assert_same_weights(weights_of(killed), weights_of(straight))


# ---- several processes --------------------------------------------------------------------------

WORKER = """
import json, os, sys, hashlib
from flowkern.train import run
trainer = run(sys.argv[2:])
weights = hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in trainer.model.parameters())).hexdigest()
losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
with open(os.path.join(sys.argv[1], f"rank{trainer.args.process_index}.json"), "w") as f:
    json.dump({"weights": weights, "losses": losses}, f)
"""


@pytest.mark.parametrize("launcher", ["torchrun", "accelerate"])
def test_two_processes(tmp_path, tiny_model, launcher):
    """Both processes see the same logged losses (means over the processes) and end with the
    same weights; evaluation rows are split across them and gathered; the SASRec of --pref
    sasrec is trained by one process and loaded by the other."""
    data = write_dataset(str(tmp_path / "data"))
    out = str(tmp_path / launcher)
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    os.makedirs(out)
    start = {"torchrun": [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                          "--master_port=29517"],
             # accelerate's --cpu launches one process (several need MPI); --multi_gpu starts them
             # through torch.distributed.run, and without CUDA FlowerConfig sets use_cpu (gloo)
             "accelerate": [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--multi_gpu",
                            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                            "--main_process_port", "29518"]}[launcher]
    command = [*start, str(worker), out, *common(tiny_model, data, out), "--eval-limit", "5",
               "--gradient_accumulation_steps", "2", "--batch-size", "2", "--max-steps", "3", "--pref", "sasrec"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT,
                                 "FLOWKERN_CACHE": str(tmp_path / "cache")})
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [read(out, f"rank{r}.json") for r in (0, 1)]
    assert ranks[0] == ranks[1] and len(ranks[0]["losses"]) == 3
    assert read(out, "final.json")["after"]["rows"] == 5
    assert read(out, "run_config.json")["world_size"] == 2
    assert result.stdout.count("sasrec: epoch 1:") == 1  # one process trains the SASRec, the other loads it
    assert result.stdout.count("sasrec: cached model") == 1


# ---- domains and prompts ----------------------------------------------------------------------------

def prompt_of(task, tokenizer=None):
    return (tokenizer or QwenTokenizer()).decode(task.train[0].prompt)


def test_prompts_follow_the_domain(tmp_path):
    tokenizer = QwenTokenizer()
    movies = load_task("movies", tokenizer)
    assert prompt_of(movies).startswith("### Instruction:\nThe user has watched the movies below, oldest first. "
                                        "Recommend the next movie the user will watch.\n\n### Input:\n\"")
    games = write_dataset(str(tmp_path / "Video_Games"))
    assert "played the video games below" in prompt_of(load_task(games, tokenizer))
    plain = write_dataset(str(tmp_path / "catalogue"))
    assert "interacted with the items below" in prompt_of(load_task(plain, tokenizer))
    (tmp_path / "catalogue" / "meta.json").write_text(json.dumps({"category": "Books"}))
    assert "Recommend the next book the user will read" in prompt_of(load_task(plain, tokenizer))
    assert "the next album" in prompt_of(load_task(plain, tokenizer, item_noun="album"))
    assert prompt_of(load_task(None, tokenizer)) == "### Instruction:\nRecommend a movie.\n\n### Response:\n"
    assert "Recommend an item." in prompt_of(load_task(history_free_file(tmp_path), tokenizer))


def test_a_local_folder_wins_over_a_shipped_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_dataset(str(tmp_path / "movies"))
    assert load_task("movies", QwenTokenizer()).titles == TITLES
    monkeypatch.chdir(ROOT)
    assert len(load_task("movies", QwenTokenizer()).titles) == 2653


def test_prompt_template_max_history_and_chat_template(tmp_path, tiny_model):
    from transformers import AutoTokenizer

    from flowkern.tokenizer import HFTokenizer

    tokenizer = QwenTokenizer()
    data = write_dataset(str(tmp_path / "data"))
    template = tmp_path / "prompt.txt"
    template.write_text("Seen {items}: {history}. Next {item}:")
    task = load_task(data, tokenizer, prompt_template=str(template), max_history=1)
    with open(os.path.join(data, "train.csv")) as f:
        last = eval(f.read().splitlines()[1].split('"')[1])[-1]
    assert prompt_of(task) == f'Seen items: "{TITLES[last]}". Next item:'
    template.write_text("{user} {history}")
    with pytest.raises(DataError, match=r"prompt.txt: placeholders must be among .* got \['history', 'user'\]"):
        load_task(data, tokenizer, prompt_template=str(template))
    chat = load_task(data, HFTokenizer(AutoTokenizer.from_pretrained(tiny_model)), chat_template=True)
    assert prompt_of(chat, HFTokenizer(AutoTokenizer.from_pretrained(tiny_model))).startswith("<user>### Instruction")
    with pytest.raises(DataError, match="has no chat template"):
        load_task(data, tokenizer, chat_template=True)


def test_titles_that_are_special_tokens(tmp_path, tiny_model):
    """Qwen's tokenizer reads every title as text (a special token's name stays characters);
    a Hugging Face tokenizer that would turn a title into a control token is refused."""
    from transformers import AutoTokenizer

    from flowkern.tokenizer import HFTokenizer

    path = tmp_path / "counts.json"
    path.write_text(json.dumps({"<|endoftext|>": 3, "Alien": 2}))
    task = load_task(str(path), QwenTokenizer())
    assert not QwenTokenizer().special_ids.intersection(task.item_tokens[0])
    path.write_text(json.dumps({"Alien": 3, "<|end|>": 2}))
    with pytest.raises(DataError, match=r"counts.json: the title of item 1 \('<\|end\|>'\) holds a special token"):
        load_task(str(path), HFTokenizer(AutoTokenizer.from_pretrained(tiny_model)))


# ---- the command line's errors -------------------------------------------------------------------------

@pytest.mark.parametrize("argv, message", [
    (["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
    (["--gfn-weight", "abc"], "argument --gfn_weight/--gfn-weight: invalid float value: 'abc'"),
    (["--gfn-weight", "1.5"], "gfn_weight must lie in [0, 1], got 1.5"),
    (["--rollout-temperature", "2", "1"], "rollout_temperature needs MIN MAX with 0 < MIN <= MAX"),
    (["--batch-size", "0"], "per_device_train_batch_size must be >= 1"),
    (["--objective", "sft", "--gfn-weight", "0.5"], "--objective sft trains with w = 0; --gfn-weight 0.5"),
    (["--pref-scores", "README.md"], "--pref-scores personalises rewards per training row: it needs a data set"),
    (["--pref", "sasrec"], "--pref personalises rewards per training row: it needs a data set with history"),
    (["--data", "movies", "--pref", "sasrec", "--pref-scores", "README.md"], "--pref and --pref-scores both give"),
    (["--data", "movies", "--pref-model", "."], "--pref-model is the SASRec of --pref sasrec, --decode d3, --objective"),
    (["--data", "movies", "--pref", "sasrec", "--pref-model", "nowhere"], "--pref-model nowhere: no such directory"),
    (["--data", "movies", "--pref", "sasrec", "--objective", "sft"], "with w = 0 (SFT) there is none"),
    (["--pref", "cosine"], "argument --pref: invalid choice: 'cosine'"),
    (["--early-stopping-patience", "2"], "early_stopping_patience must be >= 1 and needs load_best_model_at_end"),
    (["--data", "nowhere/at/all"], "--data nowhere/at/all: no such file or directory (nor a shipped set"),
    (["--model", "nowhere/model"], "--model nowhere/model: no such file or directory"),
    (["--config", "missing.yaml"], "--config missing.yaml: cannot read it"),
])
def test_command_line_errors_are_one_line_and_exit_2(argv, message, capsys):
    assert_usage_error(argv, message, capsys)


def assert_usage_error(argv, message, capsys):
    """python -m flowkern.train `argv` exits 2 with one line on stderr holding `message`."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and message in error, error


def test_trainer_and_loader_bad_inputs(tmp_path, tiny_model):
    """What the Python API refuses, each with its type and message."""
    from transformers import TrainingArguments

    from flowkern.models import load_model
    from flowkern.trainer import FlowerConfig, FlowerTrainer

    loaded = load_model(tiny_model, seed=0)
    data = write_dataset(str(tmp_path / "data"))
    task = load_task(data, loaded.tokenizer)
    config = FlowerConfig(output_dir=str(tmp_path / "out"), report_to=["none"])
    with pytest.raises(TypeError, match="args must be a flowkern.FlowerConfig, got TrainingArguments"):
        FlowerTrainer(loaded.model, TrainingArguments(output_dir=str(tmp_path / "out")), task)
    with pytest.raises(ValueError, match=r"preferences need a task with history and shape .* = \(12, 6\), got \(5, 6\)"):
        FlowerTrainer(loaded.model, config, task, torch.ones(5, 6))
    with pytest.raises(ValueError, match="resume: no complete checkpoint in"):
        FlowerTrainer(loaded.model, config, task).train(resume_from_checkpoint=True)
    for options, message in (({"num_beams": 5}, "num_beams must be >= 10"), ({"lam": 0.0}, "lam must be a finite"),
                             ({"eval_limit": 0}, "eval_limit must be >= 1"),
                             ({"eval_temperature": float("inf")}, "eval_temperature must be a finite")):
        with pytest.raises(ValueError, match=message):
            FlowerConfig(output_dir=str(tmp_path / "out"), **options)
    with pytest.raises(DataError, match="max_history must be >= 1, got 0"):
        load_task(data, loaded.tokenizer, max_history=0)
    (tmp_path / "data" / "meta.json").write_text('{"colour": "red"}')
    with pytest.raises(DataError, match=r"meta.json: expected an object of non-empty strings with keys among"):
        load_task(data, loaded.tokenizer)


def test_config_files(tmp_path, tiny_model, capsys):
    data = write_dataset(str(tmp_path / "data"))
    config = tmp_path / "run.yaml"
    config.write_text(f"data: {data}\nmodel: {tiny_model}\nlora_r: 0\nmax_steps: 1\nper_device_train_batch_size: 2\n"
                      f"eval_limit: 2\noutput_dir: {tmp_path / 'out'}\nrollout_temperature: [1.0, 2.0]\n")
    main(["--config", str(config), "--gfn-weight", "0.5"])
    saved = read(str(tmp_path / "out"), "run_config.json")["config"]
    assert saved["gfn_weight"] == 0.5 and saved["per_device_train_batch_size"] == 2
    assert saved["rollout_temperature"] == [1.0, 2.0]
    config.write_text("gfn_wieght: 0.5\n")
    with pytest.raises(SystemExit):
        main(["--config", str(config)])
    assert "unknown field 'gfn_wieght'" in capsys.readouterr().err
    config.write_text("gfn_weight: many\n")
    with pytest.raises(SystemExit):
        main(["--config", str(config)])
    assert "invalid float value: 'many'" in capsys.readouterr().err


def test_the_rq2_recipe_config_parses():
    from flowkern.train import parse

    script, config = parse(["--config", os.path.join(ROOT, "examples", "rq2.yaml")])
    assert (script.data, script.pref, config.pref_mode) == ("movies", "sasrec", "div")
    assert config.load_best_model_at_end and config.metric_for_best_model == "NDCG@10"
    assert (config.eval_steps, config.save_steps, config.early_stopping_patience) == (100, 100, 2)
    assert str(config.eval_strategy).lower().endswith("steps") and config.greater_is_better


def test_help_shows_each_default_once():
    result = subprocess.run([sys.executable, "-m", "flowkern.train", "--help"], capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": ROOT}, check=True)
    assert "--gfn_weight GFN_WEIGHT, --gfn-weight GFN_WEIGHT" in result.stdout
    assert "(alias --out)" in result.stdout and "(default: runs/default)" in result.stdout
    assert result.stdout.count("(default: runs/default)") == 1


def test_the_command_exits_zero_from_another_folder(tmp_path, tiny_model):
    """`python -m flowkern.train` as a process, run outside the repository: exit code 0."""
    out = str(tmp_path / "cli")
    result = subprocess.run([sys.executable, "-m", "flowkern.train", *common(tiny_model, history_free_file(tmp_path),
                                                                               out), "--max-steps", "1"],
                            cwd=tmp_path, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ROOT})
    assert result.returncode == 0, result.stderr[-2000:]
    assert "exact JS" in result.stdout and os.path.exists(os.path.join(out, "final.json"))
