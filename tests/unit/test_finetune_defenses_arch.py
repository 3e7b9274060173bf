"""The fine-tuning-stage training methods (Lisa, LDIFS, Constrained SFT, Freeze) on a second architecture
(a random GPT-2: Conv1D projections, fused c_attn, tuple outputs), with LoRA and full fine-tuning,
through the loop with gradient accumulation."""
from __future__ import annotations

import pytest
import torch
from align_helpers import tiny_gpt2
from finetune_helpers import make_ctx, second_arch_run

from hftlab.data.format import Formatter
from hftlab.defenses.constrained_sft import ConstrainedSFT
from hftlab.defenses.freeze import Freeze
from hftlab.defenses.ldifs import LDIFS
from hftlab.defenses.lisa import ALIGN, FINETUNE, Lisa
from hftlab.models.introspect import layer_index_of

MAKERS = {
    "lisa": lambda: Lisa(schedule="steps", alignment_step=1, finetune_step=1, proximal_after=0.0),
    "ldifs": lambda: LDIFS(lam=1e-2),
    "constrained-sft": ConstrainedSFT,
    "freeze": lambda: Freeze(layers="1"),
}


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
@pytest.mark.parametrize("name", list(MAKERS))
def test_second_architecture(name, lora, organism_tokenizer):
    defense = MAKERS[name]()
    before, model = second_arch_run(defense, organism_tokenizer, lora, steps=3)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    changed = {n for n, p in model.named_parameters() if not torch.equal(before[n], p)}
    assert changed and changed <= trainable
    if lora:
        assert all("lora_" in n for n in changed)
    if name == "freeze":
        owner = layer_index_of(model)
        layer1 = {n for n in before if owner.get(n) == 1}
        assert layer1 and not changed & layer1, "GPT-2 block 1 must stay bit-identical"
        assert any(owner.get(n) == 0 for n in changed)
    if name == "lisa":
        assert [s for s, _ in defense.history] == [ALIGN, FINETUNE, ALIGN]


def test_probe_runs_on_gpt2(organism_tokenizer):
    model = tiny_gpt2(len(organism_tokenizer), organism_tokenizer.pad_token_id)
    ctx = make_ctx(Formatter(organism_tokenizer, max_length=64))
    layers = Freeze(pairs=20, prompts=8).find_layers(model, ctx)
    assert len(ctx.state["safety_probe"]["nn"]) == 2 and all(0 <= i < 2 for i in layers)
