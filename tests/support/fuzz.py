"""Coverage-guided fuzzing of the sans-IO core with atheris (libFuzzer for Python).

    PYTHONPATH=tests python3 -m support.fuzz run TARGET [--seconds S] [--runs N]
    PYTHONPATH=tests python3 -m support.fuzz campaign [--seconds-per-target S] [--rounds R]
    PYTHONPATH=tests python3 -m support.fuzz merge TARGET      # minimise into the repo corpus
    PYTHONPATH=tests python3 -m support.fuzz coverage          # coverage.py over the corpus
    PYTHONPATH=tests python3 -m support.fuzz seed              # (re)write the seed inputs

Targets are in ``support.fuzz_targets``.  The repository keeps a small, minimised corpus
in tests/fuzz_corpus/TARGET/ (``seed-*``: hand-made valid conversations; ``cov-*``: the inputs
a campaign found that reach code the seeds do not, minimised by ``merge``; ``crash-*``:
inputs that once failed), all replayed by tests/test_fuzz_corpus.py.
A run grows a working corpus under $XDG_CACHE_HOME/pyscsi-target/fuzz/TARGET (the repo
corpus is read, never written, except by ``merge`` and ``seed``).  ``campaign`` runs every
target in turn and appends each run's input count to stats.jsonl there; a crash stops
that run, is copied to the repo corpus as ``crash-<sha1>`` and the campaign goes on.

Why atheris: it instruments Python bytecode for libFuzzer's coverage feedback, so the
mutations learn the BHS layout, the key=value grammar and the CDB fields from what the
code compares; it runs on CPython 3.11 from a PyPI wheel.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]
CORPUS = TESTS / "fuzz_corpus"
TARGET_NAMES = ("pdu", "login", "text", "connection", "scsi")
MAX_LEN = 4096


def work_dir(target: str) -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    path = base / "pyscsi-target" / "fuzz" / target
    path.mkdir(parents=True, exist_ok=True)
    return path


def _fuzz_main(target: str, libfuzzer_args: list[str]) -> None:
    """In the fuzzing process: instrument the package, then hand over to libFuzzer."""
    import atheris

    logging.disable(logging.CRITICAL)  # refusals are logged; at 10^4 inputs/s that is noise
    with atheris.instrument_imports(include=["pyscsi_target"]):
        from support import fuzz_targets
    fn = fuzz_targets.TARGETS[target]

    def one(data: bytes) -> None:
        fn(data)

    atheris.Setup([_self_command(target), *libfuzzer_args], one)
    atheris.Fuzz()


def _self_command(target: str) -> str:
    """An executable that runs this target's fuzzing process: libFuzzer's -merge runs its
    argv[0] again as a child (with its own flags), and a .py module is no such program."""
    path = work_dir(target) / "fuzz-child"
    text = (f"#!/bin/sh\ncd {shlex.quote(str(TESTS.parent))} || exit 1\n"
            f"PYTHONPATH={shlex.quote(str(TESTS))} exec {shlex.quote(sys.executable)} -m support.fuzz _child "
            f"{target} \"$@\"\n")
    if not path.exists() or path.read_text() != text:
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        tmp.write_text(text)
        tmp.chmod(0o755)
        os.replace(tmp, path)
    return str(path)


_DONE = re.compile(rb"Done (\d+) runs in (\d+) second")
_PROGRESS = re.compile(rb"^#(\d+)\s", re.M)
_COV = re.compile(rb"cov: (\d+) ft: (\d+)")


def run(target: str, *, seconds: int = 60, runs: int = -1, quiet: bool = True,
        keep: Path | None = None) -> dict[str, object]:
    """One libFuzzer run of ``target`` in a child process; a summary (inputs run, coverage
    counters, the crash file if one was found, copied into ``keep``: by default the
    target's repo corpus, where tests/test_fuzz_corpus.py replays it)."""
    work = work_dir(target)
    crashes = work / "crashes"
    crashes.mkdir(exist_ok=True)
    seeds = CORPUS / target
    args = [str(work / "corpus"), str(seeds), f"-max_total_time={seconds}", f"-runs={runs}",
            f"-max_len={MAX_LEN}", "-timeout=10", "-rss_limit_mb=2048", "-print_final_stats=1",
            f"-artifact_prefix={crashes}/"]
    (work / "corpus").mkdir(exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(TESTS)}
    before = set(os.listdir(crashes))
    started = time.time()
    proc = subprocess.run([sys.executable, "-m", "support.fuzz", "_child", target, *args], cwd=TESTS.parent,
                          env=env, capture_output=True, timeout=seconds + 600)
    out = proc.stderr + proc.stdout
    done = _DONE.findall(out)
    progress = _PROGRESS.findall(out)
    inputs = int(done[-1][0]) if done else (int(progress[-1]) if progress else 0)
    cov = _COV.findall(out)
    new_crashes = sorted(n for n in set(os.listdir(crashes)) - before if not n.endswith(".log"))
    summary: dict[str, object] = {
        "target": target, "inputs": inputs, "seconds": round(time.time() - started, 1),
        "cov": int(cov[-1][0]) if cov else 0, "ft": int(cov[-1][1]) if cov else 0,
        "exit": proc.returncode, "crashes": new_crashes, "when": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    (work / "last-run.log").write_bytes(out[-200_000:])
    for name in new_crashes:
        (crashes / f"{name}.log").write_bytes(out[-20_000:])  # the traceback libFuzzer printed
        data = (crashes / name).read_bytes()
        kept = (keep or CORPUS / target) / f"crash-{hashlib.sha1(data).hexdigest()}"
        kept.write_bytes(data)
        summary.setdefault("kept", []).append(str(kept))  # type: ignore[union-attr]
        if not quiet:
            sys.stderr.write(out.decode(errors="replace")[-4000:])
    with open(work.parent / "stats.jsonl", "a") as f:
        f.write(json.dumps(summary) + "\n")
    return summary


def campaign(seconds_per_target: int, rounds: int, targets: list[str]) -> None:
    for r in range(rounds):
        for t in targets:
            s = run(t, seconds=seconds_per_target)
            print(f"round {r} {json.dumps(s)}", flush=True)


def merge(target: str) -> None:
    """Minimise the working corpus into the repo corpus: the seeds and crash files stay, and
    libFuzzer's -set_cover_merge=1 adds a small set of inputs reaching the coverage they do not."""
    work = work_dir(target)
    fresh = work / "merged"
    shutil.rmtree(fresh, ignore_errors=True)
    fresh.mkdir()
    repo = CORPUS / target
    kept = [p for p in repo.iterdir() if p.name.startswith(("seed-", "crash-"))]
    for path in kept:
        shutil.copy(path, fresh / path.name)
    env = {**os.environ, "PYTHONPATH": str(TESTS)}
    subprocess.run([sys.executable, "-m", "support.fuzz", "_child", target, str(fresh), str(repo),
                    str(work / "corpus"), "-set_cover_merge=1", f"-max_len={MAX_LEN}", "-timeout=10"], cwd=TESTS.parent,
                   env=env, check=True, capture_output=True)
    for old in repo.iterdir():
        if old not in kept:
            old.unlink()
    for new in fresh.iterdir():
        if not new.name.startswith(("seed-", "crash-")):  # an input the merge chose: named for why
            shutil.copy(new, repo / f"cov-{new.name}")


def coverage_report(include: str = "pyscsi_target/iscsi/*,pyscsi_target/scsi/*") -> None:
    """Replay the repo corpus (and the working corpora, if any) under coverage.py."""
    import coverage

    cov = coverage.Coverage(branch=True, include=[f"{TESTS.parent}/{p}" for p in include.split(",")])
    logging.disable(logging.CRITICAL)
    cov.start()
    from support import fuzz_targets

    counts = {}
    for target, fn in fuzz_targets.TARGETS.items():
        files = [p for p in (CORPUS / target).iterdir()]
        work = work_dir(target) / "corpus"
        files += [p for p in work.iterdir()] if work.is_dir() else []
        for path in files:
            with contextlib.suppress(Exception):
                fn(path.read_bytes())
        counts[target] = len(files)
    cov.stop()
    print(json.dumps({"inputs replayed": counts}))
    cov.report(show_missing=False, skip_covered=False)


def write_seeds() -> None:
    from support import fuzz_targets

    for target in TARGET_NAMES:
        folder = CORPUS / target
        folder.mkdir(parents=True, exist_ok=True)
        for data in fuzz_targets.seeds(target):
            (folder / f"seed-{hashlib.sha1(data).hexdigest()[:16]}").write_bytes(data)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "_child":
        _fuzz_main(argv[1], argv[2:])
        return 0
    p = argparse.ArgumentParser(prog="python3 -m support.fuzz")
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("target", choices=TARGET_NAMES)
    r.add_argument("--seconds", type=int, default=60)
    r.add_argument("--runs", type=int, default=-1)
    c = sub.add_parser("campaign")
    c.add_argument("--seconds-per-target", type=int, default=600)
    c.add_argument("--rounds", type=int, default=1)
    c.add_argument("--targets", default=",".join(TARGET_NAMES))
    m = sub.add_parser("merge")
    m.add_argument("target", choices=TARGET_NAMES)
    sub.add_parser("coverage")
    sub.add_parser("seed")
    args = p.parse_args(argv)
    if args.cmd == "run":
        print(json.dumps(run(args.target, seconds=args.seconds, runs=args.runs, quiet=False)))
    elif args.cmd == "campaign":
        campaign(args.seconds_per_target, args.rounds, args.targets.split(","))
    elif args.cmd == "merge":
        merge(args.target)
    elif args.cmd == "coverage":
        coverage_report()
    elif args.cmd == "seed":
        write_seeds()
    return 0


if __name__ == "__main__":
    sys.exit(main())
