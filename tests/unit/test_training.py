"""The training loop: gradient accumulation, clipping, schedules, LoRA trains only the adapter."""
from __future__ import annotations

import torch

from hftlab.config import ModelConfig, TrainConfig
from hftlab.data.format import IGNORE, Formatter
from hftlab.data.sources import get_source
from hftlab.models.loading import add_lora, load_model
from hftlab.training.loop import total_steps, train


def _same_length_examples(fmt: Formatter, k: int = 4):
    feats = {}
    for ex in get_source("organism").task("sentiment", "train", 400):
        f = fmt.encode(ex)
        feats.setdefault((len(f["input_ids"]), sum(l != IGNORE for l in f["labels"])), []).append(f)
    return next(v[:k] for v in feats.values() if len(v) >= k)


def test_grad_accumulation_matches_big_batch(organism_path, organism_tokenizer):
    fmt = Formatter(organism_tokenizer)
    feats = _same_length_examples(fmt)
    results = []
    for bs, ga in ((4, 1), (1, 4)):
        model = load_model(organism_path, ModelConfig())
        cfg = TrainConfig(lr=0.1, optimizer="sgd", max_steps=1, batch_size=bs, grad_accum=ga, max_grad_norm=0)
        train(model, feats, cfg, seed=0, pad_id=organism_tokenizer.pad_token_id)
        results.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    base = torch.cat([p.detach().flatten() for p in load_model(organism_path, ModelConfig()).parameters()])
    moved = (results[0] - base).norm()
    assert moved > 1e-3
    assert (results[0] - results[1]).norm() / moved < 1e-4


def test_lora_trains_only_adapter(organism_path, organism_tokenizer):
    fmt = Formatter(organism_tokenizer)
    model = add_lora(load_model(organism_path, ModelConfig()), TrainConfig(lora=True, lora_r=4))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    feats = fmt.encode_all(get_source("organism").task("sentiment", "train", 16))
    train(model, feats, TrainConfig(lr=1e-2, max_steps=3, batch_size=4), pad_id=organism_tokenizer.pad_token_id)
    for n, p in model.named_parameters():
        if "lora_" not in n:
            assert torch.equal(before[n], p), f"{n} is not an adapter weight but changed"
    assert any("lora_B" in n and not torch.equal(before[n], p) for n, p in model.named_parameters())


def test_total_steps():
    assert total_steps(1000, TrainConfig(epochs=2, batch_size=10, grad_accum=1)) == 200
    assert total_steps(1000, TrainConfig(epochs=1, batch_size=10, grad_accum=4)) == 25
    assert total_steps(1000, TrainConfig(max_steps=7)) == 7


def test_loss_log_written(tmp_path, organism_path, organism_tokenizer):
    fmt = Formatter(organism_tokenizer)
    model = load_model(organism_path, ModelConfig())
    feats = fmt.encode_all(get_source("organism").task("sentiment", "train", 16))
    log = tmp_path / "losses.jsonl"
    res = train(model, feats, TrainConfig(lr=1e-3, max_steps=3, batch_size=4, schedule="cosine",
                                          warmup_ratio=0.34), log_path=log, pad_id=organism_tokenizer.pad_token_id)
    lines = log.read_text().splitlines()
    assert len(lines) == 3 and len(res.losses) == 3


def test_length_groups_give_the_padded_batch_loss_and_gradient(organism_path, organism_tokenizer):
    """lm_loss runs a batch of very unequal rows as length groups: same loss and gradient, less padding."""
    from hftlab.data.format import collate
    from hftlab.defenses.base import length_groups, lm_loss

    fmt = Formatter(organism_tokenizer)
    src = get_source("organism")
    feats = fmt.encode_all(src.task("sentiment", "train", 7) + src.harmful("attack", 1))
    batch = collate(feats, organism_tokenizer.pad_token_id)
    groups = length_groups(batch["attention_mask"])
    assert groups and len(groups) >= 2 and sum(len(rows) for rows, _ in groups) == 8
    assert max(w for _, w in groups) == batch["input_ids"].shape[1] and min(w for _, w in groups) < 0.7 * max(
        w for _, w in groups)
    model = load_model(organism_path, ModelConfig())
    got = []
    for by_length in (False, True):
        model.zero_grad()
        loss = lm_loss(model, batch, by_length=by_length)
        loss.backward()
        got.append((loss.detach(), torch.cat([p.grad.flatten() for p in model.parameters()])))
    torch.testing.assert_close(got[0][0], got[1][0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[0][1], got[1][1], rtol=1e-4, atol=1e-6)
    # rows of equal length, or a left-padded (generation) batch, stay one forward
    assert length_groups(torch.ones(4, 9, dtype=torch.long)) is None
    assert length_groups(torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])) is None


def test_low_precision_full_weights_warn(organism_path, organism_tokenizer, caplog):
    """bf16 full fine-tuning loses most small AdamW updates: the loop says so; LoRA adapters are fp32."""
    fmt = Formatter(organism_tokenizer)
    feats = fmt.encode_all(get_source("organism").task("sentiment", "train", 8))
    cfg = TrainConfig(lr=1e-5, max_steps=1, batch_size=4)
    with caplog.at_level("WARNING", logger="hftlab.training.loop"):
        train(load_model(organism_path, ModelConfig(dtype="bfloat16")), feats, cfg, desc="full-bf16",
              pad_id=organism_tokenizer.pad_token_id)
        lora = add_lora(load_model(organism_path, ModelConfig(dtype="bfloat16")), TrainConfig(lora=True, lora_r=4))
        train(lora, feats, cfg, desc="lora-bf16", pad_id=organism_tokenizer.pad_token_id)
        train(load_model(organism_path, ModelConfig()), feats, cfg, desc="full-fp32",
              pad_id=organism_tokenizer.pad_token_id)
    warned = [r.getMessage() for r in caplog.records if "rounding step" in r.getMessage()]
    assert len(warned) == 1 and warned[0].startswith("full-bf16: bfloat16 trainable weights")
