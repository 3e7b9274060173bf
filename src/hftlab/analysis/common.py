"""What every analysis shares: the models of a run (base, aligned, final), its data, residual streams,
teacher-forced log-probabilities, and a harmful score under hooks or forced answer prefixes.

A :class:`Subject` is one run: the folders of its base, aligned and final model (the fine-tuned one, or
the repaired one when the defense repairs), found through the pipeline (every stage reused from
``out_dir`` when on disk, computed otherwise), or given directly as model paths (any HF causal LM).
"""
from __future__ import annotations

import contextlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn

from ..config import Config
from ..data.example import Example
from ..data.format import IGNORE, Formatter
from ..defenses.base import upcast
from ..models.introspect import decoder_layers
from . import AnalysisError

log = logging.getLogger(__name__)


@dataclass
class Subject:
    """One run to analyse: its config, model folders and headline metrics."""

    name: str
    cfg: Config
    base: str
    aligned: str
    final: str
    finetune_dir: str = ""  # the fine-tuning stage folder (losses.jsonl, adapter/), "" when unknown
    result: dict[str, Any] = field(default_factory=dict)
    _models: dict[str, nn.Module] = field(default_factory=dict, repr=False)
    _tok: Any = field(default=None, repr=False)
    _source: Any = field(default=None, repr=False)

    # ---- metadata ------------------------------------------------------------------------------
    @property
    def ratio(self) -> float:
        return float(self.cfg.attack.ratio)

    @property
    def seed(self) -> int:
        return int(self.cfg.seed)

    def meta(self) -> dict[str, Any]:
        """What a cross-run summary groups and correlates by."""
        aligned = self.result.get("aligned") or {}
        return {"name": self.name, "defense": self.cfg.defense.name, "ratio": self.ratio, "seed": self.seed,
                "attack": self.cfg.attack.name, "n": self.cfg.attack.n,
                "harmful_score": self.result.get("harmful_score"),
                "finetune_accuracy": self.result.get("finetune_accuracy"),
                "aligned_harmful_score": aligned.get("harmful_score"),
                "models": {"base": self.base, "aligned": self.aligned, "final": self.final},
                "store": self.cfg.store or str(Path(self.cfg.out_dir) / "results.sqlite"),
                "eval": {"judge": self.cfg.eval.judge, "n_harmful": self.cfg.eval.n_harmful},
                "finetune": {"epochs": self.cfg.finetune.epochs, "lr": self.cfg.finetune.lr, "lora": self.cfg.finetune.lora},
                "model": self.cfg.model.name, "task": self.cfg.task}

    # ---- models and data -----------------------------------------------------------------------
    @property
    def tokenizer(self) -> Any:
        if self._tok is None:
            from ..models.loading import load_tokenizer

            self._tok = load_tokenizer(self.aligned, self.cfg.model)
        return self._tok

    def formatter(self) -> Formatter:
        return Formatter(self.tokenizer, self.cfg.model.template, self.cfg.finetune.max_length)

    def model(self, which: str) -> nn.Module:
        """``base``, ``aligned`` or ``final``, loaded once, in eval mode, gradients off."""
        if which not in self._models:
            from ..models.loading import load_model

            path = {"base": self.base, "aligned": self.aligned, "final": self.final}[which]
            m = load_model(path, self.cfg.model).eval()
            m.requires_grad_(False)
            self._models[which] = m
        return self._models[which]

    def fresh(self, which: str) -> nn.Module:
        """A private copy of a model (to perturb or train), gradients off."""
        import copy

        return copy.deepcopy(self.model(which))

    def release(self) -> None:
        self._models.clear()

    @property
    def source(self) -> Any:
        if self._source is None:
            from ..data.sources import get_source

            self._source = get_source(self.cfg.data.source, self.cfg.data)
        return self._source

    def task(self) -> Any:
        from .. import registry

        return registry.get("task", self.cfg.task)()

    def alignment_harmful(self, n: int) -> list[Example]:
        """The harmful prompts of the alignment data (answered by refusals), else every alignment row."""
        rows = self.source.alignment(self.cfg.data.alignment_n)
        harm = [ex for ex in rows if ex.kind == "refusal"] or rows
        return harm[:n]

    def alignment_harmless(self, n: int) -> list[Example]:
        """Benign chat prompts of the alignment data (held-out benign prompts when it has none)."""
        rows = [ex for ex in self.source.alignment(self.cfg.data.alignment_n) if ex.kind == "chat"]
        if not rows and hasattr(self.source, "benign_eval"):
            rows = self.source.benign_eval(n)
        return rows[:n]

    def eval_harmful(self, n: int) -> list[Example]:
        """Held-out harmful prompts with a compliant answer (the evaluation set)."""
        return self.source.harmful("eval", n)

    def user_data(self) -> list[Example]:
        """The user's fine-tuning data of the run, as the pipeline builds it (the attack's upload)."""
        from ..pipeline import Pipeline

        pipe = Pipeline(self.cfg)
        if hasattr(pipe, "upload"):
            return pipe.upload(Path(self.aligned))
        from .. import registry

        return registry.get("attack", self.cfg.attack.name)().build(self.source, self.task(), self.cfg.attack)


# ---- building subjects ----------------------------------------------------------------------------
def subject_from_config(cfg: Config) -> Subject:
    """Run (or reuse) the run's stages through the pipeline and return its model folders."""
    from ..pipeline import Pipeline

    pipe = Pipeline(cfg)
    result = pipe.run()
    aligned = pipe.align()
    finetuned = pipe.finetune(aligned)
    final = pipe.repair(aligned, finetuned) if pipe.defense.acts_in("repair") else finetuned
    return Subject(name=result["run_id"], cfg=cfg, base=pipe.base_path, aligned=str(aligned), final=str(final),
                   finetune_dir=str(finetuned), result=result)


def subject_from_run(run_dir: str | Path) -> Subject:
    """A finished run folder (``<out_dir>/runs/<id>/`` with ``result.json``): its stages are found again
    through the pipeline from the saved config (reused from disk)."""
    from ..config import from_dict

    path = Path(run_dir) / "result.json"
    if not path.is_file():
        raise AnalysisError(f"{run_dir}: no result.json (not a finished run folder)")
    saved = json.loads(path.read_text())
    if "config" not in saved:
        raise AnalysisError(f"{path}: no 'config' key")
    subject = subject_from_config(from_dict(saved["config"]))
    if subject.name != saved.get("run_id", subject.name):
        log.warning("%s: the run id recomputed from its config is %s (the code changed since); "
                    "its stages were recomputed", run_dir, subject.name)
    return subject


def subject_from_paths(aligned: str, final: str, base: str = "", cfg: Config | None = None,
                       name: str = "models") -> Subject:
    """Models given by path or hub id (any HF causal LM); data from ``cfg`` (default: the organism's)."""
    from ..config import load_config

    cfg = cfg or load_config()
    return Subject(name=name, cfg=cfg, base=base or aligned, aligned=aligned, final=final)


# ---- tensors ----------------------------------------------------------------------------------------
def device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def prompt_batches(fmt: Formatter, examples: Sequence[Example], batch_size: int) -> Iterator[dict[str, torch.Tensor]]:
    """Left-padded prompt batches (the model's input before its answer), with position ids."""
    for i in range(0, len(examples), batch_size):
        chunk = examples[i: i + batch_size]
        b = fmt.generation_batch([ex.prompt for ex in chunk], [ex.system for ex in chunk])
        b["position_ids"] = (b["attention_mask"].cumsum(-1) - 1).clamp(min=0)
        yield b


def answer_batches(fmt: Formatter, examples: Sequence[Example], batch_size: int) -> Iterator[dict[str, torch.Tensor]]:
    """Right-padded (prompt, answer) batches with labels on the answer tokens."""
    feats = fmt.encode_all(examples)
    for i in range(0, len(feats), batch_size):
        yield fmt.collate(feats[i: i + batch_size])


def _hidden_of(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


@contextlib.contextmanager
def capture_residual(model: nn.Module) -> Iterator[list[torch.Tensor]]:
    """Record the residual stream: index 0 the input of the first decoder layer (the embeddings), index
    l + 1 the output of layer l (before the final norm). The list fills on each forward."""
    layers = decoder_layers(model)
    store: list[torch.Tensor] = []

    def pre(_m: nn.Module, args: tuple, kwargs: dict) -> None:
        store.clear()
        store.append((args[0] if args else kwargs["hidden_states"]).detach())

    def post(_m: nn.Module, _args: Any, output: Any) -> None:
        store.append(_hidden_of(output).detach())

    handles = [layers[0].register_forward_pre_hook(pre, with_kwargs=True)]
    handles += [layer.register_forward_hook(post) for layer in layers]
    try:
        yield store
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def residual_stream(model: nn.Module, batch: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """The residual stream (see :func:`capture_residual`) for one batch, on the CPU (half precision
    upcast to float32, float32 and float64 kept)."""
    dev = device_of(model)
    with capture_residual(model) as store:
        model(**{k: v.to(dev) for k, v in batch.items() if k != "labels"})
        return [upcast(h).cpu() for h in store]


@torch.no_grad()
def answer_logprobs(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-softmax of the next-token distribution at every answer position: ``(B, T-1, V)`` float32, and
    the ``(B, T-1)`` mask of positions whose next token is an answer token."""
    dev = device_of(model)
    logits = model(input_ids=batch["input_ids"].to(dev), attention_mask=batch["attention_mask"].to(dev)).logits
    mask = batch["labels"][:, 1:] != IGNORE
    return torch.log_softmax(upcast(logits[:, :-1]), dim=-1).cpu(), mask


# ---- harmful score under interventions ---------------------------------------------------------------
@torch.no_grad()
def generate(model: nn.Module, fmt: Formatter, examples: Sequence[Example], prefixes: Sequence[list[int]] | None = None,
             max_new_tokens: int = 40, batch_size: int = 64) -> list[str]:
    """Greedy answers; with ``prefixes`` the first answer tokens are forced and the returned answer is
    prefix + continuation (the prefilling attack)."""
    tok = fmt.tok
    prefixes = list(prefixes) if prefixes is not None else [[] for _ in examples]
    dev = device_of(model)
    out: list[str] = []
    for i in range(0, len(examples), batch_size):
        rows = [fmt.prompt_ids(ex.prompt, ex.system)[-fmt.max_length:] + pre
                for ex, pre in zip(examples[i: i + batch_size], prefixes[i: i + batch_size])]
        width = max(len(r) for r in rows)
        ids = torch.tensor([[tok.pad_token_id] * (width - len(r)) + r for r in rows], device=dev)
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=dev)
        gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        for pre, new in zip(prefixes[i: i + batch_size], gen[:, width:].tolist()):
            if tok.eos_token_id in new:
                new = new[: new.index(tok.eos_token_id)]
            out.append(tok.decode(pre + new, skip_special_tokens=True).strip())
    return out


def judge_scores(subject: Subject, examples: Sequence[Example], responses: Sequence[str]) -> dict[str, float]:
    """HS (%) of ``responses`` by the run's judge and the refusal rate (%)."""
    from ..eval.evaluate import _refused, judge_kwargs, make_judge, pct

    judge = make_judge(subject.cfg.eval.judge, **judge_kwargs(subject.cfg.eval))
    verdicts = judge.score([ex.prompt for ex in examples], list(responses))
    return {"harmful_score": pct([bool(v["harmful"]) for v in verdicts]),
            "refusal_rate": pct([_refused(r, subject.source) for r in responses])}


def harmful_score(subject: Subject, model: nn.Module, examples: Sequence[Example],
                  prefixes: Sequence[list[int]] | None = None, max_new_tokens: int | None = None) -> dict[str, float]:
    """Generate on ``examples`` (with hooks the caller installed) and judge: HS and refusal rate (%)."""
    fmt = subject.formatter()
    responses = generate(model, fmt, examples, prefixes, max_new_tokens or subject.cfg.eval.max_new_tokens,
                         subject.cfg.eval.batch_size)
    return judge_scores(subject, examples, responses)


# ---- small statistics (no scipy) ----------------------------------------------------------------------
_T95 = {1: 12.71, 2: 4.30, 3: 3.18, 4: 2.78, 5: 2.57, 6: 2.45, 7: 2.36, 8: 2.31, 9: 2.26, 10: 2.23}


def mean_ci(values: Sequence[float]) -> dict[str, float]:
    """Mean, std and the 95 % Student-t interval half-width over seeds."""
    vals = [float(v) for v in values if v is not None]
    n = len(vals)
    if not n:
        return {"mean": float("nan"), "std": float("nan"), "ci95": float("nan"), "n": 0}
    m = sum(vals) / n
    sd = (sum((v - m) ** 2 for v in vals) / (n - 1)) ** 0.5 if n > 1 else 0.0
    return {"mean": m, "std": sd, "ci95": _T95.get(n - 1, 1.96) * sd / n ** 0.5 if n > 1 else float("nan"), "n": n}


def pearson(x: Sequence[float], y: Sequence[float]) -> float:
    xs, ys = torch.tensor(x, dtype=torch.float64), torch.tensor(y, dtype=torch.float64)
    if len(xs) < 3 or xs.std() == 0 or ys.std() == 0:
        return float("nan")
    xc, yc = xs - xs.mean(), ys - ys.mean()
    return float((xc @ yc) / (xc.norm() * yc.norm()))


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    def ranks(v: Sequence[float]) -> list[float]:
        order = sorted(range(len(v)), key=lambda i: v[i])
        r = [0.0] * len(v)
        i = 0
        while i < len(order):  # average ranks over ties
            j = i
            while j + 1 < len(order) and v[order[j + 1]] == v[order[i]]:
                j += 1
            for k in range(i, j + 1):
                r[order[k]] = (i + j) / 2
            i = j + 1
        return r

    return pearson(ranks(x), ranks(y))


def write_result(out: Path, name: str, data: dict[str, Any]) -> Path:
    from ..artifacts import write_json

    path = Path(out) / f"{name}.json"
    write_json(path, data)
    return path


Hook = Callable[..., Any]
