"""report_to=mlflow|wandb: a finished run's config, per-step losses, final metrics and files reach the
tracker under hftlab's run id (MLflow on a local SQLite store, W&B offline, read back from its files)."""
from __future__ import annotations

import json
import logging
import struct
import sys
from pathlib import Path

import pytest

from hftlab.config import load_config
from hftlab.pipeline import run
from hftlab.tracking import final_metrics, report


def _losses(result: dict, stage: str) -> list[dict]:
    folder = Path(result["run_dir"], "result.json").parent.parent.parent / stage
    (path,) = [p for p in folder.glob("*/losses.jsonl")]
    return [json.loads(line) for line in path.read_text().splitlines()]


def _saved(result: dict) -> dict:
    return json.loads(Path(result["run_dir"], "result.json").read_text())


def test_mlflow_logs_the_runs_result(fast_overrides, tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)  # MLflow's artifacts go to ./mlruns
    result = run(load_config(overrides=[*fast_overrides, "report_to=mlflow"]))
    saved = _saved(result)
    assert "report_to" not in saved["config"]  # not part of the experiment: same run id as without it
    assert result["run_id"] == run(load_config(overrides=fast_overrides))["run_id"]
    client = MlflowClient(uri)
    (logged,) = client.search_runs([client.get_experiment_by_name("hftlab").experiment_id])
    assert logged.data.tags["hftlab.run_id"] == result["run_id"]
    finals = {k: v for k, v in logged.data.metrics.items() if "/" not in k or k.split("/")[0] not in ("align", "finetune")}
    assert finals == final_metrics(saved) and finals["harmful_score"] == saved["harmful_score"]
    assert finals["finetune_accuracy"] == saved["finetune_accuracy"]
    assert logged.data.params["attack.ratio"] == str(saved["config"]["attack"]["ratio"])
    history = client.get_metric_history(logged.info.run_id, "finetune/loss")
    assert [(m.step, m.value) for m in sorted(history, key=lambda m: m.step)] == \
        [(r["step"], r["loss"]) for r in _losses(result, "finetune")]
    files = {a.path for d in ("run", "align", "finetune") for a in client.list_artifacts(logged.info.run_id, d)}
    assert {"run/result.json", "align/losses.jsonl", "finetune/manifest.json"} <= files


def _wandb_records(path: Path):
    """The records of an offline W&B run file (LevelDB log framing: 32 KiB blocks, 7-byte headers)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, buf = path.read_bytes(), 7, b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        buf, pos = buf + data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 4):  # a full record, or the last part of one
            rec = pb.Record()
            rec.ParseFromString(buf)
            yield rec
            buf = b""


def test_wandb_offline_logs_the_runs_result(fast_overrides, tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    result = run(load_config(overrides=[*fast_overrides, "defense=kl", "report_to=wandb"]))
    saved = _saved(result)
    wandb.teardown()  # the W&B service writes the run file behind the run; stopping it flushes the file
    (path,) = tmp_path.glob(f"wandb/offline-run-*-{result['run_id']}/run-{result['run_id']}.wandb")
    summary: dict = {}
    history, run_ids, artifacts = [], [], []
    for rec in _wandb_records(path):
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            run_ids.append(rec.run.run_id)
        elif kind == "summary":
            summary.update({u.key or "/".join(u.nested_key): json.loads(u.value_json) for u in rec.summary.update})
        elif kind == "history":
            history.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item})
        elif kind == "artifact":
            artifacts += [m.path for m in rec.artifact.manifest.contents]
    assert run_ids == [result["run_id"]] and summary["hftlab_run_id"] == result["run_id"]
    assert {k: summary[k] for k in final_metrics(saved)} == final_metrics(saved)
    assert summary["harmful_score"] == saved["harmful_score"]
    steps = [{k.split("/", 1)[1]: v for k, v in h.items() if k.startswith("finetune/")} for h in history]
    rows = _losses(result, "finetune")
    assert set(rows[0]) - {"step", "loss", "lr"}  # the method's own per-step scalars (KL's) are logged too
    assert [s for s in steps if s] == rows
    assert {"run/result.json", "align/losses.jsonl", "finetune/losses.jsonl"} <= set(artifacts)


def test_a_missing_tracker_never_fails_a_run(fast_overrides, monkeypatch, caplog):
    result = {"run_id": "abc", "run_dir": "/nonexistent", "metrics": {"harmful_score": 1.0}, "stages": []}
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed
    with caplog.at_level(logging.WARNING, logger="hftlab.tracking"):
        report("wandb", result, {"out_dir": "runs"}, {})
    assert "report_to=wandb: wandb is not installed (pip install 'hftlab[tracking]'); run abc not logged" in caplog.text
