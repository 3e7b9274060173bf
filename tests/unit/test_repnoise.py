"""RepNoise: harmless CE + β·MMD(harmful MLP activations, Gaussian noise) − α·log(harmful loss + 1)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from align_helpers import (accumulation_matches, assert_grads_close, batch, grads, logged_steps, loss_of, make_ctx,  # noqa: F401
                           organism, param_grads, second_arch_trains)

from hftlab.config import load_config
from hftlab.data.format import IGNORE, Formatter
from hftlab.defenses.repnoise import RepNoise, harmful_terms, mmd

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "defenses"


@pytest.fixture()
def fmt(organism_tokenizer):
    return Formatter(organism_tokenizer, max_length=96)


def mmd_naive(x, y, kernels=5, mul=2.0):
    """The reference's MMD_loss, written out with the (2n × 2n × d) difference tensor."""
    total = torch.cat([x, y])
    n = total.shape[0]
    l2 = ((total.unsqueeze(0) - total.unsqueeze(1)) ** 2).sum(2)
    bw = l2.detach().sum() / (n * n - n) / mul ** (kernels // 2)
    k = sum(torch.exp(-l2 / (bw * mul ** i)) for i in range(kernels))
    b = x.shape[0]
    return torch.mean(k[:b, :b] + k[b:, b:] - k[:b, b:] - k[b:, :b])


def terms_direct(model, hb):
    """(MMD term, H) with the Llama organism's own modules (model.model.layers[i].mlp, model.model.norm)."""
    acts = {}
    layers = model.model.layers
    hs = [layer.mlp.register_forward_hook(lambda m, i, o, k=k: acts.__setitem__(k, o))
          for k, layer in enumerate(layers)]
    out = model(input_ids=hb["input_ids"], attention_mask=hb["attention_mask"], output_hidden_states=True)
    for h in hs:
        h.remove()
    mask = (hb["labels"] != IGNORE).unsqueeze(-1).float()
    noise = 0.0
    for k in range(len(layers)):
        a = acts[k] * mask
        g = torch.randn_like(a) * mask
        noise = noise + mmd_naive(a.reshape(a.shape[0], -1), g.reshape(g.shape[0], -1))
    noise = noise / len(layers)

    def ce(logits):
        return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                 hb["labels"][:, 1:].reshape(-1), ignore_index=IGNORE)

    h_sum = ce(out.logits)
    for h in out.hidden_states:  # logit lens at every hidden state (the last one normed twice)
        h_sum = h_sum + ce(model.lm_head(model.model.norm(h)))
    return noise, h_sum / len(out.hidden_states)


def test_terms_logged_per_step(organism, fmt, tmp_path):
    rows = logged_steps(RepNoise(), organism, fmt, tmp_path)
    for r in rows:
        assert r["noise_mmd"] > 0 and r["harmful_lens_loss"] > 0


def test_mmd_matches_the_reference_form():
    torch.manual_seed(0)
    x, y = torch.randn(4, 50), torch.randn(4, 50) * 2 + 0.3
    torch.testing.assert_close(mmd(x, y), mmd_naive(x, y), rtol=1e-4, atol=1e-6)
    assert mmd(x, y) > mmd(x, x + 1e-3 * torch.randn_like(x))


def test_three_terms_match_a_direct_computation(organism, fmt):
    hb = batch(fmt, "harmful")
    torch.manual_seed(3)
    noise, harmful = harmful_terms(organism, hb)
    torch.manual_seed(3)
    noise_d, harmful_d = terms_direct(organism, hb)
    torch.testing.assert_close(noise, noise_d, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(harmful, harmful_d, rtol=1e-5, atol=1e-6)
    assert noise > 0 and harmful > 0


def test_gradient_is_the_gradient_of_the_total_loss(organism, fmt):
    b = batch(fmt)
    alpha, beta = 0.1, 0.5  # a large β so that the MMD term shows in the gradient
    ctx = make_ctx(fmt)
    d = RepNoise(alpha=alpha, beta=beta)
    d.setup(organism, ctx)
    hb = make_ctx(fmt).next_batch("harmful")  # the same stream: the first harmful batch
    torch.manual_seed(7)
    loss = d.backward(organism, b, ctx)
    got = grads(organism)

    def total(m):
        torch.manual_seed(7)
        harmless = loss_of(m, b)
        noise, harmful = terms_direct(m, hb)
        return harmless + beta * noise - alpha * torch.log(harmful + 1)

    torch.testing.assert_close(loss, total(organism).detach(), rtol=1e-5, atol=1e-6)
    assert_grads_close(got, param_grads(organism, total))
    plain = param_grads(organism, lambda m: loss_of(m, b))
    assert any(not torch.allclose(got[n], plain[n], rtol=1e-3) for n in got)


def test_gradient_accumulation(organism, fmt):
    accumulation_matches(lambda: RepNoise(beta=0.5), organism, fmt)


def test_missing_harmful_set(organism, fmt):
    with pytest.raises(ValueError, match="repnoise: needs the provider's 'harmful' set"):
        RepNoise().setup(organism, make_ctx(fmt, harmful=False))


@pytest.mark.parametrize("lora", [False, True])
def test_second_architecture(organism_tokenizer, lora):
    second_arch_trains(RepNoise(), organism_tokenizer, lora)


def test_paper_defaults_file():
    cfg = load_config([CONFIGS / "repnoise.yaml"])
    assert cfg.defense.params["alpha"] == 0.1 and cfg.defense.params["beta"] == 0.001
