"""flowkern.sasrec: it learns a sequential rule, its cache follows the data, its per-row
preferences equal the dense .npy path, and what it refuses."""

import json
import os

import numpy as np
import pytest
import torch

from flowkern import sasrec
from flowkern.data import DataError, Task, load_preferences, read_history_data
from tests.strategies import write_dataset

NUM_ITEMS = 24
SMALL = dict(hidden=32, max_epochs=40, patience=40, batch_size=64)


def rule_data(seed=0, rows=600):
    """Histories of consecutive ids (mod NUM_ITEMS) from random starts; the next item is the
    last one plus one: a rule that popularity cannot see (every item equally frequent)."""
    rng = np.random.default_rng(seed)
    titles = [f"Item {i}" for i in range(NUM_ITEMS)]

    def split(n):
        out = []
        for _ in range(n):
            start, length = int(rng.integers(NUM_ITEMS)), int(rng.integers(1, 8))
            items = [(start + k) % NUM_ITEMS for k in range(length + 1)]
            out.append((items[:-1], items[-1]))
        return out

    return titles, {"train": split(rows), "valid": split(100), "test": split(100)}


def test_sasrec_learns_a_sequential_rule():
    titles, splits = rule_data()
    model, report = sasrec.train(titles, splits, sasrec.SASRecConfig(**SMALL), log=lambda line: None)
    top = sasrec.scores(model, [h for h, _ in splits["test"]]).argmax(1)
    hr1 = (top == torch.tensor([t for _, t in splits["test"]])).float().mean().item()
    assert hr1 > 0.95
    assert report["test"]["HR@10"] > 0.95 and report["beats_popularity"]
    assert report["popularity_test"]["HR@10"] < 0.8  # 10 of 24 equally popular items: about 10/24


def test_the_cache_follows_the_data_and_the_settings(tmp_path, monkeypatch):
    monkeypatch.setenv("FLOWKERN_CACHE", str(tmp_path / "cache"))
    titles, splits = rule_data(rows=50)
    config = sasrec.SASRecConfig(hidden=8, max_epochs=2)
    logged = []
    sasrec.trained(titles, splits, config, log=logged.append)
    sasrec.trained(titles, splits, config, log=logged.append)
    assert any(line.startswith("sasrec: cached model") for line in logged)
    changed = {**splits, "test": splits["test"][:-1]}  # one row fewer in test
    assert sasrec.data_fingerprint(titles, changed) != sasrec.data_fingerprint(titles, splits)
    assert sasrec.data_fingerprint(titles[:-1] + ["Other"], splits) != sasrec.data_fingerprint(titles, splits)
    logged.clear()
    sasrec.trained(titles, changed, config, log=logged.append)
    assert not any("cached model" in line for line in logged)  # other data: trained, never reused
    entries = os.listdir(tmp_path / "cache" / "sasrec")
    assert len(entries) == 2
    sasrec.trained(titles, splits, sasrec.SASRecConfig(hidden=8, max_epochs=3), log=logged.append)
    assert len(os.listdir(tmp_path / "cache" / "sasrec")) == 3  # other settings: another entry
    # an entry whose report says other data (a tampered or colliding cache) is retrained
    report_path = tmp_path / "cache" / "sasrec" / sorted(entries)[0] / "report.json"
    report = json.loads(report_path.read_text())
    report_path.write_text(json.dumps({**report, "data": "0" * 16}))
    logged.clear()
    for data in (splits, changed):
        sasrec.trained(titles, data, config, log=logged.append)
    assert sum("made for other data" in line and "retraining" in line for line in logged) == 1


def test_a_saved_model_made_for_other_data_is_refused(tmp_path):
    titles, splits = rule_data(rows=50)
    model, report = sasrec.train(titles, splits, sasrec.SASRecConfig(hidden=8, max_epochs=1), log=lambda line: None)
    sasrec.save(model, report, str(tmp_path / "m"))
    loaded, _ = sasrec.load(str(tmp_path / "m"), titles, splits)
    histories = [h for h, _ in splits["valid"]]
    assert torch.equal(sasrec.scores(loaded, histories), sasrec.scores(model, histories))
    other = {**splits, "train": splits["train"][1:]}
    with pytest.raises(DataError, match=r"SASRec .*/m: made for other data \(the items or splits differ\); retrain"):
        sasrec.load(str(tmp_path / "m"), titles, other)
    with pytest.raises(DataError, match=r"SASRec .*/nowhere: cannot load it"):
        sasrec.load(str(tmp_path / "nowhere"), titles, splits)


@pytest.mark.parametrize("mode", ["div", "add"])
def test_per_row_preferences_equal_the_dense_npy_path(tmp_path, mode):
    """SASRecPreferences[rows] (computed when read, in any batch) and load_preferences of the
    same scores saved as a (train rows, items) .npy give the same p for every row and item."""
    directory = write_dataset(str(tmp_path / "data"), rows=40)
    titles, splits = read_history_data(directory)
    model, _ = sasrec.train(titles, splits, sasrec.SASRecConfig(hidden=16, max_epochs=3), log=lambda line: None)
    histories = [h for h, _ in splits["train"]]
    np.save(tmp_path / "scores.npy", sasrec.scores(model, histories).numpy())
    task = Task("history", directory, titles, [], np.ones(len(titles)), np.ones(len(titles)), 0,
                [None] * len(histories), [], [])
    dense = load_preferences(tmp_path / "scores.npy", mode, task)
    lazy = sasrec.SASRecPreferences(model, histories, mode)
    assert lazy.shape == tuple(dense.shape) == (40, len(titles))
    rows = torch.tensor([5, 0, 39, 5, 17])
    torch.testing.assert_close(lazy[rows], dense[rows], rtol=0, atol=0)
    torch.testing.assert_close(torch.cat([lazy[torch.arange(i, min(i + 7, 40))] for i in range(0, 40, 7)]), dense,
                               rtol=0, atol=0)
    assert (dense > 0).all() and dense.dtype == torch.float32


def test_a_sasrec_that_loses_to_popularity_is_reported_loudly():
    lines = []
    report = {"beats_popularity": False, "valid": {"NDCG@10": 0.01}, "popularity_valid": {"NDCG@10": 0.02}}
    sasrec.warn_unless_better(report, lines.append)
    assert lines == ["WARNING: SASRec valid NDCG@10 0.0100 does not beat the popularity baseline's 0.0200: its "
                     "preferences will not personalise the reward usefully"]
    sasrec.warn_unless_better({**report, "beats_popularity": True}, lines.append)
    assert len(lines) == 1


def test_the_command_line(tmp_path, capsys):
    directory = write_dataset(str(tmp_path / "data"), rows=20)
    sasrec.main(["--data", directory, "--out", str(tmp_path / "out"), "--max-epochs", "2", "--hidden", "8"])
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert {"valid", "test", "popularity_valid", "popularity_test", "data", "best_epoch"} <= set(report)
    assert {"HR@5", "HR@10", "NDCG@5", "NDCG@10", "DGU@10", "MGU@10", "H", "TTR"} <= set(report["test"])
    out = capsys.readouterr().out
    assert "popularity_test" in out and "best epoch" in out
    (tmp_path / "counts.json").write_text('{"a": 1}')
    with pytest.raises(SystemExit) as exit_info:
        sasrec.main(["--data", str(tmp_path / "counts.json"), "--out", str(tmp_path / "x")])
    assert exit_info.value.code == 2
    assert "SASRec needs a directory with history" in capsys.readouterr().err


@pytest.mark.parametrize("flags, message", [
    (["--max-len", "0"], "SASRec max_len must be >= 1, got 0"),
    (["--hidden", "30", "--heads", "4"], "SASRec hidden (30) must be a multiple of heads (4)"),
    (["--dropout", "1.0"], "SASRec needs 0 <= dropout < 1, lr > 0 and l2 >= 0"),
])
def test_bad_settings_are_one_line_and_exit_2(tmp_path, capsys, flags, message):
    directory = write_dataset(str(tmp_path / "data"))
    with pytest.raises(SystemExit) as exit_info:
        sasrec.main(["--data", directory, "--out", str(tmp_path / "out"), *flags])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_histories_are_left_padded_and_task_splits_are_the_files_rows(tmp_path):
    padded = sasrec.pad_histories([[1, 2, 3, 4, 5], [7], []], num_items=9, max_len=3)
    assert padded.tolist() == [[3, 4, 5], [9, 9, 7], [9, 9, 9]]
    from flowkern.data import load_task
    from flowkern.tokenizer import QwenTokenizer

    directory = write_dataset(str(tmp_path / "data"))
    task = load_task(directory, QwenTokenizer(), max_history=1)  # the prompt's truncation leaves the ids whole
    titles, splits = read_history_data(directory)
    assert task.titles == titles and sasrec.splits_of(task) == splits
