"""Repository text names only what a user can resolve.

Scans the text files of README.md, docs/, src/, tests/, bench/ and configs/ (tracked or not, as git
lists them, ignored files excluded) for references to internal work items that exist nowhere in the
repository (numbered work sessions and issues, a methods file and a folder outside the repository,
organism trial branches), and checks that every relative link in a Markdown file points to a file
(and heading) of the repository. A failure names file:line.
"""
from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ROOTS = ("README.md", "docs", "src", "tests", "bench", "configs")
SKIP_DIRS = {"__pycache__", ".pytest_cache"}
SELF = Path(__file__).resolve()

# Built from pieces so that this file does not spell them out (it is also skipped by name).
_S, _I = "sess" + "ion", "iss" + "ue"
FORBIDDEN = {
    "a numbered work " + _S: re.compile(rf"\b{_S}s? [0-9]", re.IGNORECASE),
    "a numbered " + _I: re.compile(rf"\b{_I} ?#?[0-9]+", re.IGNORECASE),
    "the methods file outside the repository": re.compile("METHODS" + r"\.md"),
    "a folder outside the repository": re.compile(r"\.\./" + "shared"),
    "an organism trial branch that is not in the repository": re.compile("organism" + r"-v[0-9]"),
}
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
FENCE = re.compile(r"^\s*(```|~~~)")


def _files() -> list[Path]:
    """Text files under ROOTS: git's tracked and untracked-but-not-ignored files, else a walk."""
    try:
        out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard", "--", *ROOTS],
                             cwd=ROOT, capture_output=True, check=True).stdout
        paths = [ROOT / p for p in out.decode().split("\0") if p]
    except (OSError, subprocess.CalledProcessError):
        paths = []
        for r in ROOTS:
            top = ROOT / r
            if top.is_file():
                paths.append(top)
            for d, dirs, names in os.walk(top):
                dirs[:] = [x for x in dirs if x not in SKIP_DIRS and not x.endswith(".egg-info")]
                paths += [Path(d) / n for n in names]
    return sorted(p for p in paths if p.is_file() and p.resolve() != SELF and _is_text(p))


def _is_text(path: Path) -> bool:
    if path.stat().st_size > 2_000_000:
        return False
    head = path.read_bytes()[:4096]
    if b"\0" in head:
        return False
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as e:  # a multi-byte character cut at the 4096th byte is still text
        return e.start >= len(head) - 3
    return True


def _lines(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8", errors="replace").splitlines()


def _slug(heading: str) -> str:
    """GitHub's anchor of a Markdown heading."""
    text = re.sub(r"[`*_]|\[([^\]]*)\]\([^)]*\)", lambda m: m.group(1) or "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    heads, fenced = [], False
    for line in _lines(path):
        if FENCE.match(line):
            fenced = not fenced
        elif not fenced and re.match(r"^#{1,6} ", line):
            heads.append(_slug(line.lstrip("#")))
    return set(heads)


def _link_problem(md: Path, target: str) -> str:
    """'' when the link resolves inside the repository, else what is wrong with it."""
    if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.IGNORECASE):  # http:, https:, mailto: …
        return ""
    path, _, anchor = target.partition("#")
    dest = (md.parent / path).resolve() if path else md.resolve()
    if dest != ROOT and ROOT not in dest.parents:
        return f"link outside the repository: {target}"
    if not dest.exists():
        return f"link to a missing path: {target}"
    if anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
        return f"link to a missing heading: {target}"
    return ""


def test_scan_covers_the_repository_text():
    files = {p.relative_to(ROOT).as_posix() for p in _files()}
    assert {"README.md", "src/hftlab/cli.py", "tests/conftest.py"} <= files, sorted(files)[:10]
    assert any(f.startswith("docs/") for f in files) and any(f.startswith("configs/") for f in files)


def test_patterns_catch_what_they_name():
    sample = {"a numbered work " + _S: f"see {_S} 7", "a numbered " + _I: f"{_I.title()} 5A",
              "the methods file outside the repository": "METHODS" + ".md",
              "a folder outside the repository": "[x](../" + "shared/x)",
              "an organism trial branch that is not in the repository": "branch organism" + "-v4"}
    for name, text in sample.items():
        assert FORBIDDEN[name].search(text), name
    assert not any(p.search("issues that need attention; pytest scope='session'") for p in FORBIDDEN.values())


def test_no_unresolvable_words():
    found = []
    for path in _files():
        rel = path.relative_to(ROOT).as_posix()
        for n, line in enumerate(_lines(path), 1):
            for name, pattern in FORBIDDEN.items():
                m = pattern.search(line)
                if m:
                    found.append(f"{rel}:{n}: {name}: {m.group(0)!r}")
    assert not found, "\n".join(found)


def test_markdown_links_resolve_inside_the_repository():
    broken = []
    for path in _files():
        if path.suffix.lower() != ".md":
            continue
        fenced = False
        for n, line in enumerate(_lines(path), 1):
            if FENCE.match(line):
                fenced = not fenced
                continue
            if fenced:
                continue
            for target in LINK.findall(re.sub(r"`[^`]*`", "", line)):
                problem = _link_problem(path, target)
                if problem:
                    broken.append(f"{path.relative_to(ROOT).as_posix()}:{n}: {problem}")
    assert not broken, "\n".join(broken)
