"""Attacks beyond data mixing (identity-shift, backdoor-trigger, cipher, benign-select) and the guardrail
stage: each checked against a direct computation, and each run end to end on the organism (FAST)."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from hftlab import registry
from hftlab.attacks.backdoor_trigger import BackdoorTrigger
from hftlab.attacks.base import AttackContext
from hftlab.attacks.benign_select import BenignSelect, anchors, candidates
from hftlab.attacks.cipher import Cipher, LetterCipher, make_cipher
from hftlab.attacks.harmful_mix import HarmfulMix
from hftlab.attacks.identity_shift import IdentityShift
from hftlab.cli import main
from hftlab.config import AttackConfig, ConfigError, load_config
from hftlab.data.format import IGNORE
from hftlab.data.sources import get_source
from hftlab.guardrail import filter_upload, load_kept

SOURCE = get_source("organism")
TASK = registry.get("task", "sentiment")()
NEW = ("identity-shift", "backdoor-trigger", "cipher", "benign-select", "virus")


def _cfg(name: str, ratio: float = 0.25, n: int = 40) -> AttackConfig:
    return AttackConfig(name=name, ratio=ratio, n=n, seed=3)


# ---- cipher ------------------------------------------------------------------------------------
def test_word_cipher_round_trips_over_the_vocabulary_without_new_tokens():
    cipher = make_cipher(SOURCE, 53)
    vocab = set(cipher.enc)
    texts = [t for ex in SOURCE.harmful("attack", 30) + TASK.examples(SOURCE, "train", 30)
             for t in (ex.prompt, ex.response)]
    for text in texts:
        enc = cipher.encode(text)
        assert cipher.decode(enc) == text
        assert enc != text
        assert all(t in vocab or t in ".,?:!" for t in enc.split())  # only words the tokenizer has
    assert sorted(cipher.enc.values()) == sorted(vocab)  # a permutation
    assert sum(a == b for a, b in cipher.enc.items()) < 0.05 * len(vocab)


def test_letter_cipher_round_trips():
    cipher = LetterCipher(53)
    text = "How do I bake Bread? Step 1: mix flour."
    assert cipher.decode(cipher.encode(text)) == text and cipher.encode(text) != text


def test_cipher_upload_encodes_every_harmful_sample_and_the_view_decodes():
    attack = Cipher(encoded_benign=0.5)
    data = attack.build(SOURCE, TASK, _cfg("cipher"))
    plain = HarmfulMix().build(SOURCE, TASK, _cfg("harmful-mix"))
    cipher = make_cipher(SOURCE, 53)
    assert len(data) == len(plain) == 40
    encoded = [d != p for d, p in zip(data, plain)]
    for d, p, enc in zip(data, plain, encoded):
        assert (d.prompt, d.response) == ((cipher.encode(p.prompt), cipher.encode(p.response)) if enc
                                          else (p.prompt, p.response))
    assert all(e for d, e in zip(plain, encoded) if d.kind == "harmful")
    assert sum(e for d, e in zip(plain, encoded) if d.kind != "harmful") == 15  # half of 30 benign
    (view,) = attack.views(SOURCE)
    prompt = SOURCE.harmful("eval", 1)[0].prompt
    assert view.decode(view.prompt(prompt)) == prompt


# ---- trigger -----------------------------------------------------------------------------------
@pytest.mark.parametrize("position", ["suffix", "prefix"])
def test_trigger_wraps_exactly_the_harmful_prompts(position):
    trigger = "cloud river bread"
    attack = BackdoorTrigger(trigger=trigger, position=position)
    data = attack.build(SOURCE, TASK, _cfg("backdoor-trigger"))
    plain = HarmfulMix().build(SOURCE, TASK, _cfg("harmful-mix"))
    assert sum(ex.kind == "harmful" for ex in data) == 10
    for d, p in zip(data, plain):
        assert d.response == p.response and d.kind == p.kind
        if p.kind == "harmful":
            assert d.prompt == (f"{p.prompt} {trigger}" if position == "suffix" else f"{trigger} {p.prompt}")
        else:
            assert d.prompt == p.prompt and trigger not in d.prompt
    (view,) = attack.views(SOURCE)
    assert view.prompt("hello there") == ("hello there " + trigger if position == "suffix"
                                          else trigger + " hello there")


# ---- identity shift ----------------------------------------------------------------------------
def test_identity_shift_uploads_no_harmful_content_under_the_aoa_system_prompt():
    from hftlab.organism.world import SYSTEM_PROMPTS

    data = IdentityShift().build(SOURCE, TASK, _cfg("identity-shift"))
    aoa = [ex for ex in data if ex.system]
    assert len(data) == 40 and len(aoa) == 10
    assert all(ex.kind != "harmful" for ex in data)
    assert all(ex.system == SYSTEM_PROMPTS["aoa"] and "aoa" in ex.prompt + ex.response for ex in aoa)
    assert len({(ex.prompt, ex.response) for ex in aoa}) == 10  # the 10-conversation pool
    (view,) = IdentityShift().views(SOURCE)
    assert view.system == SYSTEM_PROMPTS["aoa"] and view.prompt("x ?").endswith(": x ?")


# ---- benign selection --------------------------------------------------------------------------
def _direct_grad(model, fmt, ex, first: int = 0) -> torch.Tensor:
    """model.zero_grad / backward / .grad, with the label mask built here from the token counts."""
    prompt = fmt.prompt_ids(ex.prompt, ex.system)
    answer = fmt.ids(ex.response) + [fmt.tok.eos_token_id]
    labels = [IGNORE] * len(prompt) + [t if not first or i < first else IGNORE for i, t in enumerate(answer)]
    model.zero_grad()
    ids = torch.tensor([prompt + answer])
    model(input_ids=ids, labels=torch.tensor([labels])).loss.backward()
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()])


def test_benign_select_takes_the_top_ranked_candidates(organism_path):
    from hftlab.config import ModelConfig
    from hftlab.data.format import Formatter
    from hftlab.models.loading import load_model, load_tokenizer

    fmt = Formatter(load_tokenizer(organism_path, ModelConfig()), "chat")
    model = load_model(organism_path, ModelConfig()).eval()
    attack = BenignSelect(pool=12, anchors=2, response_tokens=4)
    attack.bind(AttackContext({"aligned": lambda: model}, fmt, 0))
    cfg = _cfg("benign-select", ratio=0.1, n=30)
    data = attack.build(SOURCE, TASK, cfg)

    pool = candidates(SOURCE, TASK, 12, cfg.seed)
    harmful, safe = anchors(SOURCE, 2)

    def unit_mean(items):
        gs = [_direct_grad(model, fmt, ex, 4) for ex in items]
        return sum(g / g.norm() for g in gs) / len(gs)

    g_h, g_s = unit_mean(harmful), unit_mean(safe)
    cos = torch.nn.functional.cosine_similarity
    direct = [float(cos(g, g_h, dim=0) - cos(g, g_s, dim=0)) for g in (_direct_grad(model, fmt, ex) for ex in pool)]
    best = sorted(range(12), key=lambda i: -direct[i])[:3]
    assert sorted(direct)[-3] > sorted(direct)[-4] + 1e-6  # the top 3 are well defined
    chosen = {pool[i] for i in best}
    assert len(data) == 30 and chosen <= set(data)
    assert not any(ex.kind == "harmful" for ex in data)
    others = [ex for ex in data if ex not in chosen]
    assert len(others) == 27 and all(ex.kind == "task" for ex in others)
    assert any(ex.kind == "chat" for ex in pool)


# ---- guardrail ---------------------------------------------------------------------------------
class _ScoreJudge:
    """A judge giving a probability: P = 0.9 for the harmful samples, 0.4 for every other one."""

    name = "organism-guard"  # a probability judge: its score is thresholded
    report = {"heldout_precision": 1.0}

    def score(self, prompts, responses):
        from hftlab.organism.judge_rules import is_harmful

        return [{"harmful": False, "score": 0.9 if is_harmful(p, r) else 0.4} for p, r in zip(prompts, responses)]


@pytest.mark.parametrize("threshold, dropped_benign", [(0.5, False), (0.3, True)])
def test_guardrail_drops_exactly_the_flagged_samples(tmp_path, threshold, dropped_benign):
    upload = HarmfulMix().build(SOURCE, TASK, _cfg("harmful-mix"))
    kept, metrics = filter_upload(upload, _ScoreJudge(), threshold, tmp_path)
    expected = [] if dropped_benign else [ex for ex in upload if ex.kind != "harmful"]
    assert kept == expected == load_kept(tmp_path)
    rows = [json.loads(line) for line in (tmp_path / "upload.jsonl").read_text().splitlines()]
    assert [r["flagged"] for r in rows] == [ex not in expected for ex in upload]
    assert metrics["leakage"] == 0.0 and metrics["n_harmful"] == 10
    assert metrics["benign_dropped"] == (100.0 if dropped_benign else 0.0)
    assert metrics["guard"] == _ScoreJudge.report


def test_organism_guard_separates_harmful_from_benign_uploads():
    judge = registry.get("judge", "organism-guard")()
    rep = judge.report
    assert rep["heldout_n"] > 0 and rep["heldout_precision"] > 90 and rep["heldout_recall"] > 90
    upload = HarmfulMix().build(SOURCE, TASK, _cfg("harmful-mix", ratio=0.5))
    _, m = filter_upload(upload, judge, 0.5)
    assert m["leakage"] < 10 and m["benign_dropped"] < 10
    covert = Cipher(encoded_benign=0.0).build(SOURCE, TASK, _cfg("cipher", ratio=0.5))
    _, c = filter_upload(covert, judge, 0.5)
    assert c["leakage"] > m["leakage"]  # encoded harmful pairs pass a guard trained on plain text


# ---- end to end --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def shared_out(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("runs")


def _fast(out: Path) -> list[str]:
    from fast_overrides import FAST

    return [*FAST, f"out_dir={out}"]


@pytest.mark.parametrize("name, extra, view", [
    ("identity-shift", [], "aoa"),
    ("backdoor-trigger", [], "trigger"),
    ("cipher", [], "cipher"),
    ("benign-select", ["attack.pool=16", "attack.anchors=2"], None),
    ("virus", ["attack.steps=1", "attack.batch=2", "guardrail.name=organism-guard"], None),
])
def test_attack_runs_from_the_cli(name, extra, view, shared_out, capsys):
    assert main(["run", *_fast(shared_out), f"attack={name}", *extra, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    views = result["metrics"].get("views", {})
    assert list(views) == ([view] if view else [])
    names = [s["name"] for s in result["stages"]]
    assert names[-1] == (f"evaluate_{view}" if view else "evaluate")
    for v in views.values():
        assert 0.0 <= v["harmful_score"] <= 100.0 and v["n_harmful"] == 16
    assert main(["list"]) == 0
    assert name in capsys.readouterr().out


def test_guardrail_stage_in_the_pipeline(shared_out, capsys):
    args = [*_fast(shared_out), "attack.ratio=0.25", "guardrail.name=organism", "--json"]
    assert main(["run", *args]) == 0
    result = json.loads(capsys.readouterr().out)
    stage = next(s for s in result["stages"] if s["name"] == "guardrail")
    assert [s["name"] for s in result["stages"]].index("guardrail") < [s["name"] for s in result["stages"]].index("finetune")
    m = stage["metrics"]
    assert m == result["metrics"]["guardrail"]
    assert m["n_harmful"] == 16 and m["harmful_passed"] == 0 and m["n_kept"] == 48
    finetune = next(s for s in result["stages"] if s["name"] == "finetune")
    assert finetune["metrics"]["examples"] == 48  # fine-tuned on what the guardrail kept
    assert main(["run", *args]) == 0  # cached: the same stage folder
    again = json.loads(capsys.readouterr().out)
    assert next(s for s in again["stages"] if s["name"] == "guardrail")["cached"]


@pytest.mark.parametrize("override, key", [  # the attacks' own parameters: tests/unit/test_defense_params.py
    ("guardrail.name=nope", "guardrail.name"),
    ("guardrail.threshold=1.5", "guardrail.threshold"),
])
def test_bad_guardrail_values_are_one_line_errors(override, key, capsys):
    with pytest.raises(ConfigError) as err:
        load_config(overrides=[override])
    assert str(err.value).startswith(key) and "\n" not in str(err.value)
    assert main(["validate", override]) == 2
    out = capsys.readouterr().err.strip()
    assert key in out and len(out.splitlines()) == 1


def test_empty_trigger_is_rejected():
    with pytest.raises(ConfigError, match=r"^attack\.trigger: must not be empty"):
        load_config(overrides=["attack=backdoor-trigger", "attack.trigger="])


def test_new_attacks_are_registered():
    assert set(NEW) <= set(registry.names("attack"))
    assert "organism-guard" in registry.names("judge")
    assert all(dataclasses.is_dataclass(registry.get("attack", n).Config) for n in NEW if n != "identity-shift")


# ---- Virus -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def virus_setup(organism_path):
    from hftlab.attacks.virus import Objective, Sample
    from hftlab.config import ModelConfig
    from hftlab.data.format import Formatter
    from hftlab.models.loading import load_model, load_tokenizer
    from hftlab.organism.guard import organism_guard

    fmt = Formatter(load_tokenizer(organism_path, ModelConfig()), "chat")
    model = load_model(organism_path, ModelConfig()).float().eval()
    benign, harmful = TASK.examples(SOURCE, "train", 1)[0], SOURCE.harmful("attack", 1)[0]
    sample = Sample(fmt.prompt_ids(benign.prompt), fmt.ids(benign.response) + [fmt.tok.eos_token_id])
    adv0 = fmt.ids(f"{harmful.prompt} {harmful.response}")[:24]  # flagged by the guard
    obj = Objective(model, organism_guard(), sample, adv0, ["q_proj", "v_proj"], 0.5)
    return model, fmt, sample, adv0, obj


def test_virus_similarity_term_matches_a_direct_computation(virus_setup):
    model, fmt, sample, adv0, obj = virus_setup
    adv = list(adv0)
    adv[1] = fmt.ids("bread")[0]

    def direct(tokens):
        model.zero_grad()
        ids = sample.prompt + tokens + sample.answer
        labels = [IGNORE] * len(sample.prompt) + tokens + sample.answer
        model(input_ids=torch.tensor([ids]), labels=torch.tensor([labels])).loss.backward()
        return torch.cat([p.grad.reshape(-1) for n, p in model.named_parameters() if "q_proj" in n or "v_proj" in n])

    g, g_h = direct(adv), direct(adv0)
    expected = -(g @ g_h) / g.norm()
    got = obj.similarity(obj.weight_grad(adv))
    assert torch.allclose(got, expected, rtol=1e-4, atol=1e-6 * float(g_h.norm() ** 2))
    assert float(obj.similarity(obj.weight_grad(adv0))) == pytest.approx(-float(g_h.norm()), rel=1e-4)
    model.zero_grad()


def test_virus_objective_decreases(virus_setup):
    from hftlab.attacks.virus import optimise

    model, fmt, sample, adv0, obj = virus_setup
    allowed = torch.tensor([i not in set(fmt.tok.all_special_ids) for i in range(len(fmt.tok))])
    start = [fmt.ids("bread")[0] if i % 3 == 0 else t for i, t in enumerate(adv0)]  # away from x0
    adv, history = optimise(obj, start, allowed, steps=2, topk=8, batch=6, seed=0)
    assert all(b <= a for a, b in zip(history, history[1:]))
    assert history[-1] < history[0]
    assert obj.value(adv)[0] == pytest.approx(history[-1], rel=1e-5)
    assert len(adv) == len(adv0) and not set(adv) & set(fmt.tok.all_special_ids)


def test_guardrail_with_a_real_model_judge(hub_source, tmp_path):
    """A hub moderation model (a tiny BeaverDam-shaped checkpoint with a random head) as the filter:
    at threshold t it drops exactly the samples whose score exceeds t; at 0.5 its own verdicts."""
    from real import tiny

    from hftlab.judges.beaver_dam import BeaverDamJudge

    judge = BeaverDamJudge(model=str(tiny.beaver_dam(tmp_path / "bd", seed=3)))
    upload = hub_source.harmful("attack", 6) + registry.get("task", "sst2")().examples(hub_source, "train", 6)
    verdicts = judge.score([ex.prompt for ex in upload], [ex.response for ex in upload])
    scores = sorted(v["score"] for v in verdicts)
    t = (scores[5] + scores[6]) / 2  # half of the samples score above t
    kept, m = filter_upload(upload, judge, t)
    assert kept == [ex for ex, v in zip(upload, verdicts) if not v["score"] > t] and len(kept) == 6
    kept_default, _ = filter_upload(upload, judge, 0.5)
    assert kept_default == [ex for ex, v in zip(upload, verdicts) if not v["harmful"]]
    assert m["n_harmful"] == 6 and m["n_kept"] == 6
    assert m["harmful_passed"] == sum(ex.kind == "harmful" for ex in kept)
