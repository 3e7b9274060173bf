"""The threat model as a pipeline: align → finetune → repair → evaluate (aligned and final models).

Each stage writes ``<out_dir>/<stage>/<hash>/`` with a ``manifest.json`` (resolved config section,
content hash of its inputs, library versions, seed, timings). The hash covers everything that
determines the stage's output, including the previous stage's hash, so a stage already on disk is
reused: a sweep aligns once per alignment config, and an interrupted run resumes at the stage it lost.
The code of the plugins a stage runs (defense, attack, task, judge; :mod:`hftlab.code_identity`) is
part of its hash, so editing a method's file recomputes the stages it acts in.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import torch

from . import registry
from .artifacts import (content_hash, discard_partial, follow_umask, is_complete, link_stages, read_json, stage_dir,
                        stage_lock, write_json, write_manifest)
from .code_identity import code_fingerprint
from .config import Config, ConfigError, ModelConfig, to_dict
from .data.format import Formatter
from .data.sources import get_source
from .defenses.base import PLAIN, Context, Defense
from .guardrail import attack_key, filter_upload, load_kept

log = logging.getLogger(__name__)


@dataclass
class Stage:
    name: str
    seconds: float
    cached: bool
    metrics: dict[str, Any] = field(default_factory=dict)
    folder: str = ""  # the stage's folder; in result.json relative to the run folder (``../../align/<hash>``)


def base_model(model: ModelConfig) -> tuple[str, str]:
    """(path, identity) of the model a run starts from, without building it: the organism's build
    folder and content hash (a new organism version is a new identity), or the hub name / local path."""
    if model.name == "organism":
        from .organism.build import organism_dir

        folder = organism_dir()
        return str(folder), f"organism:{folder.name}"
    return model.name, model.name


def plugin_code(cfg: Config) -> dict[str, str]:
    """Code fingerprints of the run's defense, attack, task and judge."""
    names = {"defense": cfg.defense.name, "attack": cfg.attack.name, "task": cfg.task, "judge": cfg.eval.judge}
    return {kind: registry.code_id(kind, name) for kind, name in names.items()}


def run_key(cfg: Config) -> str:
    """A run's id: its resolved config, the identity of its base model and its plugins' code, so that
    results computed on another organism build, or with an earlier version of a method, are not
    reported as done."""
    return content_hash("run", experiment(cfg), base_model(cfg.model)[1], plugin_code(cfg))


def experiment(cfg: Config) -> dict[str, Any]:
    """The resolved config as the store and ``result.json`` keep it: without ``report_to`` (where a run
    is tracked does not change what it computes, nor its id)."""
    d = to_dict(cfg)
    d.pop("report_to", None)
    return d


class Pipeline:
    """One run of the threat model for one resolved Config."""

    def __init__(self, cfg: Config):
        from .preflight import check_data, check_paths

        check_paths(cfg)  # before anything expensive: folders, store and model path
        self.cfg = cfg
        self.out = Path(cfg.out_dir)
        self.stages: list[Stage] = []
        torch.set_num_threads(cfg.threads)
        self.source = get_source(cfg.data.source, cfg.data)
        self.task = registry.get("task", cfg.task)()
        self.defense: Defense = registry.get("defense", cfg.defense.name)(**cfg.defense.params)
        self.defense.bind_data(self.source)
        check_data(cfg, self.source, self.task, self.defense)
        self.base_path, self.base_id = self._base()
        self.code = plugin_code(cfg)
        from .models.loading import load_tokenizer

        self.tokenizer = load_tokenizer(self.base_path, cfg.model)

    # ---- helpers -------------------------------------------------------------------------------
    def _base(self) -> tuple[str, str]:
        if self.cfg.model.name == "organism":
            from .organism.build import ensure_organism

            ensure_organism()
        return base_model(self.cfg.model)

    def formatter(self, max_length: int) -> Formatter:
        return Formatter(self.tokenizer, self.cfg.model.template, max_length)

    def load(self, path: str | Path) -> torch.nn.Module:
        from .models.loading import load_model

        return load_model(path, self.cfg.model)

    def _defense_for(self, stage: str) -> tuple[Defense, dict[str, Any]]:
        """The defense if it acts in ``stage`` (with its params and code for the hash), else plain SFT."""
        if self.defense.acts_in(stage):
            return self.defense, {"defense": self.cfg.defense.name, "params": self.cfg.defense.params,
                                  "code": self.code["defense"]}
        return PLAIN, {"code": code_fingerprint(type(PLAIN).__module__)}

    def _needs(self, defense: Defense, stage: str) -> dict[str, list]:
        data: dict[str, list] = {}
        if "harmful" in defense.needs:
            data["harmful"] = self.source.harmful("provider", self.cfg.data.harmful_n)
        if "alignment" in defense.needs or stage != "align":
            data["alignment"] = self.source.alignment(self.cfg.data.alignment_n)
        return data

    def _timed(self, name: str, folder: Path, work: Callable[[Path], dict[str, Any]]) -> dict[str, Any]:
        """Run ``work(folder)`` unless the folder is complete; record the stage either way."""
        acc = _accelerator()
        # Parallel sweep cells sharing a stage: one computes, the others reuse. Under DDP only the main
        # process takes the file lock (the others would block it inside collectives) and it decides for all.
        lock = stage_lock(folder) if acc.is_main_process else contextlib.nullcontext()
        with lock:
            return self._timed_locked(name, folder, work, acc)

    def _timed_locked(self, name: str, folder: Path, work: Callable[[Path], dict[str, Any]],
                      acc: Any) -> dict[str, Any]:
        done = is_complete(folder)
        if acc.num_processes > 1:
            from accelerate.utils import broadcast_object_list

            done = broadcast_object_list([done])[0]
        if done:
            manifest = read_json(folder / "manifest.json")
            self.stages.append(Stage(name, 0.0, True, manifest.get("metrics", {}), str(folder)))
            log.info("%s: cached (%s)", name, folder)
            return manifest
        if acc.is_main_process and discard_partial(folder):
            log.info("%s: discarded the partial folder of an interrupted run (%s)", name, folder)
        acc.wait_for_everyone()
        start = time.time()
        metrics = work(folder)
        seconds = time.time() - start
        manifest = {"stage": name, "hash": folder.name, "seed": self.cfg.seed, "seconds": seconds,
                    "metrics": metrics, "config": to_dict(self.cfg), "code": self.code}
        if acc.is_main_process:
            write_manifest(folder, **manifest)
        acc.wait_for_everyone()
        self.stages.append(Stage(name, seconds, False, metrics, str(folder)))
        log.info("%s: %.1fs %s", name, seconds, _short(metrics))
        return manifest

    # ---- stages --------------------------------------------------------------------------------
    def align(self) -> Path:
        cfg = self.cfg
        defense, dkey = self._defense_for("align")
        key = content_hash("align", self.base_id, asdict(cfg.model), asdict(cfg.data), asdict(cfg.align),
                           cfg.seed, dkey)
        folder = stage_dir(self.out, "align", key)
        skip = cfg.align.epochs == 0 and cfg.align.max_steps == 0

        def work(folder: Path) -> dict[str, Any]:
            if skip:  # an already aligned model (e.g. a chat model from the hub): use it as is
                model = self.load(self.base_path)
                return self._save(model, folder) or {"skipped": True}
            data = self.source.alignment(cfg.data.alignment_n)
            return self._train("align", self.base_path, data, cfg.align, defense, folder, {"base": self.base_path})

        self._timed("align", folder, work)
        return folder

    def finetune(self, aligned: Path) -> Path:
        cfg = self.cfg
        defense, dkey = self._defense_for("finetune")
        guarded = self.guardrail(aligned) if cfg.guardrail.name else None
        key = content_hash("finetune", aligned.name, asdict(cfg.finetune), attack_key(cfg.attack), cfg.task,
                           cfg.seed, dkey, self.code["attack"], self.code["task"],
                           *([guarded.name] if guarded else []))
        folder = stage_dir(self.out, "finetune", key)

        def work(folder: Path) -> dict[str, Any]:
            data = load_kept(guarded) if guarded else self.upload(aligned)
            refs = {"aligned": str(aligned), "base": self.base_path}
            if cfg.finetune.continue_adapter:  # single-LoRA variant: the alignment adapter keeps training
                return self._train("finetune", self.base_path, data, cfg.finetune, defense, folder, refs,
                                   adapter=aligned / "adapter")
            return self._train("finetune", str(aligned), data, cfg.finetune, defense, folder, refs)

        self._timed("finetune", folder, work)
        return folder

    def attack(self, aligned: Path) -> Any:
        """The run's attack, bound to the models it may read (the aligned model it attacks)."""
        from .attacks.base import AttackContext

        attack = registry.get("attack", self.cfg.attack.name)(**self.cfg.attack.params)
        loaders = {"aligned": lambda: self.load(aligned), "base": lambda: self.load(self.base_path)}
        return attack.bind(AttackContext(loaders, self.formatter(self.cfg.finetune.max_length), self.cfg.seed))

    def upload(self, aligned: Path) -> list:
        """The user's fine-tuning data as the attack builds it."""
        return self.attack(aligned).build(self.source, self.task, self.cfg.attack)

    def guardrail(self, aligned: Path) -> Path:
        """The provider's filter (``guardrail.*``): scores the upload, keeps what it does not flag."""
        cfg = self.cfg
        key = content_hash("guardrail", aligned.name, attack_key(cfg.attack), cfg.task, asdict(cfg.guardrail),
                           self.code["attack"], self.code["task"], registry.code_id("judge", cfg.guardrail.name))
        folder = stage_dir(self.out, "guardrail", key)

        def work(folder: Path) -> dict[str, Any]:
            from .eval.evaluate import make_judge

            judge = make_judge(cfg.guardrail.name, batch_size=cfg.eval.judge_batch_size)
            return filter_upload(self.upload(aligned), judge, cfg.guardrail.threshold, folder)[1]

        self._timed("guardrail", folder, work)
        return folder

    def evaluate_views(self, model_dir: Path) -> dict[str, Any]:
        """The final model evaluated once more under each of the attack's views (trigger, cipher…)."""
        cfg = self.cfg
        out: dict[str, Any] = {}
        for view in registry.get("attack", cfg.attack.name)(**cfg.attack.params).views(self.source):
            key = content_hash("evaluate-view", model_dir.name, asdict(cfg.eval), cfg.task, view.name,
                               attack_key(cfg.attack), self.code["attack"], self.code["judge"], self.code["task"])
            folder = stage_dir(self.out, "evaluate", key)

            def work(folder: Path, view: Any = view) -> dict[str, Any]:
                from .eval.views import evaluate_view

                return evaluate_view(self.load(model_dir), self.formatter(cfg.finetune.max_length), self.source,
                                     self.task, cfg.eval, folder, view)

            out[view.name] = self._timed(f"evaluate_{view.name}", folder, work)["metrics"]
        return out

    def repair(self, aligned: Path, finetuned: Path) -> Path:
        cfg = self.cfg
        key = content_hash("repair", finetuned.name, cfg.defense.name, cfg.defense.params, self.code["defense"])
        folder = stage_dir(self.out, "repair", key)

        def work(folder: Path) -> dict[str, Any]:
            model = self.load(finetuned)
            ctx = Context(stage="repair", accelerator=_accelerator(), formatter=self.formatter(cfg.finetune.max_length),
                          seed=cfg.seed, data=self._needs(self.defense, "repair"),
                          loaders={"aligned": lambda: self.load(aligned), "base": lambda: self.load(self.base_path)},
                          batch_size=cfg.finetune.batch_size, finetuned_path=str(finetuned))
            model = self.defense.repair(model, ctx)
            self._save(model, folder)
            return dict(ctx.repair_metrics)

        self._timed("repair", folder, work)
        return folder

    def evaluate(self, model_dir: Path, name: str, system: str = "") -> dict[str, Any]:
        cfg = self.cfg
        from .eval.evaluate import SCORING_VERSION

        key = content_hash("evaluate", model_dir.name, asdict(cfg.eval), cfg.task, system, self.code["judge"],
                           self.code["task"], SCORING_VERSION)
        folder = stage_dir(self.out, "evaluate", key)

        def work(folder: Path) -> dict[str, Any]:
            from .eval.evaluate import evaluate

            acc = _accelerator()
            metrics: dict[str, Any] = {}
            if acc.is_main_process:
                model = self.load(model_dir)
                metrics = evaluate(model, self.formatter(cfg.finetune.max_length), self.source, self.task,
                                   cfg.eval, folder, system)
            return metrics

        manifest = self._timed(name, folder, work)
        return manifest["metrics"]

    # ---- shared training body -----------------------------------------------------------------
    def _train(self, stage: str, init: str, data: list, tcfg: Any, defense: Defense, folder: Path,
               refs: dict[str, str], adapter: Path | None = None) -> dict[str, Any]:
        from .models.loading import add_lora, load_adapter
        from .runtime import accelerator
        from .training.loop import train

        acc = accelerator(tcfg.grad_accum)
        fmt = self.formatter(tcfg.max_length)
        ctx = Context(stage=stage, accelerator=acc, formatter=fmt, seed=self.cfg.seed,
                      data={**self._needs(defense, stage), "user" if stage == "finetune" else "alignment": data},
                      loaders={k: (lambda p=p: self.load(p)) for k, p in refs.items()},
                      batch_size=tcfg.batch_size)
        data = defense.prepare_data(stage, data, ctx)
        system = defense.system_prompt(stage)
        if system:
            data = [replace(ex, system=system) for ex in data]
        model = self.load(init)
        torch.manual_seed(self.cfg.seed)
        if adapter is not None:
            model = load_adapter(model, adapter)
        elif tcfg.lora:
            model = add_lora(model, tcfg)
        folder.mkdir(parents=True, exist_ok=True)
        result = train(model, fmt.encode_all(data), tcfg, defense=defense, ctx=ctx, seed=self.cfg.seed,
                       desc=stage, log_path=folder / "losses.jsonl", pad_id=self.tokenizer.pad_token_id)
        self._save(acc.unwrap_model(model), folder)
        return {"steps": result.steps, "final_loss": result.losses[-1], "train_seconds": result.seconds,
                "tokens": result.tokens, "examples": len(data)}

    def _save(self, model: torch.nn.Module, folder: Path) -> None:
        from .models.loading import save

        acc = _accelerator()
        if acc.is_main_process:
            save(model, self.tokenizer, folder)
            follow_umask(folder)  # safetensors writes model.safetensors 0600
        acc.wait_for_everyone()

    # ---- the whole run -------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        cfg = self.cfg
        aligned = self.align()
        aligned_metrics = self.evaluate(aligned, "evaluate_aligned") if cfg.eval.evaluate_aligned else {}
        final = finetuned = self.finetune(aligned)
        if self.defense.acts_in("repair"):
            final = self.repair(aligned, final)
        metrics = self.evaluate(final, "evaluate", self.defense.system_prompt("serve"))
        views = self.evaluate_views(final)
        if views:  # the attacker's own queries (trigger, system prompt, cipher), beside the plain ones
            metrics = {**metrics, "views": views}
        if cfg.guardrail.name:
            metrics = {**metrics, "guardrail": next(s.metrics for s in self.stages if s.name == "guardrail")}
        config = experiment(cfg)
        run_id = run_key(cfg)
        run_dir = self.out / "runs" / run_id
        stages = [{**dataclasses.asdict(s), "folder": os.path.relpath(s.folder, run_dir)} for s in self.stages]
        result = {
            "harmful_score": metrics.get("harmful_score"),
            "finetune_accuracy": metrics.get("finetune_accuracy"),
            "aligned": {k: aligned_metrics.get(k) for k in ("harmful_score", "finetune_accuracy")},
            "metrics": metrics,
            "aligned_metrics": aligned_metrics,
            "stages": stages,
            "run_dir": str(run_dir),
            "run_id": run_id,
            "base_model": self.base_id,
        }
        if _accelerator().is_main_process:
            from . import store

            # The store row first: result.json marks the run done (a sweep skips it), so a kill between
            # the two must leave the run to redo (its row is replaced), not done without a row.
            store.record(cfg.store or self.out / "results.sqlite", run_id, config, result)
            write_json(Path(result["run_dir"]) / "result.json", {**result, "config": config})
            link_stages(run_dir, [(s["name"], s["folder"]) for s in stages])  # runs/<id>/align -> ../../align/<hash>
            if cfg.report_to != "none":
                from .tracking import report

                report(cfg.report_to, result, {**config, "run_id": run_id},
                       {"align": aligned, "finetune": finetuned, **({"repair": final} if final != finetuned else {})})
        return result


def _accelerator() -> Any:
    from .runtime import accelerator

    return accelerator()


def _short(metrics: dict[str, Any]) -> str:
    keys = ("harmful_score", "finetune_accuracy", "final_loss", "steps")
    return " ".join(f"{k}={metrics[k]:.4g}" for k in keys if isinstance(metrics.get(k), (int, float)))


def run(cfg: Config) -> dict[str, Any]:
    """Run the whole pipeline for ``cfg``; returns the result dict of ``hftlab run --json``."""
    return Pipeline(cfg).run()
