"""The one mutation runner of the test suite (not collected by pytest): each area's script lists its mutations
and calls `main(MUTATIONS, __doc__)`.

    python tests/pipelines/mutation.py [--only SUBSTRING] [--keep]

Copies the working tree to a temp dir (the shared checkout is never modified), then for each mutation
(file, old snippet, new snippet, pytest arguments) replaces the snippet, runs those tests with `-x` and
reports "killed" (a test failed), "SURVIVED" (they passed) or the exit status of anything else (an error
is not a kill). Exit status 1 when a mutation is not killed or a snippet is not found exactly once (a
stale list).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

__all__ = ["ROOT", "Mutation", "main"]

ROOT = Path(__file__).resolve().parents[1]
Mutation = tuple[str, str, str, str]  # (file, old snippet, new snippet, pytest arguments)


def main(mutations: Sequence[Mutation], doc: str | None = None, argv: list[str] | None = None) -> int:
    """Run `mutations` against a temp copy of the repository; print one line each and a summary."""
    ap = argparse.ArgumentParser(description=(doc or __doc__).splitlines()[0])
    ap.add_argument("--only", default="", help="run the mutations whose file or snippet contains this")
    ap.add_argument("--keep", action="store_true", help="keep the temp copy")
    args = ap.parse_args(argv)
    todo = [m for m in mutations if not args.only or any(args.only in x for x in m[:3])]
    work = Path(tempfile.mkdtemp(prefix="attnplug-mut-"))
    repo = work / "repo"
    shutil.copytree(ROOT, repo, ignore=shutil.ignore_patterns(".git", "__pycache__", "*.egg-info", "out"))
    env = {**os.environ, "PYTHONPATH": str(repo), "PYTHONDONTWRITEBYTECODE": "1"}
    not_killed, stale = [], []
    for i, (rel, old, new, tests) in enumerate(todo, 1):
        path = repo / rel
        text = path.read_text()
        if text.count(old) != 1:
            stale.append(f"{rel}: {old!r}")
            print(f"[{i}/{len(todo)}] STALE    {rel}: {old[:60]!r}", flush=True)
            continue
        path.write_text(text.replace(old, new))
        t0 = time.time()
        cmd = f"{sys.executable} -m pytest -x -q -p no:cacheprovider {tests}"
        r = subprocess.run(cmd, shell=True, cwd=repo, env=env, capture_output=True, text=True)
        path.write_text(text)
        verdict = "killed" if r.returncode == 1 else ("SURVIVED" if r.returncode == 0 else f"rc={r.returncode}")
        if r.returncode != 1:
            not_killed.append(f"{rel}: {old[:60]!r} -> {new[:40]!r} ({verdict})")
        print(f"[{i}/{len(todo)}] {verdict:8} {time.time() - t0:5.0f}s  {rel}: {old[:60]!r}", flush=True)
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    done = len(todo) - len(stale)
    print(f"\n{done - len(not_killed)} of {done} mutations killed; {len(stale)} stale")
    for line in not_killed + stale:
        print("  " + line)
    return 1 if not_killed or stale else 0
