"""Every bad input is one line, ``hftlab: error: …``, naming the key or file (and line), exit 2, and fails
before anything is built: no run or stage folder appears in ``out_dir``.

Table-driven: each case is the real CLI (``hftlab.cli.main`` in-process; a few in a subprocess) on a value,
a key, a YAML file, a data file, a model path, a store, an output folder or a flag. ``{tmp}`` in an
argument is the test's folder; the files a case needs are written there first.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from hftlab.cli import main

FIX = Path(__file__).resolve().parent / "fixtures"
OUT = "{tmp}/runs"
# Real-data runs on the fixture copies (the sst2 task reads data.sst2; alignment and HS read BeaverTails).
HUB = ["data.source=hub", "task=sst2", f"data.beavertails.path={FIX / 'beavertails'}",
       f"data.sst2.path={FIX / 'sst2'}", f"data.refusals.path={FIX / 'beavertails_refusals.json'}"]

FILES = {  # name -> content, written under {tmp} for every case
    "bad.yaml": "attack:\n  ratio: 0.1\n  n: [1, 2\n",
    "list.yaml": "- attack.ratio=0.1\n- seed=1\n",
    "unknown.yaml": "seed: 1\nattack:\n  ratio: 0.1\n  nonsense: 3\n",
    "badvalue.yaml": "seed: 1\n\nfinetune:\n  lr: .nan\n",
    "defparam.yaml": "defense: vaccine\ndefense.rho: 2\ndefense.nope: 1\n",
    "bad.jsonl": '{"prompt": "a", "label": 1}\n{"prompt": "b", "label": \n',
    "notobj.jsonl": '{"prompt": "a", "label": 1}\n[1, 2]\n',
    "bad.json": '[{"sentence": "a", "label": 1},\n {"sentence": ]\n',
    "fields.csv": "sentence,label\na,1\nb,0,extra\n",
    "quote.csv": 'sentence,label\na,1\n"b,0\n',
    "header.csv": "sentence,label\n",
    "empty.jsonl": "",
    "not.sqlite": "run_id,harmful_score\nabc,1.0\n",
    "afile": "a regular file where a folder is expected\n",
}

CASES = [  # (id, argv, words the one error line must contain)
    # values: non-finite, out of range, wrong type, zero budget
    ("ratio-nan", ["run", "attack.ratio=nan"], ["attack.ratio", "finite", "command line"]),
    ("ratio-inf", ["run", "attack.ratio=.inf"], ["attack.ratio", "finite"]),
    ("ratio-minus-inf", ["run", "attack.ratio=-.inf"], ["attack.ratio", "finite"]),
    ("lr-nan-string", ["run", "finetune.lr=NaN"], ["finetune.lr", "finite"]),
    ("lr-inf", ["run", "finetune.lr=inf"], ["finetune.lr", "finite"]),
    ("weight-decay-inf", ["run", "align.weight_decay=.inf"], ["align.weight_decay", "finite"]),
    ("defense-param-nan", ["run", "defense=vaccine", "defense.rho=nan"], ["defense.rho", "finite"]),
    ("finetune-0-epochs", ["run", "finetune.epochs=0"], ["finetune.epochs", "trains nothing"]),
    ("salora-without-lora", ["run", "defense=salora", "finetune.lora=false"],
     ["finetune.lora", "salora", "needs finetune.lora=true", "command line"]),
    ("negative-epochs", ["run", "align.epochs=-1"], ["align.epochs", "out of range"]),
    ("negative-n", ["run", "attack.n=-5"], ["attack.n", "out of range"]),
    ("zero-n", ["run", "attack.n=0"], ["attack.n", "out of range"]),
    ("negative-eval-count", ["run", "eval.n_harmful=-1"], ["eval.n_harmful", "out of range"]),
    ("negative-ratio", ["run", "attack.ratio=-0.1"], ["attack.ratio", "out of range"]),
    ("ratio-above-1", ["run", "attack.ratio=1.5"], ["attack.ratio", "out of range"]),
    ("negative-seed", ["run", "seed=-1"], ["seed", "out of range"]),
    ("zero-threads", ["run", "threads=0"], ["threads", "out of range"]),
    ("string-for-int", ["run", "attack.n=many"], ["attack.n", "expected an integer"]),
    ("string-for-float", ["run", "finetune.lr=fast"], ["finetune.lr", "expected a number"]),
    ("float-for-int", ["run", "eval.batch_size=2.5"], ["eval.batch_size", "expected an integer"]),
    ("string-for-bool", ["run", "finetune.lora=maybe"], ["finetune.lora", "true/false"]),
    ("list-for-float", ["run", "attack.ratio=[0.1,0.2]"], ["attack.ratio", "expected a number"]),
    ("list-for-int", ["run", "seed=[0,1]"], ["seed", "expected an integer"]),
    ("list-for-string", ["run", "task=[sentiment]"], ["task", "expected a string"]),
    ("scalar-for-list", ["run", "finetune.lora_targets=5"], ["finetune.lora_targets", "expected a list"]),
    ("bad-choice", ["run", "model.dtype=float64"], ["model.dtype", "not one of"]),
    ("scalar-for-section", ["run", "align=5"], ["align", "is a section"]),
    ("list-for-section", ["run", "eval=[1,2]"], ["eval", "is a section"]),
    ("string-for-dataset", ["run", "data.sst2=mine"], ["data.sst2", "is a section"]),
    ("no-equals", ["run", "seed"], ["seed", "KEY=VALUE"]),
    # unknown keys and names
    ("unknown-top-key", ["run", "speed=1"], ["speed", "unknown key"]),
    ("unknown-nested-key", ["run", "finetune.nope=1"], ["finetune.nope", "unknown key 'nope'"]),
    ("unknown-deep-key", ["run", "data.sst2.column=x"], ["data.sst2.column", "unknown key"]),
    ("unknown-defense-param", ["run", "defense=vaccine", "defense.nope=1"], ["defense.nope", "vaccine"]),
    ("unknown-defense", ["run", "defense=nope"], ["defense", "unknown defense 'nope'"]),
    ("unknown-attack", ["run", "attack=nope"], ["attack", "unknown attack 'nope'"]),
    ("unknown-judge", ["run", "eval.judge=nope"], ["eval.judge", "unknown judge 'nope'"]),
    # YAML files: the file, and the line where it has one
    ("yaml-missing", ["run", "-c", "{tmp}/none.yaml"], ["none.yaml", "not found"]),
    ("yaml-invalid", ["run", "-c", "{tmp}/bad.yaml"], ["bad.yaml:4", "invalid YAML"]),
    ("yaml-not-mapping", ["run", "-c", "{tmp}/list.yaml"], ["list.yaml:1", "mapping"]),
    ("yaml-unknown-key", ["run", "-c", "{tmp}/unknown.yaml"], ["attack.nonsense", "unknown.yaml:4"]),
    ("yaml-bad-value", ["run", "-c", "{tmp}/badvalue.yaml"], ["finetune.lr", "badvalue.yaml:4", "finite"]),
    ("yaml-unknown-param", ["run", "-c", "{tmp}/defparam.yaml"], ["defense.nope", "defparam.yaml:3"]),
    ("yaml-a-folder", ["run", "-c", "{tmp}"], ["not found"]),
    # data files given through the config
    ("data-bad-jsonl", ["run", *HUB, "data.beavertails.path={tmp}/bad.jsonl"],
     ["data.beavertails.path", "bad.jsonl:2", "invalid JSON"]),
    ("data-jsonl-not-object", ["run", *HUB, "data.beavertails.path={tmp}/notobj.jsonl"],
     ["data.beavertails.path", "notobj.jsonl:2", "JSON object"]),
    ("data-bad-json", ["run", *HUB, "data.sst2.path={tmp}/bad.json"], ["data.sst2.path", "bad.json:2"]),
    ("data-csv-fields", ["run", *HUB, "data.sst2.path={tmp}/fields.csv"], ["data.sst2.path", "fields.csv:3", "fields"]),
    ("data-csv-quote", ["run", *HUB, "data.sst2.path={tmp}/quote.csv"], ["data.sst2.path", "quote.csv:", "invalid CSV"]),
    ("data-csv-no-rows", ["run", *HUB, "data.sst2.path={tmp}/header.csv"], ["data.sst2.path", "header.csv", "no rows"]),
    ("data-empty", ["run", *HUB, "data.beavertails.path={tmp}/empty.jsonl"], ["data.beavertails.path", "empty"]),
    ("data-missing-file", ["run", *HUB, "data.sst2.path={tmp}/none.csv"], ["data.sst2.path", "none.csv", "not found"]),
    ("data-missing-field", ["run", *HUB, "data.sst2.prompt=text"], ["data.sst2.prompt", "missing field 'text'"]),
    ("data-path-unset", ["run", *HUB, "data.sst2.path="], ["data.sst2.path", "not set"]),
    # model paths
    ("model-absolute", ["run", "model=/nonexistent/hftlab-model"], ["model", "no such folder", "/nonexistent/hftlab-model"]),
    ("model-relative", ["run", "model=./no-such-hftlab-model"], ["model", "no such folder"]),
    ("model-home", ["run", "model=~/no-such-hftlab-model"], ["model", "no such folder"]),
    ("model-deep", ["run", "model=models/org/no-such"], ["model", "no such folder"]),
    # the results store
    ("report-not-sqlite", ["report", "--store", "{tmp}/not.sqlite"], ["--store", "not.sqlite", "not an SQLite"]),
    ("report-missing", ["report", "--store", "{tmp}/none.sqlite"], ["--store", "none.sqlite", "no such file"]),
    ("report-a-folder", ["report", "--store", "{tmp}"], ["--store", "is a folder"]),
    ("run-store-not-sqlite", ["run", "store={tmp}/not.sqlite"], ["store", "not.sqlite", "not an SQLite"]),
    ("run-store-under-file", ["run", "store={tmp}/afile/results.sqlite"], ["store", "afile", "is a file"]),
    # output folders that cannot be written (a regular file stands where a folder is needed)
    ("out-under-file", ["run", "out_dir={tmp}/afile/runs"], ["out_dir", "afile", "is a file"]),
    ("out-is-file", ["run", "out_dir={tmp}/afile"], ["out_dir", "afile", "is a file"]),
    ("sweep-out-under-file", ["sweep", "seed=0,1", "out_dir={tmp}/afile/runs"], ["out_dir", "afile"]),
    ("bench-out-under-file", ["bench", "--out", "{tmp}/afile/report", "--runs", OUT], ["--out", "afile"]),
    # flags and commands
    ("jobs-0", ["sweep", "--jobs", "0", "seed=0,1"], ["--jobs", ">= 1"]),
    ("jobs-negative", ["sweep", "--jobs", "-1", "seed=0,1"], ["--jobs", ">= 1"]),
    ("jobs-string", ["sweep", "--jobs", "two", "seed=0,1"], ["--jobs", "'two'"]),
    ("bench-jobs-0", ["bench", "--jobs", "0", "--runs", OUT], ["--jobs", ">= 1"]),
    ("unknown-flag", ["run", "--fast"], ["unrecognized arguments: --fast"]),
    ("unknown-command", ["frobnicate"], ["invalid choice: 'frobnicate'"]),
    ("no-command", [], ["required: command"]),
    ("bad-format", ["report", "--format", "docx", "--store", "{tmp}/none.sqlite"], ["--format", "docx"]),
]
SUBPROCESS = {"ratio-nan", "jobs-0", "report-not-sqlite", "data-bad-jsonl"}


def _argv(argv: list[str], tmp: Path) -> list[str]:
    out = [a.replace("{tmp}", str(tmp)) for a in argv]
    if out and out[0] in ("run", "sweep") and not any(a.startswith("out_dir=") for a in out):
        out.append(f"out_dir={tmp}/runs")  # where a run would write: the test checks it stays empty
    return out


def _one_error_line(err: str) -> str:
    """The only line of stderr that is not a log record (subprocesses log INFO lines before it)."""
    lines = [ln for ln in err.strip().splitlines() if not re.match(r"\d\d:\d\d:\d\d (INFO|DEBUG) ", ln)]
    assert len(lines) == 1, f"stderr is not one error line:\n{err}"
    return lines[0]


@pytest.mark.parametrize("case, argv, words", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_and_builds_nothing(case, argv, words, tmp_path, capsys):
    for name, text in FILES.items():
        (tmp_path / name).write_text(text)
    args = _argv(argv, tmp_path)
    if case in SUBPROCESS:
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        proc = subprocess.run([sys.executable, "-m", "hftlab", *args], capture_output=True, text=True, env=env,
                              timeout=120)
        rc, out, err = proc.returncode, proc.stdout, proc.stderr
        line = _one_error_line(err)
    else:
        rc = main(args)
        out, err = capsys.readouterr()
        assert len(err.strip().splitlines()) == 1, f"stderr is not one line:\n{err}"
        line = err.strip()
    assert rc == 2
    assert line.startswith("hftlab: error: ") and "Traceback" not in err + out
    for w in words:
        assert w.replace("{tmp}", str(tmp_path)) in line, f"{w!r} not in {line!r}"
    runs = tmp_path / "runs"  # nothing was built: no stage, run or store in the output folder
    assert not runs.exists() or not any(runs.iterdir()), sorted(p.name for p in runs.iterdir())


def test_enough_cases():
    assert len(CASES) >= 40 and len({c[0] for c in CASES}) == len(CASES)
