"""The paper's other methods in the trainer: IFairLRS (--objective ifair), D3 decoding
(--decode d3) on a model evaluated as it is (--eval-only), and SubTB's --granularity."""

import json
import os
from types import SimpleNamespace

import numpy as np
import pytest

from flowkern import sasrec
from flowkern.data import ifair_weights
from flowkern.train import main
from tests.strategies import write_dataset
from tests.test_trainer import (assert_usage_error, common, read, run, tiny_model,  # noqa: F401 (a fixture)
                                train_records)


def test_ifair_weights_by_hand():
    """w(g) = p_train(g) / q(g): groups 0 and 1 hold the training histories' interactions
    1/2 and 1/4 and the targets 3/4 and 1/4; group 7 has no target."""
    p_train = np.array([0.5, 0.25, 0, 0, 0, 0, 0, 0.25])
    task = SimpleNamespace(popularity_groups=lambda: (np.array([0, 0, 1, 7]), p_train),
                           train=[SimpleNamespace(target=t) for t in (0, 1, 0, 2)])
    np.testing.assert_allclose(ifair_weights(task), [2 / 3, 2 / 3, 1.0, 1.0])


def test_ifair_objective_weights_each_sft_example(tmp_path, tiny_model, monkeypatch):
    """The first step's SFT loss (the model as initialised, the same batch) is the plain SFT
    loss with each example's log-likelihood scaled by its weight to the power β."""
    import flowkern.trainer

    data = write_dataset(str(tmp_path / "data"))
    monkeypatch.setattr(flowkern.trainer, "ifair_weights", lambda task: np.full(len(task.titles), 4.0))
    sft = train_records(run(tmp_path, tiny_model, data, "sft", "--objective", "sft"))[0]["sft"]
    ifair = train_records(run(tmp_path, tiny_model, data, "ifair", "--objective", "ifair"))[0]["sft"]
    half = train_records(run(tmp_path, tiny_model, data, "half", "--objective", "ifair", "--ifair-strength",
                             "0.5"))[0]["sft"]
    assert ifair == pytest.approx(4 * sft, rel=1e-6) and half == pytest.approx(2 * sft, rel=1e-6)
    assert read(str(tmp_path / "ifair"), "run_config.json")["config"]["gfn_weight"] == 0.0


@pytest.mark.parametrize("granularity", ["2", "item"])
def test_granularity_reaches_the_subtb_term(tmp_path, tiny_model, monkeypatch, granularity):
    import flowkern

    data = write_dataset(str(tmp_path / "data"))
    seen = []
    original = flowkern.linear_subtb_loss
    monkeypatch.setattr(flowkern, "linear_subtb_loss",
                        lambda *args, **kwargs: seen.append(kwargs["granularity"]) or original(*args, **kwargs))
    out = run(tmp_path, tiny_model, data, "g", "--granularity", granularity)
    assert seen and set(seen) == {granularity if granularity == "item" else int(granularity)}
    assert all(r["subtb"] > 0 for r in train_records(out))


def saved_sasrec(tmp_path, data, tokenizer_model):
    """A SASRec trained for 2 epochs on the tiny data set, saved where --pref-model reads it."""
    from flowkern.data import load_task
    from flowkern.models import load_model

    task = load_task(data, load_model(tokenizer_model, seed=0).tokenizer)
    splits = sasrec.splits_of(task)
    model, report = sasrec.train(task.titles, splits, sasrec.SASRecConfig(max_epochs=2), log=lambda line: None)
    directory = str(tmp_path / "sasrec")
    sasrec.save(model, report, directory)
    return task, model, directory


def test_eval_only_d3_at_alpha_one_recommends_the_sasrec_top_10(tmp_path, tiny_model):
    """--eval-only reads valid then test with the model as it is (nothing trained or saved);
    D3 with α = 1 ranks by the collaborative scores alone, so each row's top 10 are the
    SASRec's."""
    data = write_dataset(str(tmp_path / "data"))
    task, model, directory = saved_sasrec(tmp_path, data, tiny_model)
    out = str(tmp_path / "d3")
    main(common(tiny_model, data, out) + ["--eval-only", "--decode", "d3", "--d3-alpha", "1", "--pref-model",
                                          directory, "--num-beams", "16"])
    final = read(out, "final.json")
    assert final["before"] == final["valid"] and final["after"]["rows"] == 4
    assert not [name for name in os.listdir(out) if name.startswith("checkpoint")]
    with open(os.path.join(out, "predictions.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    probabilities = sasrec.item_probabilities(model)([e.history for e in task.test[:4]])
    for row, p in zip(rows, probabilities):
        assert row["items"] == p.argsort(descending=True)[:10].tolist()
        np.testing.assert_allclose(row["scores"], p.sort(descending=True).values[:10].log().numpy(), rtol=1e-5)


def test_d3_at_alpha_zero_is_beam_search(tmp_path, tiny_model):
    data = write_dataset(str(tmp_path / "data"))
    _, _, directory = saved_sasrec(tmp_path, data, tiny_model)
    outs = [str(tmp_path / name) for name in ("beam", "d3")]
    main(common(tiny_model, data, outs[0]) + ["--eval-only"])
    main(common(tiny_model, data, outs[1]) + ["--eval-only", "--decode", "d3", "--d3-alpha", "0", "--pref-model",
                                              directory])
    beam, d3 = (read(out, "final.json") for out in outs)
    assert beam["after"] == d3["after"] and beam["valid"] == d3["valid"]


@pytest.mark.parametrize("argv, message", [
    (["--ifair-strength", "0.5"], "--ifair-strength weights IFairLRS's SFT examples: it needs --objective ifair"),
    (["--objective", "ifair", "--gfn-weight", "0.5"], "--objective ifair trains with w = 0; --gfn-weight 0.5"),
    (["--objective", "ifair", "--ifair-strength", "-1"], "ifair_strength must be a finite number >= 0, got -1.0"),
    (["--decode", "d3"], "--decode d3 mixes in a SASRec's scores of each row's history: it needs a data set with"),
    (["--data", "movies", "--decode", "d3", "--d3-alpha", "1.5"], "d3_alpha must lie in [0, 1], got 1.5"),
    (["--decode", "greedy"], "argument --decode: invalid choice: 'greedy'"),
    (["--eval-only"], "--eval-only evaluates a model on valid and test: it needs a data set with history"),
    (["--granularity", "0"], "granularity must be an integer >= 1 or 'item', got '0'"),
    (["--granularity", "items"], "granularity must be an integer >= 1 or 'item', got 'items'"),
])
def test_command_line_errors(argv, message, capsys):
    assert_usage_error(argv, message, capsys)


def test_the_paper_tables_quick_mode_runs(tmp_path, tiny_model):
    """Every method and ablation runs once on a tiny slice; Temp and D3 re-evaluate the SFT
    model, and the second call reads every finished run instead of running it again."""
    import subprocess
    import sys

    from tests.test_trainer import ROOT

    data = write_dataset(str(tmp_path / "data"))
    command = [sys.executable, os.path.join(ROOT, "benchmarks", "paper_table.py"), "--quick", "--data", data,
               "--runs", str(tmp_path / "runs"), "--name", "quick", "--", "--model", tiny_model, "--lora-r", "0"]
    env = {**os.environ, "FLOWKERN_CACHE": str(tmp_path / "cache")}
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    for method in ("SASRec alone", "| SFT", "| Temp | 0 | T=0.5", "| D3 | 0 | α=0.1", "| IFairLRS | 0 | β=0.5",
                   "| Flower | 0 | w=0.001", "| reward | none (popularity)", "| granularity | 5", "| λ | 0.9"):
        assert method in result.stdout, method
    runs = sorted(name for name in os.listdir(tmp_path / "runs") if not name.endswith(".log"))
    assert len(runs) == 1 + 5 + 4, runs  # the SASRec, the five methods, the four ablations
    for name in ("quick-temp-t-0.5-seed0", "quick-d3-alpha-0.1-seed0"):
        assert read(str(tmp_path / "runs" / name), "run_config.json")["script"]["eval_only"]
    again = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0 and again.stdout.count("reusing") == 10, again.stdout
