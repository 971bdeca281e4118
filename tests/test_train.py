"""The trainer: metrics by hand, data loading and its errors, smoke runs, resume, torchrun."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from flowkern import metrics
from flowkern.data import DataError, load_task
from flowkern.models import load_model
from flowkern.tokenizer import QwenTokenizer
from flowkern.train import main
from tests.strategies import DATA

TITLES = ["Alien", "Aliens", "Heat", "Up", "Jaws", "Big"]


# ---- metrics against hand-computed cases ------------------------------------------------------

def test_accuracy_by_hand():
    ranked = [["a", "b", "c"], ["c", "a", "b"], ["b", "c", "d"]]
    result = metrics.accuracy(ranked, ["a", "a", "x"], ks=(1, 2))
    assert result["HR@1"] == pytest.approx(1 / 3) and result["HR@2"] == pytest.approx(2 / 3)
    assert result["NDCG@1"] == pytest.approx(1 / 3)
    assert result["NDCG@2"] == pytest.approx((1 + 1 / math.log2(3)) / 3)


def test_fairness_by_hand():
    # 2 groups, p_train = [0.75, 0.25]; 4 recommendations, 1 in group 0 → p_rec = [0.25, 0.75]
    result = metrics.fairness([[0, 1], [1, 1]], [0.75, 0.25], k=2)
    assert result["p_rec"] == [0.25, 0.75]
    assert result["DGU@2"] == pytest.approx(1.0) and result["MGU@2"] == pytest.approx(0.5)


def test_diversity_by_hand():
    result = metrics.diversity([["the big heat", "big"], ["heat"]])
    # words: the 1, big 2, heat 2 → p = (0.2, 0.4, 0.4)
    assert result["TTR"] == pytest.approx(3 / 5)
    assert result["H"] == pytest.approx(-(0.2 * math.log2(0.2) + 2 * 0.4 * math.log2(0.4)))


def test_divergences_by_hand():
    p, q = np.array([0.5, 0.5]), np.array([0.9, 0.1])
    result = metrics.divergences(p, q)
    kl_pq = 0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1)
    m = (p + q) / 2
    js = 0.5 * sum(p * np.log(p / m)) + 0.5 * sum(q * np.log(q / m))
    assert result["KL(target||model)"] == pytest.approx(kl_pq, rel=1e-4)
    assert result["JS"] == pytest.approx(js, rel=1e-4)
    assert metrics.divergences([3, 0], [3, 0])["JS"] == pytest.approx(0.0, abs=1e-12)
    assert math.isfinite(metrics.divergences([1, 1], [2, 0])["KL(target||model)"])  # eps for a missing title


# ---- data -------------------------------------------------------------------------------------

def test_qwen_tokenizer_gives_the_known_ids():
    tokenizer = QwenTokenizer()
    assert tokenizer.encode("\n") == [198] and tokenizer.encode("The") == [785]
    assert tokenizer.encode(" Lady") == [20621]
    assert tokenizer.encode("Star Wars: Episode VI - Return of the Jedi") == [
        12699, 14968, 25, 19832, 29668, 481, 3411, 315, 279, 40395]
    assert tokenizer.vocab_size == 151_665 and tokenizer.decode([12699, 14968]) == "Star Wars"


def test_movies_popularity_groups_match_the_published_priors():
    task = load_task(os.path.join(DATA, "amazon", "Movies_and_TV"), QwenTokenizer())
    assert (len(task.titles), len(task.train), len(task.valid), len(task.test)) == (2653, 21937, 2742, 2743)
    with open(os.path.join(DATA, "amazon", "Movies_and_TV", "item_counts.json")) as f:
        counts = json.load(f)
    by_title = {}
    for title, count in zip(task.titles, task.train_counts):
        by_title[title] = by_title.get(title, 0) + count
    assert all(by_title[t] == c for t, c in counts.items())
    _, p_train = task.popularity_groups()
    np.testing.assert_allclose(p_train, [0.3927, 0.1797, 0.1275, 0.0976, 0.0781, 0.0607, 0.0431, 0.0205], atol=5e-4)
    assert (task.rewards == task.train_counts + 1).all()


def write_dataset(directory, rows=12):
    """A tiny dataset in the Movies_and_TV layout."""
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "items.tsv"), "w") as f:
        f.write("item_id\ttitle\n" + "".join(f"{i}\t{t}\n" for i, t in enumerate(TITLES)))
    rng = np.random.default_rng(0)
    for split in ("train", "valid", "test"):
        with open(os.path.join(directory, f"{split}.csv"), "w") as f:
            f.write("history_item_id,item_id,history_item_title,item_title\n")
            for _ in range(rows):
                history = rng.choice(len(TITLES), size=3, replace=False).tolist()
                target = int(rng.integers(len(TITLES)))
                names = [TITLES[i] for i in history]
                f.write(f"\"{history}\",{target},\"{names}\",{TITLES[target]}\n")
    return directory


@pytest.mark.parametrize("damage, message", [
    (lambda d: os.remove(os.path.join(d, "items.tsv")), r"items.tsv: no such file"),
    (lambda d: open(os.path.join(d, "items.tsv"), "a").write("9\tGap\n"), r"items.tsv, line 8: expected '6<TAB>title'"),
    (lambda d: open(os.path.join(d, "train.csv"), "a").write("\"[1, 2\",3,x,y\n"),
     r"train.csv, line 14: history_item_id must be a list of item ids"),
    (lambda d: open(os.path.join(d, "valid.csv"), "a").write("\"[1, 2]\",99,x,y\n"),
     r"valid.csv, line 14: item ids must lie in \[0, 5\]"),
    (lambda d: open(os.path.join(d, "test.csv"), "w").write("history_item_id,item_id\n"), r"test.csv: the split is empty"),
    (lambda d: open(os.path.join(d, "test.csv"), "w").write("a,b\n1,2\n"), r"test.csv, line 1: missing columns"),
])
def test_ill_formed_data_is_named_with_file_and_line(tmp_path, damage, message):
    directory = write_dataset(tmp_path / "data")
    damage(directory)
    with pytest.raises(DataError, match=message):
        load_task(directory, QwenTokenizer())


@pytest.mark.parametrize("content, message", [
    ("{}", "expected a non-empty JSON object of title -> count"),
    ('{"Alien": 0}', r"the count of 'Alien' must be a number > 0, got 0"),
    ('{"Alien": 3,', r"line 1: not valid JSON"),
    ('{"": 3}', r"the title of item 0 \(''\) cannot be tokenised as an item"),
    ('{"Alien\\nthe sequel": 3}', r"the title of item 0 \('Alien\\nthe sequel'\) cannot be tokenised as an item"),
])
def test_bad_history_free_files(tmp_path, content, message):
    path = tmp_path / "counts.json"
    path.write_text(content)
    with pytest.raises(DataError, match=message):
        load_task(str(path), QwenTokenizer())


def test_data_paths_that_are_neither_directory_nor_json(tmp_path):
    with pytest.raises(DataError, match="expected a directory"):
        load_task(str(tmp_path / "counts.csv"), QwenTokenizer())
    with pytest.raises(DataError, match="no such file"):
        load_task(str(tmp_path / "missing.json"), QwenTokenizer())


def test_unknown_model_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match=r"--model '.*nowhere': cannot load it"):
        load_model(str(tmp_path / "nowhere"), seed=0)
    with pytest.raises(ValueError, match=r"no such GGUF file"):
        load_model(str(tmp_path / "model.gguf"), seed=0)


# ---- smoke runs on a tiny model saved to a local directory -------------------------------------

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
    tokenizer.save_pretrained(directory)
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=True)
    Qwen2ForCausalLM(config).save_pretrained(directory)
    return directory


def run(tmp_path, tiny_model, data, name, *extra):
    out = str(tmp_path / name)
    main(["--model", tiny_model, "--lora-r", "0", "--data", data, "--batch-size", "4", "--max-steps", "4",
          "--eval-limit", "4", "--eval-samples", "64", "--num-beams", "10", "--out", out, *extra])
    return out


def history_free_file(tmp_path):
    path = tmp_path / "counts.json"
    path.write_text(json.dumps(dict(zip(TITLES, [40, 30, 10, 10, 6, 4]))))
    return str(path)


@pytest.mark.parametrize("mode", ["history", "history_free"])
@pytest.mark.parametrize("objective", ["flower", "sft"])
def test_smoke_run_writes_every_artefact(tmp_path, tiny_model, mode, objective):
    data = write_dataset(str(tmp_path / "data")) if mode == "history" else history_free_file(tmp_path)
    out = run(tmp_path, tiny_model, data, "run", "--objective", objective, "--rollouts", "2", "--eval-every", "2")
    expected = {"config.json", "metrics.jsonl", "final.json", "checkpoint"}
    expected |= {"predictions.jsonl", "popularity.png"} if mode == "history" else {"samples.json", "titles.png"}
    assert expected <= set(os.listdir(out))
    with open(os.path.join(out, "config.json")) as f:
        default_weight = {"flower": 0.01 if mode == "history" else 0.9, "sft": 0.0}[objective]
        assert json.load(f)["gfn_weight"] == default_weight
    with open(os.path.join(out, "final.json")) as f:
        final = json.load(f)
    assert final["before"]["step"] == 0 and set(final["before"]) >= set(k for k in final["after"])
    with open(os.path.join(out, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    train = [r for r in records if r["split"] == "train"]
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    assert all((r["subtb"] > 0) == (objective == "flower") for r in train)
    assert any(r["split"] in ("valid", "all") and r["step"] == 2 for r in records)
    if mode == "history":
        with open(os.path.join(out, "predictions.jsonl")) as f:
            predictions = [json.loads(line) for line in f]
        assert len(predictions) == 4 and all(len(p["titles"]) == len(TITLES) for p in predictions)
        assert {"NDCG@5", "HR@10", "DGU@10", "MGU@10", "H", "TTR"} <= set(final["after"])
    else:
        with open(os.path.join(out, "samples.json")) as f:
            assert sum(json.load(f).values()) == 64
        assert {"exact JS", "sampled JS", "sampled KL(target||model)"} <= set(final["after"])


def train_records(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if r["split"] == "train"]


@pytest.mark.parametrize("mode", ["history", "history_free"])
def test_restricted_head_trains_like_the_full_head(tmp_path, tiny_model, mode):
    """The default (restricted head: tied embeddings, a plain Linear) and --full-head draw the
    same rollouts, give the same losses and metrics to float32 rounding, and end with the same
    weights; config.json says which head ran."""
    data = write_dataset(str(tmp_path / "data")) if mode == "history" else history_free_file(tmp_path)
    outs = [run(tmp_path, tiny_model, data, name, "--max-steps", "3", *flags)
            for name, flags in (("restricted", []), ("full", ["--full-head"]))]
    configs = []
    for out in outs:
        with open(os.path.join(out, "config.json")) as f:
            configs.append(json.load(f))
    assert configs[0]["restricted_head"] and configs[0]["full_head_because"] is None
    assert not configs[1]["restricted_head"] and configs[1]["full_head_because"] == "--full-head"
    restricted, full = (train_records(out) for out in outs)
    for got, want in zip(restricted, full):
        for name in ("sft", "subtb", "loss"):
            assert got[name] == pytest.approx(want[name], rel=1e-4, abs=1e-6)
    finals = []
    for out in outs:
        with open(os.path.join(out, "final.json")) as f:
            finals.append(json.load(f)["after"])
    for name, value in finals[1].items():
        if isinstance(value, float):
            assert finals[0][name] == pytest.approx(value, rel=1e-3, abs=1e-5), name
    from safetensors.torch import load_file

    weights = [load_file(os.path.join(out, "checkpoint", "model.safetensors")) for out in outs]
    for name in weights[1]:
        torch.testing.assert_close(weights[0][name], weights[1][name], rtol=1e-4, atol=1e-5, msg=name)


def test_restricted_sft_normalises_over_the_trie_children(tmp_path, tiny_model):
    """--sft-normalize trie: at the same first step the cross-entropy over the children is
    below the one over the vocabulary (a subset of it normalises), with either head."""
    data = write_dataset(str(tmp_path / "data"))
    sft = {}
    for name, flags in (("full", []), ("trie", ["--sft-normalize", "trie"]),
                        ("trie-full-head", ["--sft-normalize", "trie", "--full-head"])):
        out = run(tmp_path, tiny_model, data, name, "--objective", "sft", "--max-steps", "1", *flags)
        sft[name] = train_records(out)[0]["sft"]
    assert 0 < sft["trie"] < sft["full"]
    assert sft["trie"] == pytest.approx(sft["trie-full-head"], rel=1e-5)


def test_resume_matches_an_uninterrupted_run(tmp_path, tiny_model):
    data = write_dataset(str(tmp_path / "data"))
    straight = run(tmp_path, tiny_model, data, "straight")
    resumed = str(tmp_path / "resumed")
    common = ["--model", tiny_model, "--lora-r", "0", "--data", data, "--batch-size", "4", "--eval-limit", "4",
              "--out", resumed]
    main(common + ["--max-steps", "2"])
    main(common + ["--max-steps", "4", "--resume"])
    from safetensors.torch import load_file

    weights = [load_file(os.path.join(out, "checkpoint", "model.safetensors")) for out in (straight, resumed)]
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][name], weights[1][name]) for name in weights[0])
    losses, finals = [], []
    for out in (straight, resumed):
        with open(os.path.join(out, "metrics.jsonl")) as f:
            losses.append([(r["step"], r["loss"]) for r in map(json.loads, f) if r["split"] == "train"])
        with open(os.path.join(out, "final.json")) as f:
            finals.append(json.load(f)["after"])
    assert losses[0] == losses[1] and [step for step, _ in losses[1]] == [1, 2, 3, 4]
    assert finals[0] == finals[1]


@pytest.mark.parametrize("mode", ["div", "add"])
def test_preference_scores(tmp_path, tiny_model, mode):
    data = write_dataset(str(tmp_path / "data"))
    scores = np.random.default_rng(0).normal(size=(12, len(TITLES)))
    scores[3] = 1.0  # a row without spread: every preference 1
    np.save(tmp_path / "prefs.npy", scores)
    out = run(tmp_path, tiny_model, data, "prefs", "--pref-scores", str(tmp_path / "prefs.npy"), "--pref-mode", mode)
    with open(os.path.join(out, "metrics.jsonl")) as f:
        assert all(r["subtb"] > 0 for r in map(json.loads, f) if r["split"] == "train")
    np.save(tmp_path / "wrong.npy", scores[:5])
    with pytest.raises(SystemExit, match=r"expected shape \(train rows, items\) = \(12, 6\)"):
        run(tmp_path, tiny_model, data, "wrong", "--pref-scores", str(tmp_path / "wrong.npy"))


def test_lora_on_a_local_model(tmp_path, tiny_model):
    out = run(tmp_path, tiny_model, history_free_file(tmp_path), "lora", "--lora-r", "4")
    assert "adapter_model.safetensors" in os.listdir(os.path.join(out, "checkpoint"))


def test_torchrun_two_processes(tmp_path, tiny_model):
    data = write_dataset(str(tmp_path / "data"))
    out = str(tmp_path / "ddp")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29517",
               "-m", "flowkern.train", "--model", tiny_model, "--lora-r", "0", "--data", data, "--batch-size", "2",
               "--grad-accum", "2", "--max-steps", "3", "--eval-limit", "5", "--out", out]
    subprocess.run(command, check=True, capture_output=True, timeout=600,
                   env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.getcwd()})
    with open(os.path.join(out, "final.json")) as f:
        final = json.load(f)
    assert final["after"]["rows"] == 5  # rows split across both processes, gathered on rank 0
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f)["world_size"] == 2


def test_grad_accumulation_all_reduces_once_per_step(tmp_path, tiny_model):
    """Under DistributedDataParallel, micro-batches before the last skip the all-reduce:
    one gradient bucket reduction per optimiser step whatever --grad-accum is."""
    import torch.distributed as dist

    from flowkern import train

    loaded = load_model(tiny_model, seed=0)
    task = load_task(write_dataset(str(tmp_path / "data")), loaded.tokenizer)
    trie = task.trie()
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        reductions = {}
        for accum in (1, 3):
            args = train.parse_args(["--batch-size", "2", "--grad-accum", str(accum), "--gfn-weight", "0.5"])
            model = torch.nn.parallel.DistributedDataParallel(train.Scorer(loaded.model, None))
            calls = []

            def count(state, bucket):
                calls.append(bucket.index())
                return dist.all_reduce(bucket.buffer(), async_op=True).get_future().then(lambda f: f.value()[0])

            model.register_comm_hook(None, count)
            optimizer = torch.optim.SGD(loaded.model.parameters(), lr=0.0)
            train.train_step(model, optimizer, task, trie, None, args, 0, 0, 2, 1)
            reductions[accum] = len(calls)
        assert reductions[1] > 0 and reductions[3] == reductions[1]
    finally:
        dist.destroy_process_group()


def test_command_line_errors(tmp_path):
    with pytest.raises(SystemExit):
        main(["--gfn-weight", "1.5"])
    with pytest.raises(SystemExit):
        main(["--rollout-temperature", "2", "1"])
    with pytest.raises(SystemExit):
        main(["--batch-size", "0"])
