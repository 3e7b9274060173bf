"""``hftlab run`` on a real-model path: a tiny local Llama (random init), the fixture datasets through the
``hub`` source, a real judge (tiny beaver-dam); both LoRA workflows; one-line errors for what users get
wrong (unknown hub id offline, gated model without a token, a dataset missing a field, a judge whose
labels do not match)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from hftlab.cli import main
from real import tiny

HUB = __import__("conftest").HUB_FIXTURES
FIX = __import__("conftest").FIXTURES


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    root = tmp_path_factory.mktemp("real")
    return {"lm": tiny.causal_lm(root / "lm"), "bd": tiny.beaver_dam(root / "bd"),
            "bad": tiny.beaver_dam(root / "bad", labels=("LABEL_0", "LABEL_1"))}


def _budget(paths, out: Path) -> list[str]:
    return [f"model={paths['lm']}", *HUB, "task=sst2", "eval.judge=beaver-dam", f"eval.judge_model={paths['bd']}",
            "data.alignment_n=4", "data.harmful_n=4", "attack.n=6", "attack.ratio=0.5",
            "align.lora=true", "align.lora_r=4", "align.max_steps=2", "align.batch_size=2",
            "finetune.lora_r=8", "finetune.max_steps=2", "finetune.batch_size=2", "eval.n_harmful=3",
            "eval.n_task=3", "eval.max_new_tokens=4", "eval.evaluate_aligned=false", "align.max_length=512",
            "finetune.max_length=512", f"out_dir={out}"]


def _stage(out: Path, name: str) -> Path:
    return next(p for p in (out / name).iterdir() if p.is_dir())


def _run(args, capsys) -> dict:
    assert main(["run", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_real_path_two_loras(paths, tmp_path, capsys):
    out = tmp_path / "runs"
    result = _run(_budget(paths, out), capsys)
    assert 0 <= result["harmful_score"] <= 100 and 0 <= result["finetune_accuracy"] <= 100
    assert result["metrics"]["judge"] == "beaver-dam" and "judge_score_mean" in result["metrics"]
    ev = _stage(out, "evaluate")
    rows = [json.loads(x) for x in (ev / "generations.jsonl").read_text().splitlines()]
    test = [json.loads(x) for x in (FIX / "beavertails/round0/30k/test.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in rows if r["set"] == "harmful"] == [t["prompt"] for t in test if not t["is_safe"]][:3]
    aligned = _stage(out, "align")
    assert (aligned / "model.safetensors").is_file() and (aligned / "adapter" / "adapter_config.json").is_file()
    tuned = _stage(out, "finetune")
    assert json.loads((tuned / "adapter" / "adapter_config.json").read_text())["r"] == 8  # a second, fresh LoRA


def test_real_path_single_lora(paths, tmp_path, capsys):
    out = tmp_path / "runs"
    result = _run([*_budget(paths, out), "finetune.continue_adapter=true"], capsys)
    assert [s["name"] for s in result["stages"]] == ["align", "finetune", "evaluate"]
    tuned = _stage(out, "finetune")
    assert json.loads((tuned / "adapter" / "adapter_config.json").read_text())["r"] == 4  # the alignment adapter


def _error(args, capsys) -> str:
    assert main(["run", *args]) == 2
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.startswith("hftlab: error")]
    assert "Traceback" not in err and len(lines) == 1, err[-2000:]
    return lines[0]


def test_unknown_hub_model_offline(capsys):
    err = _error(["model=nobody/no-such-model-xyz", *HUB, "task=sst2"], capsys)
    assert "nobody/no-such-model-xyz" in err and "offline" in err


def test_dataset_missing_field(paths, tmp_path, capsys):
    err = _error([*_budget(paths, tmp_path / "r"), "data.beavertails.label=safety"], capsys)
    assert "missing field 'safety'" in err and "data.beavertails.label" in err and "beavertails" in err


def test_judge_labels_do_not_match(paths, tmp_path, capsys):
    err = _error([*_budget(paths, tmp_path / "r"), f"eval.judge_model={paths['bad']}"], capsys)
    assert "beaver-dam" in err and "14 BeaverTails categories" in err


def test_gated_model_without_token(tmp_path):
    """A local stand-in for the hub answers like a gated repository (401, X-Error-Code: GatedRepo)."""

    class Gated(BaseHTTPRequestHandler):
        def _deny(self) -> None:
            self.send_response(401)
            self.send_header("X-Error-Code", "GatedRepo")
            self.send_header("X-Error-Message", "Access to model meta-llama/Llama-2-7b-hf is restricted.")
            self.send_header("Content-Length", "0")
            self.end_headers()

        do_GET = do_HEAD = _deny

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Gated)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    env = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")}
    env.update(HF_HUB_OFFLINE="0", HF_ENDPOINT=f"http://127.0.0.1:{server.server_address[1]}",
               HF_HOME=str(tmp_path / "hf"), HF_HUB_ETAG_TIMEOUT="5", HF_HUB_DOWNLOAD_TIMEOUT="5")
    try:
        proc = subprocess.run([sys.executable, "-m", "hftlab", "run", "model=meta-llama/Llama-2-7b-hf",
                               f"out_dir={tmp_path / 'r'}"], env=env, capture_output=True, text=True, timeout=120)
    finally:
        server.shutdown()
        server.server_close()
    lines = [x for x in proc.stderr.strip().splitlines() if x.startswith("hftlab: error")]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert len(lines) == 1 and "gated" in lines[0] and "HF_TOKEN" in lines[0]
