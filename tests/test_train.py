"""Metrics by hand, the tokenizer, data loading and its errors."""

import json
import math
import os

import numpy as np
import pytest
import torch

from flowkern import metrics
from flowkern.data import DataError, Example, Task, load_preferences, load_task
from flowkern.models import load_model
from flowkern.tokenizer import QwenTokenizer
from tests.strategies import MOVIES, write_dataset


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


def test_fairness_over_eight_groups_by_hand():
    # 8 recommendations in the first k = 4 of each row (the 5 past k is not counted):
    # groups 0 ×2, 1, 2, 3, 7 ×3 → p_rec = [.25, .125, .125, .125, 0, 0, 0, .375]
    p_train = [0.3, 0.2, 0.15, 0.1, 0.1, 0.05, 0.05, 0.05]
    result = metrics.fairness([[0, 0, 1, 7, 5], [7, 7, 3, 2]], p_train, k=4)
    assert result["p_rec"] == [0.25, 0.125, 0.125, 0.125, 0.0, 0.0, 0.0, 0.375]
    # dis = [-.05, -.075, -.025, .025, -.1, -.05, -.05, .325]: max − min = .425 (Σ|dis| = .7),
    # mean |dis| = .0875 (max |dis| = .325)
    assert result["DGU@4"] == pytest.approx(0.425) and result["MGU@4"] == pytest.approx(0.0875)


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
    task = load_task(MOVIES, QwenTokenizer())
    assert (len(task.titles), len(task.train), len(task.valid), len(task.test)) == (2653, 21937, 2742, 2743)
    with open(os.path.join(MOVIES, "item_counts.json")) as f:
        counts = json.load(f)
    by_title = {}
    for title, count in zip(task.titles, task.train_counts):
        by_title[title] = by_title.get(title, 0) + count
    assert all(by_title[t] == c for t, c in counts.items())
    _, p_train = task.popularity_groups()
    np.testing.assert_allclose(p_train, [0.3927, 0.1797, 0.1275, 0.0976, 0.0781, 0.0607, 0.0431, 0.0205], atol=5e-4)
    assert (task.rewards == task.train_counts + 1).all()


def toy_task(titles, train_counts, train_rows=1):
    return Task(mode="history", source="toy", titles=titles, item_tokens=[[1]] * len(titles),
                rewards=np.ones(len(titles)), train_counts=np.array(train_counts), eos_token_id=0,
                train=[Example([1], 0)] * train_rows, valid=[], test=[])


def test_unseen_titles_join_the_least_popular_group():
    """16 seen titles with counts 16 .. 1 make 8 groups of 2; the unseen titles "u1" and
    "u2" go to group 7; an unseen item that shares t3's title is in t3's group."""
    titles = ["u1"] + [f"t{i}" for i in range(16)] + ["t3", "u2"]
    groups, p_train = toy_task(titles, [0] + [16 - i for i in range(16)] + [0, 0]).popularity_groups()
    assert groups.tolist() == [7] + [i // 2 for i in range(16)] + [1, 7]
    np.testing.assert_allclose(p_train, np.array([31, 27, 23, 19, 15, 11, 7, 3]) / 136, rtol=1e-12)


@pytest.mark.parametrize("mode, first_row", [
    # row [1, 2, 3, 10]: mean 4, min 1, spread 9
    ("div", [(1 - 4) / 9 + 1, (2 - 4) / 9 + 1, (3 - 4) / 9 + 1, (10 - 4) / 9 + 1]),
    ("add", [0.5, 1 / 9 + 0.5, 2 / 9 + 0.5, 9 / 9 + 0.5]),
])
def test_load_preferences_normalises_each_row_exactly(tmp_path, mode, first_row):
    np.save(tmp_path / "scores.npy", np.array([[1.0, 2.0, 3.0, 10.0], [5.0, 5.0, 5.0, 5.0], [0.0, 0.0, 0.0, 4.0]]))
    scores = load_preferences(tmp_path / "scores.npy", mode, toy_task(["a", "b", "c", "d"], [1, 1, 1, 1], 3))
    # row [0, 0, 0, 4]: mean 1, min 0, spread 4; a constant row is all 1
    third_row = [0.75, 0.75, 0.75, 1.75] if mode == "div" else [0.5, 0.5, 0.5, 1.5]
    np.testing.assert_allclose(scores.numpy(), [first_row, [1.0] * 4, third_row], rtol=1e-12)
    assert scores.dtype == torch.float64
    np.save(tmp_path / "counts.npy", np.array([[1, 2, 3, 10], [5, 5, 5, 5], [0, 0, 0, 4]]))  # integer scores
    counts = load_preferences(tmp_path / "counts.npy", mode, toy_task(["a", "b", "c", "d"], [1, 1, 1, 1], 3))
    assert torch.equal(counts, scores)


@pytest.mark.parametrize("damage, message", [
    (lambda d: os.remove(os.path.join(d, "items.tsv")), r"items.tsv: no such file"),
    (lambda d: open(os.path.join(d, "items.tsv"), "a").write("9\tGap\n"), r"items.tsv, line 8: expected '6<TAB>title'"),
    (lambda d: open(os.path.join(d, "train.csv"), "a").write("\"[1, 2\",3,x,y\n"),
     r"train.csv, line 14: history_item_id must be a list of item ids"),
    (lambda d: open(os.path.join(d, "valid.csv"), "a").write("\"[1, 2]\",99,x,y\n"),
     r"valid.csv, line 14: item ids must lie in \[0, 5\]"),
    (lambda d: open(os.path.join(d, "test.csv"), "w").write("history_item_id,item_id\n"), r"test.csv: the split is empty"),
    (lambda d: open(os.path.join(d, "test.csv"), "w").write("a,b\n1,2\n"), r"test.csv, line 1: missing columns"),
    (lambda d: open(os.path.join(d, "train.csv"), "ab").write(b'"[1, 2]",3,\xff\xfe,y\n'),
     r"train.csv, line 14: not UTF-8 text \(byte 0xff\)$"),
    (lambda d: open(os.path.join(d, "items.tsv"), "ab").write(b"6\tG\xe9ant\n"), r"items.tsv, line 8: not UTF-8 text"),
    (lambda d: open(os.path.join(d, "train.csv"), "a").write('"[1, 2]"\n'),
     r"train.csv, line 14: item_id must be an item id in ASCII digits, got None$"),
    (lambda d: open(os.path.join(d, "train.csv"), "a").write('"[True, False]",3,x,y\n'),
     r"train.csv, line 14: history_item_id must be a list of item ids$"),
    (lambda d: open(os.path.join(d, "valid.csv"), "a").write('"[1, 2]",\u0663,x,y\n'),
     r"valid.csv, line 14: item_id must be an item id in ASCII digits, got '\u0663'$"),
    (lambda d: open(os.path.join(d, "valid.csv"), "a").write('"[1, 2]", 3 ,x,y\n'),
     r"valid.csv, line 14: item_id must be an item id in ASCII digits, got ' 3 '$"),
    (lambda d: open(os.path.join(d, "items.tsv"), "a").write("\uff16\tGap\n"),
     r"items.tsv, line 8: expected '6<TAB>title', got '\uff16\\tGap'$"),
    (lambda d: os.remove(os.path.join(d, "train.csv")) or os.mkdir(os.path.join(d, "train.csv")),
     r"train.csv: is a directory, not a file$"),
])
def test_ill_formed_data_is_named_with_file_and_line(tmp_path, damage, message):
    directory = write_dataset(tmp_path / "data")
    damage(directory)
    with pytest.raises(DataError, match=message):
        load_task(directory, QwenTokenizer())


@pytest.mark.parametrize("content, message", [
    ("{}", "expected a non-empty JSON object of title -> count"),
    ('{"Alien": 0}', r"the count of 'Alien' must be a finite number > 0, got 0$"),
    ('{"Alien": Infinity}', r"the count of 'Alien' must be a finite number > 0, got inf$"),
    ('{"Alien": 1e400}', r"the count of 'Alien' must be a finite number > 0, got inf$"),
    ('{"Alien": 1' + "0" * 400 + "}", r"the count of 'Alien' must be a finite number > 0, got 10{400}$"),
    ('{"Alien": 1e308, "Heat": 1e308}', r"the counts sum to more than a float64 holds$"),
    ('{"Alien": 1, "Heat": 2, "Alien": 3}', r"the title 'Alien' appears twice$"),
    ("[" * 100_000 + "]" * 100_000, r"JSON nested too deeply for a title -> count object$"),
    ('{"Alien": 3,', r"line 1: not valid JSON"),
    ('{"": 3}', r"the title of item 0 \(''\) cannot be tokenised as an item"),
    ('{"Alien\\nthe sequel": 3}', r"the title of item 0 \('Alien\\nthe sequel'\) cannot be tokenised as an item"),
])
def test_bad_history_free_files(tmp_path, content, message):
    path = tmp_path / "counts.json"
    path.write_text(content)
    with pytest.raises(DataError, match=message):
        load_task(str(path), QwenTokenizer())


def test_history_free_file_that_is_not_utf8(tmp_path):
    path = tmp_path / "counts.json"
    path.write_bytes(b'{"Alien": 1,\n "H\xe9at": 2}')
    with pytest.raises(DataError, match=rf"^{path}, line 2: not UTF-8 text \(byte 0xe9\)$"):
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
