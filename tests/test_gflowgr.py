"""GFlowGR through the trainer: semantic-ID items (`--items semantic`), the TB and DB
objectives (`--objective gflowgr`), the reload of a trained model with its codebook, the
command line's refusals, and the results table's quick mode."""

import json
import math
import os
import subprocess
import sys

import pytest

from flowkern.semantic_ids import SemanticIDs
from flowkern.train import main
from tests.strategies import write_dataset
from tests.test_trainer import (ROOT, assert_usage_error, common, read, run, tiny_model,  # noqa: F401 (a fixture)
                                train_records)

SEMANTIC = ["--items", "semantic", "--semantic-levels", "2", "--codebook-size", "4"]


def predictions(out, name):
    with open(os.path.join(out, name)) as f:
        return [json.loads(line)["items"] for line in f]


@pytest.mark.parametrize("loss", ["tb", "db"])
def test_gflowgr_trains_on_semantic_ids_and_its_model_reloads_with_its_codes(tmp_path, tiny_model, monkeypatch, loss):
    monkeypatch.setenv("FLOWKERN_CACHE", str(tmp_path / "cache"))
    data = write_dataset(str(tmp_path / "data"))
    out = run(tmp_path, tiny_model, data, loss, *SEMANTIC, "--objective", "gflowgr", "--gflowgr-loss", loss,
              "--gfn-weight", "0.5", "--num-trajectories", "3", "--augment", "cm")
    logged = train_records(out)
    assert len(logged) == 4
    for record in logged:  # loss = SFT + λ·GFN, every term finite
        assert math.isfinite(record[loss]) and record[loss] >= 0 and record["sft"] > 0
        assert record["loss"] == pytest.approx(record["sft"] + 0.5 * record[loss], rel=1e-3)
    codes = SemanticIDs.load(out)  # the codebook is saved with the model
    assert codes.codes.shape == (6, 3) and read(out, "run_config.json")["script"]["items"] == "semantic"
    again = str(tmp_path / "again")
    main(common(out, data, again) + [*SEMANTIC, "--eval-only"])  # the saved model decodes with its own codes
    assert predictions(again, "valid_predictions.jsonl") == predictions(out, "valid_predictions.jsonl")
    assert read(again, "final.json")["valid"] == read(out, "final.json")["valid"]


@pytest.mark.parametrize("strategy", ["logs", "random", "onpolicy"])
def test_every_augmentation_trains(tmp_path, tiny_model, monkeypatch, strategy):
    monkeypatch.setenv("FLOWKERN_CACHE", str(tmp_path / "cache"))
    data = write_dataset(str(tmp_path / "data"))
    out = run(tmp_path, tiny_model, data, strategy, *SEMANTIC, "--objective", "gflowgr", "--augment", strategy,
              "--reward-weights", "1", "0", "1", "--max-steps", "2")
    assert all(math.isfinite(r["tb"]) for r in train_records(out))


def test_sft_and_flower_run_on_semantic_ids(tmp_path, tiny_model, monkeypatch):
    monkeypatch.setenv("FLOWKERN_CACHE", str(tmp_path / "cache"))
    data = write_dataset(str(tmp_path / "data"))
    sft = run(tmp_path, tiny_model, data, "sft", *SEMANTIC, "--objective", "sft", "--max-steps", "2")
    flower = run(tmp_path, tiny_model, data, "flower", *SEMANTIC, "--semantic-embeddings", "title",
                 "--max-steps", "2")
    assert all(r["subtb"] > 0 for r in train_records(flower)) and train_records(sft)
    assert read(flower, "final.json")["after"]["HR@10"] >= 0


@pytest.mark.parametrize("argv, message", [
    (["--objective", "gflowgr"], "--objective gflowgr compares items' codes (its prefix reward): it needs --items "
                                 "semantic"),
    (["--gflowgr-loss", "db"], "--gflowgr-loss db is GFlowGR's loss: it needs --objective gflowgr"),
    (["--items", "semantic"], "--items semantic quantises the items of a data set with history: give a directory"),
    (["--data", "movies", "--items", "semantic", "--objective", "gflowgr", "--num-trajectories", "0"],
     "num_trajectories must be >= 1, got 0"),
    (["--data", "movies", "--items", "semantic", "--objective", "gflowgr", "--reward-weights", "1", "-1", "1"],
     "RewardWeights.collaborative must be a finite number >= 0, got -1.0"),
    (["--data", "movies", "--items", "semantic", "--objective", "gflowgr", "--reward-weights", "1", "1"],
     "reward_weights needs INTERACTION COLLABORATIVE PREFIX, got [1.0, 1.0]"),
    (["--data", "movies", "--items", "semantic", "--objective", "gflowgr", "--reward-floor", "0"],
     "reward_floor must be > 0"),
    (["--data", "movies", "--items", "semantic", "--objective", "gflowgr", "--gfn-weight", "-1"],
     "gfn_weight must be a finite number >= 0, got -1.0"),
    (["--data", "movies", "--items", "semantic", "--objective", "gflowgr", "--pref", "sasrec"],
     "preference scores personalise Flower's SubTB reward; GFlowGR fuses its own"),
    (["--data", "movies", "--items", "semantic", "--objective", "gflowgr", "--augment", "beam"],
     "argument --augment: invalid choice: 'beam'"),
])
def test_command_line_errors(argv, message, capsys):
    assert_usage_error(argv, message, capsys)


def test_gflowgr_needs_the_restricted_head(tmp_path, tiny_model, monkeypatch):
    monkeypatch.setenv("FLOWKERN_CACHE", str(tmp_path / "cache"))
    data = write_dataset(str(tmp_path / "data"))
    with pytest.raises(ValueError, match="GFlowGR reads log Z and the state flows from the body's hidden states"):
        run(tmp_path, tiny_model, data, "full", *SEMANTIC, "--objective", "gflowgr", "--full-head", "True")


def test_the_tables_quick_mode_runs(tmp_path, tiny_model):
    data = write_dataset(str(tmp_path / "data"))
    command = [sys.executable, os.path.join(ROOT, "benchmarks", "gflowgr_table.py"), "--quick", "--data", data,
               "--runs", str(tmp_path / "runs"), "--name", "quick", "--", "--model", tiny_model, "--lora-r", "0",
               *SEMANTIC[2:]]
    env = {**os.environ, "FLOWKERN_CACHE": str(tmp_path / "cache")}
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    for row in ("SASRec alone", "| SFT, semantic IDs | 0 |", "| GFlowGR-TB | 0 | λ=0.1", "| GFlowGR-DB | 0 | λ=0.1",
                "| Flower, titles | 0 | w=0.01"):
        assert row in result.stdout, row
