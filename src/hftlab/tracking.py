"""Optional experiment trackers: ``report_to=wandb`` or ``report_to=mlflow`` (default ``none``).

After a run finishes (its store row and ``result.json`` written), a reporter logs, under hftlab's run
id: the resolved config, the training stages' per-step scalars from ``losses.jsonl`` (loss, lr and the
method's own, e.g. Booster's harmful loss), the final metrics (those of ``result.json``, nested keys
joined with ``/``) and the run's files (``result.json``, each training stage's ``manifest.json`` and
``losses.jsonl``; never model weights). Tracking never decides whether a run succeeds: a missing
package or an unreachable server is logged as a warning. The trackers read their usual
variables (``WANDB_PROJECT``, ``WANDB_MODE=offline``, ``WANDB_DIR``, ``MLFLOW_TRACKING_URI``,
``MLFLOW_EXPERIMENT_NAME``); the project or experiment defaults to ``hftlab``.
"""
from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

log = logging.getLogger(__name__)

BACKENDS = ("wandb", "mlflow")
# Files of a stage folder worth keeping beside the metrics (never model weights).
STAGE_FILES = ("manifest.json", "losses.jsonl")


@dataclass
class Record:
    """What a tracker receives for one run."""

    run_id: str
    config: dict[str, Any]
    final: dict[str, float]
    steps: dict[str, list[dict[str, float]]] = field(default_factory=dict)  # stage -> losses.jsonl rows
    files: list[tuple[str, Path]] = field(default_factory=list)  # (folder in the tracker, file)


def flatten(d: dict[str, Any], prefix: str = "", sep: str = "/") -> dict[str, Any]:
    """Nested mappings -> one level, keys joined with ``sep``."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + sep, sep))
        else:
            out[key] = v
    return out


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def final_metrics(result: dict[str, Any]) -> dict[str, float]:
    """The numbers of a run's ``result.json``: its metrics (nested keys joined with ``/``), the aligned
    model's HS and FA under ``aligned/`` and each stage's seconds under ``seconds/``."""
    out = {k: float(v) for k, v in flatten(result.get("metrics") or {}).items() if _number(v)}
    out.update({f"aligned/{k}": float(v) for k, v in (result.get("aligned") or {}).items() if _number(v)})
    out.update({f"seconds/{s['name']}": float(s["seconds"]) for s in result.get("stages", [])})
    return out


def collect(result: dict[str, Any], config: dict[str, Any], folders: dict[str, Path]) -> Record:
    """A run's record from its result and its stage folders (``{"align": path, "finetune": …}``)."""
    steps: dict[str, list[dict[str, float]]] = {}
    files: list[tuple[str, Path]] = []
    run_json = Path(result["run_dir"]) / "result.json"
    if run_json.is_file():
        files.append(("run", run_json))
    for stage, folder in folders.items():
        losses = Path(folder) / "losses.jsonl"
        if losses.is_file():
            rows = [json.loads(line) for line in losses.read_text().splitlines() if line.strip()]
            steps[stage] = [{k: float(v) for k, v in r.items() if _number(v)} for r in rows]
        files += [(stage, Path(folder) / f) for f in STAGE_FILES if (Path(folder) / f).is_file()]
    return Record(result["run_id"], flatten(config, sep="."), final_metrics(result), steps, files)


def _wandb(rec: Record, out_dir: str) -> None:
    import wandb

    run = wandb.init(project=os.environ.get("WANDB_PROJECT", "hftlab"), id=rec.run_id, name=rec.run_id,
                     config=rec.config, resume="allow", job_type="hftlab-run", reinit="create_new",
                     dir=os.environ.get("WANDB_DIR") or out_dir, tags=["hftlab"])
    try:
        for stage, rows in rec.steps.items():
            run.define_metric(f"{stage}/step")
            run.define_metric(f"{stage}/*", step_metric=f"{stage}/step")
            for r in rows:
                run.log({f"{stage}/{k}": v for k, v in r.items()})
        run.summary.update({**rec.final, "hftlab_run_id": rec.run_id})
        art = wandb.Artifact(f"hftlab-{rec.run_id}", type="hftlab-run")
        for folder, path in rec.files:
            art.add_file(str(path), name=f"{folder}/{path.name}")
        run.log_artifact(art)
    finally:
        run.finish()


def _mlflow(rec: Record, out_dir: str) -> None:
    from mlflow import MlflowClient
    from mlflow.entities import Metric, Param, RunTag

    client = MlflowClient()
    name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "hftlab")
    exp = client.get_experiment_by_name(name)
    exp_id = exp.experiment_id if exp else client.create_experiment(name)
    found = client.search_runs([exp_id], filter_string=f"tags.`hftlab.run_id` = '{rec.run_id}'", max_results=1)
    if found:  # reported before: log into the same run (a tracker holds one run per hftlab run)
        rid = found[0].info.run_id
        client.update_run(rid, status="RUNNING")
    else:
        rid = client.create_run(exp_id, run_name=rec.run_id, tags={"hftlab.run_id": rec.run_id}).info.run_id
    now = int(time.time() * 1000)
    metrics = [Metric(k, v, now, 0) for k, v in rec.final.items()]
    for stage, rows in rec.steps.items():
        metrics += [Metric(f"{stage}/{k}", v, now, int(r.get("step", i)))
                    for i, r in enumerate(rows) for k, v in r.items() if k != "step"]
    params = [Param(k, json.dumps(v) if not isinstance(v, str) else v) for k, v in rec.config.items()]
    for i in range(0, len(params), 100):
        client.log_batch(rid, params=params[i:i + 100])
    for i in range(0, len(metrics), 1000):
        client.log_batch(rid, metrics=metrics[i:i + 1000])
    client.log_batch(rid, tags=[RunTag("hftlab.out_dir", out_dir)])
    for folder, path in rec.files:
        client.log_artifact(rid, str(path), artifact_path=folder)
    client.set_terminated(rid)


REPORTERS: dict[str, Callable[[Record, str], None]] = {"wandb": _wandb, "mlflow": _mlflow}


def report(report_to: str, result: dict[str, Any], config: dict[str, Any], folders: dict[str, Path]) -> None:
    """Send a finished run to the trackers named in ``report_to`` (``none``, ``wandb``, ``mlflow``);
    a tracker that fails is logged, never raised."""
    names = [n.strip() for n in report_to.split(",") if n.strip() and n.strip() != "none"]
    if not names:
        return
    rec = collect(result, config, folders)
    for name in names:
        try:
            REPORTERS[name](rec, str(config.get("out_dir", "runs")))
            log.info("report_to=%s: run %s logged", name, rec.run_id)
        except ImportError as e:
            log.warning("report_to=%s: %s is not installed (pip install 'hftlab[tracking]'); run %s not logged",
                        name, e.name or name, rec.run_id)
        except Exception as e:  # noqa: BLE001 (a tracker's failure must not fail a finished run)
            log.warning("report_to=%s: run %s not logged: %s: %s", name, rec.run_id, type(e).__name__, e)
