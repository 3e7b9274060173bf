"""``hftlab analyze``: mechanistic analyses of harmful fine-tuning, on the organism or any HF causal LM.

One module per analysis, each naming the paper whose observation it measures:

- :mod:`.drift` — harmful embedding drift (Vaccine, arXiv 2402.01109);
- :mod:`.shallow` — shallow safety alignment: per-token KL and the prefilling attack (arXiv 2406.05946);
- :mod:`.gradients` — cosine between user-data gradients and the alignment loss's (Lisa / Booster);
- :mod:`.weights` — weight drift per layer and module, update-subspace principal angles;
- :mod:`.basin` — the safety basin along random weight directions (arXiv 2405.17374);
- :mod:`.refusal` — the refusal direction, its ablation and addition (arXiv 2406.11717);
- :mod:`.dynamics` — harmful, benign and alignment losses along the user's fine-tuning.

Each ``run(subject, out)`` writes a PNG and returns a JSON-able dict; :func:`analyze` writes one JSON
per analysis and run, and across several runs (a sweep) each module's ``summarise`` writes the
cross-run JSON and PNG (against p, against HS).
"""
from __future__ import annotations

import importlib
import logging
import time
from pathlib import Path
from typing import Any, Sequence

from ..errors import UserError

log = logging.getLogger(__name__)


class AnalysisError(UserError, ValueError):
    """Bad input to an analysis (a missing run folder, model or name); the message is one line."""


NAMES = ("drift", "shallow", "gradients", "weights", "basin", "refusal", "dynamics")
# Smaller sample sizes for a quick look (and the tests): keyword arguments of each module's ``run``.
QUICK: dict[str, dict[str, Any]] = {
    "drift": {"n_prompts": 32}, "shallow": {"n_prompts": 32, "n_prefill": 16, "ks": (0, 2, 5)},
    "gradients": {"n_examples": 16}, "weights": {},
    "basin": {"n_directions": 1, "n_prompts": 16, "alphas": (-0.2, 0.0, 0.2), "grid": ()},
    "refusal": {"n_prompts": 32, "n_eval": 16, "max_layers": 2}, "dynamics": {"n_probe": 8, "points": 3},
}


def module(name: str) -> Any:
    if name not in NAMES:
        raise AnalysisError(f"analysis '{name}': unknown (known: {', '.join(NAMES)})")
    return importlib.import_module(f"{__name__}.{name}")


def label(subject: Any) -> str:
    """A run's report folder name: p, seed and the start of its id."""
    return f"{subject.cfg.defense.name}_p{subject.ratio:g}_s{subject.seed}_{subject.name[:8]}"


def analyze(subjects: Sequence[Any], out: Path, names: Sequence[str] = NAMES,
            params: dict[str, dict[str, Any]] | None = None, command: str = "") -> dict[str, Any]:
    """Run ``names`` on every subject (``<out>/<run label>/<analysis>.json|png``) and, for two or more
    subjects, each analysis's cross-run summary (``<out>/<analysis>_summary.json`` and its PNG)."""
    from .common import write_result

    out = Path(out)
    params = params or {}
    mods = {n: module(n) for n in names}
    rows: dict[str, list[tuple[dict, dict]]] = {n: [] for n in names}
    timings: dict[str, float] = {n: 0.0 for n in names}
    index: dict[str, Any] = {"runs": [], "analyses": list(names), "command": command}
    for subject in subjects:
        folder = out / label(subject)
        meta = subject.meta()
        index["runs"].append({**meta, "folder": str(folder)})
        for n, mod in mods.items():
            if n == "dynamics" and not subject.finetune_dir:
                log.warning("%s: dynamics needs a run (config or run folder), not bare model paths; skipped", subject.name)
                continue
            start = time.time()
            log.info("%s: %s", label(subject), n)
            res = mod.run(subject, folder, **params.get(n, {}))
            seconds = time.time() - start
            timings[n] += seconds
            write_result(folder, n, {"meta": meta, "seconds": seconds, "result": res})
            rows[n].append((meta, res))
        subject.release()
    if len(subjects) > 1:
        for n, mod in mods.items():
            if rows[n]:
                write_result(out, f"{n}_summary", {"runs": [m for m, _ in rows[n]], "summary": mod.summarise(rows[n], out)})
    index["seconds"] = timings
    write_result(out, "index", index)
    return index
