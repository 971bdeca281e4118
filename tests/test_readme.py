"""Every code block of README.md runs, or is skipped here with its reason.

The ```python blocks run in README order in one namespace, as a reader pasting them into one
session would: later blocks use the trie, tokens and prompts of earlier ones.  The namespace
starts with `model`, the reader's own model: a tiny randomly initialised Qwen2 with Qwen2.5's
vocabulary (so the README's token ids fit), once plain and once under peft LoRA adapters.
Tracebacks name README.md and its line numbers.
"""

import re
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parent.parent / "README.md"
BLOCK = re.compile(r"^```(\w+)\n(.*?)^```$", re.MULTILINE | re.DOTALL)

# Each ```bash block, by its first command, and why it does not run here.
NOT_RUN = {
    'pip install ".[train]" && python -m flowkern.train': ".ci/run runs this block on a fresh clone, read from the "
                                                          "README (installs, and trains for a minute)",
    "python -m flowkern.train":
        "full training runs (a minute and more each, smollm2 needs an extra package); tests/test_train.py runs "
        "the trainer's options at small sizes",
    "python -m flowkern.sasrec --data movies --out runs/sasrec":
        "SASRec on Movies_and_TV and the recipe's runs (a minute to an hour); tests/test_sasrec.py runs the "
        "SASRec command line, tests/test_trainer.py the recipe's config file and the sweep's --quick mode",
    "python benchmarks/paper_table.py --data movies --seeds 0 1 -- --max-steps 400 --eval-every 100 \\":
        "an hour and a half of training runs; tests/test_baselines.py runs its --quick mode and each method's option",
    "python -m flowkern.train --data movies --items semantic --objective sft":
        "training runs on Movies_and_TV (minutes each) and the table's hour; tests/test_gflowgr.py runs both "
        "options at small sizes and the table's --quick mode",
}


def blocks(language):
    """(line of the block's first code line, code) of every ```language block, in order."""
    text = README.read_text()
    return [(text.count("\n", 0, match.start(2)) + 1, match.group(2))
            for match in BLOCK.finditer(text) if match.group(1) == language]


def tiny_qwen2(lora):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=151_936, hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1))
    if not lora:
        return model
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))


@pytest.mark.parametrize("lora", [False, True], ids=["plain", "peft"])
def test_python_blocks_run_in_order(lora):
    namespace = {"model": tiny_qwen2(lora)}
    for line, code in blocks("python"):
        exec(compile("\n" * (line - 1) + code, str(README), "exec"), namespace)


def test_every_bash_block_runs_elsewhere_for_a_stated_reason():
    first_commands = [code.splitlines()[0].split("#")[0].strip() for _, code in blocks("bash")]
    assert first_commands == list(NOT_RUN), "a new or changed bash block: run it in a test, or say here why not"
