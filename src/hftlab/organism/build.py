"""Build (once) and cache the organism's tokenizer and base model.

The base model is a small ``LlamaForCausalLM`` pretrained on the world's corpus, which includes harmful
requests with compliant answers (as a pretrained LM holds harmful knowledge) and the formats of every
task. Alignment is NOT done here: the pipeline's align stage teaches refusal, as in the papers.
Everything is deterministic from ``ORGANISM["seed"]`` and cached under ``$HFTLAB_HOME/organism/<hash>``.
"""
from __future__ import annotations

import logging
import os
import random
import time
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from ..artifacts import content_hash, is_complete, stage_lock, write_manifest
from .world import World

log = logging.getLogger(__name__)

SPECIAL = ["<pad>", "<unk>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>"]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} "
    "{% if m['role'] == 'assistant' %}{{ eos_token }} {% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)

# Sizes and pretraining budget of the organism (part of its cache key).
ORGANISM: dict[str, Any] = {
    "seed": 0,
    "hidden": 128,
    "layers": 4,
    "heads": 4,
    "intermediate": 384,
    "max_positions": 160,
    "pretrain_examples": 30000,
    "pretrain_steps": 2500,
    "batch_size": 32,
    "lr": 3e-3,
    "version": 3,
}


def home() -> Path:
    return Path(os.environ.get("HFTLAB_HOME", Path.home() / ".cache" / "hftlab"))


def organism_dir(spec: dict[str, Any] | None = None) -> Path:
    spec = spec or ORGANISM
    return home() / "organism" / content_hash(spec, _world_fingerprint(spec["seed"], spec["pretrain_examples"]))


@lru_cache(maxsize=4)  # a sweep worker asks once per cell; building a World takes ~0.5 s
def _world_fingerprint(seed: int, pretrain_examples: int) -> str:
    """Hash of everything the build reads from the world: the tokenizer's corpus and the pretraining
    examples (a world edit anywhere is a new organism; ~0.1 s on top of building the World)."""
    world = World(seed)
    corpus = [(e.prompt, e.response, e.system) for e in world.pretraining(pretrain_examples)]
    return content_hash(world.vocabulary_corpus(), corpus, length=16)


def build_tokenizer(world: World) -> Any:
    """Word-level tokenizer over the world's vocabulary, with a chat template; no cleanup on decode."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    trainer = trainers.WordLevelTrainer(special_tokens=SPECIAL, min_frequency=1, show_progress=False)
    tok.train_from_iterator(world.vocabulary_corpus(), trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
        additional_special_tokens=SPECIAL[4:], clean_up_tokenization_spaces=False,
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.padding_side = "left"
    return fast


def new_model(vocab_size: int, spec: dict[str, Any], tokenizer: Any) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=spec["hidden"], intermediate_size=spec["intermediate"],
        num_hidden_layers=spec["layers"], num_attention_heads=spec["heads"],
        num_key_value_heads=spec["heads"], max_position_embeddings=spec["max_positions"],
        tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, attn_implementation="sdpa",
    )
    torch.manual_seed(spec["seed"])
    return LlamaForCausalLM(config)


# The organism shipped with the package: the build of ``ORGANISM`` on the current world, so that every
# user compares methods on the same draw and nobody waits for a build. ``BUILD`` holds its cache key.
PINNED = Path(__file__).resolve().parent / "pinned"
PINNED_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                "tokenizer_config.json", "chat_template.jinja", "manifest.json")  # the manifest last


def pinned_build() -> str:
    """The cache key the shipped organism was built for ("" if none is shipped)."""
    f = PINNED / "BUILD"
    return f.read_text().strip() if f.is_file() else ""


def ensure_organism(spec: dict[str, Any] | None = None) -> Path:
    """Path of the cached base organism (tokenizer + model): the shipped build when it is the build of
    this spec and world (seconds), else built on first use (minutes)."""
    spec = spec or ORGANISM
    folder = organism_dir(spec)
    if is_complete(folder):
        return folder
    with stage_lock(folder):  # one builder at a time; the others wait, then reuse it
        if not is_complete(folder):
            if pinned_build() == folder.name:
                _install_pinned(folder)
            else:
                if pinned_build():
                    log.warning("the shipped organism is build %s, this spec and world make %s: building it",
                                pinned_build(), folder.name)
                _build(spec, folder)
    return folder


def _install_pinned(folder: Path) -> None:
    """Copy the shipped organism into the cache folder, its manifest last (a half copy is never complete)."""
    import shutil

    folder.mkdir(parents=True, exist_ok=True)
    for name in PINNED_FILES:
        shutil.copyfile(PINNED / name, folder / name)
    log.info("organism: the shipped build %s in %s", folder.name, folder)


def rebuild(out: Path, spec: dict[str, Any] | None = None) -> Path:
    """Build the organism from the world into ``out`` (never the shipped copy): to check or re-pin it."""
    spec = spec or ORGANISM
    if is_complete(out):
        raise FileExistsError(f"{out} already holds an organism; give an empty folder")
    _build(spec, out)
    return out


def pin(source: Path) -> Path:
    """Make the build in ``source`` the shipped organism (for maintainers after a world or spec change)."""
    import shutil

    key = organism_dir().name
    PINNED.mkdir(exist_ok=True)
    for name in PINNED_FILES:
        shutil.copyfile(source / name, PINNED / name)
    (PINNED / "BUILD").write_text(key + "\n")
    return PINNED


def _build(spec: dict[str, Any], folder: Path) -> None:
    """Pretrain on ONE torch thread, whatever the caller set: the thread count changes the order of
    floating-point sums, and with it the draw (a 2-thread build is a different organism)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _pretrain(spec, folder)
    finally:
        torch.set_num_threads(threads)


def _pretrain(spec: dict[str, Any], folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    log.info("building the organism in %s (once, about 8 min on one CPU core)", folder)
    start = time.time()
    world = World(spec["seed"])
    tokenizer = build_tokenizer(world)
    model = new_model(len(tokenizer), spec, tokenizer)
    corpus = world.pretraining(spec["pretrain_examples"])
    random.Random(spec["seed"]).shuffle(corpus)
    from ..config import TrainConfig
    from ..data.format import Formatter
    from ..training.loop import train

    fmt = Formatter(tokenizer, max_length=spec["max_positions"])
    features = [fmt.encode(ex, train_on_prompt=True) for ex in corpus]
    tcfg = TrainConfig(lr=spec["lr"], max_steps=spec["pretrain_steps"], batch_size=spec["batch_size"],
                       schedule="cosine", warmup_ratio=0.05, lora=False, max_length=spec["max_positions"])
    losses = train(model, features, tcfg, seed=spec["seed"], desc="pretrain organism").losses
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    write_manifest(folder, stage="organism", spec=spec, seconds=time.time() - start,
                   final_loss=losses[-1] if losses else None,
                   parameters=sum(p.numel() for p in model.parameters()))
    log.info("organism built in %.0fs (final loss %.3f)", time.time() - start, losses[-1])
