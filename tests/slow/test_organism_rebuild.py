"""Rebuilding the organism from its world gives the shipped weights bit for bit (one torch thread, the
same libraries: about 8 minutes)."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from hftlab.organism import build

pytestmark = pytest.mark.slow


def test_rebuild_matches_the_shipped_organism(tmp_path):
    out = build.rebuild(tmp_path / "organism")
    got, want = load_file(out / "model.safetensors"), load_file(build.PINNED / "model.safetensors")
    assert got.keys() == want.keys()
    differ = [k for k in want if not torch.equal(got[k], want[k])]
    assert not differ, f"{len(differ)} of {len(want)} tensors differ, e.g. {differ[0]}: max |Δ| " \
                       f"{(got[differ[0]] - want[differ[0]]).abs().max():.3g}"
    assert (out / "tokenizer.json").read_text() == (build.PINNED / "tokenizer.json").read_text()
