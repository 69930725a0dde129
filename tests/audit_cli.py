"""The command-line half of the bad-input audit (see tests/audit.py for the library half).

Every subcommand with bad argument values, and against hostile surroundings: a read-only
directory where it writes, a corrupt, an unreadable and a read-only database where it
reads or writes results, an empty checkpoint and malformed run files where it loads a run.
Each case expects a non-zero exit that ends in ONE ``error:`` line holding the case's
needles (``clear``); a zero exit is ``silent``, a traceback or a message that does not say
what is wrong is a ``crash``. The commands run through ``tests/hostile.run_cli``: in a
child process that file permissions bind even when the tests run as root.
"""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

from hostile import corrupt_database, read_only, run_cli

# A copy-task run in seconds; training cases pass it so that an accepted bad value costs
# seconds (and shows up as silent), never minutes.
TINY_TRAIN = ["--task", "copy", "--max-steps", "2", "--no-progress", "--task-opt",
              "n_train=64", "--task-opt", "n_validation=16", "--task-opt", "n_test=16",
              "--task-opt", "length=4", "--model-opt", "d_model=16", "--model-opt",
              "num_layers=1"]
TINY_LISTOPS = ["--task", "listops", "--max-steps", "2", "--no-progress", "--task-opt",
                "n_train=64", "--task-opt", "n_validation=16", "--task-opt", "n_test=16",
                "--task-opt", "max_len=32", "--task-opt", "max_depth=3", "--model-opt",
                "d_model=16", "--model-opt", "num_layers=1"]
TINY_COMPARE = ["--mechanisms", "sdpa", "--seeds", "0", "--max-steps", "2", "--no-progress"]
TINY_BENCH = ["bench", "--mechanisms", "sdpa", "--n", "8", "--no-progress"]


def prepare(root: Path) -> dict[str, Path]:
    """The files the cases need: a good database and a finished run (made by attnlab
    itself), then broken copies of them and a read-only directory."""
    root.mkdir(parents=True, exist_ok=True)
    res = run_cli([[*TINY_BENCH, "--db", str(root / "good.db")],
                   ["train", *TINY_TRAIN, "--run-dir", str(root / "run")],
                   ["train", *TINY_LISTOPS, "--run-dir", str(root / "classify")]], cwd=root)
    for r in res:
        assert r["code"] == 0, f"fixture {r['argv']} failed: {r['err']}{r['crash'] or ''}"
    seed = root / "run" / "seed-0"
    p = {"root": root, "good_db": root / "good.db", "run": root / "run", "seed": seed,
         "classify": root / "classify" / "seed-0",
         "ro": read_only(root / "ro"), "bad_db": corrupt_database(root / "bad.db")}
    p["unreadable_db"] = root / "unreadable.db"
    shutil.copy(p["good_db"], p["unreadable_db"])
    p["unreadable_db"].chmod(0o000)
    p["ro_db"] = root / "ro-db" / "results.db"
    p["ro_db"].parent.mkdir()
    shutil.copy(p["good_db"], p["ro_db"])
    p["ro_db"].chmod(0o444)
    read_only(p["ro_db"].parent)
    for what in ("empty_ckpt", "bad_config"):
        d = root / what / "seed-0"
        shutil.copytree(seed, d)
        p[what] = d
        (d / "summary.json").unlink()  # unfinished: --resume loads its checkpoint
    (p["empty_ckpt"] / "checkpoint.pt").write_bytes(b"")
    (p["empty_ckpt"] / "best.pt").write_bytes(b"")
    (p["bad_config"] / "config.json").write_text('{"task": "copy", ')
    (root / "bad.toml").write_text("max_steps = [")
    (root / "bad.json").write_text('{"max_steps": }')
    (root / "window.toml").write_text('mechanisms = [{name = "sliding_window", window = -1}]\n'
                                      'lengths = [8]\n')
    (root / "notdir").write_text("a file")
    return p


def cases(p: dict[str, Path]) -> list[tuple[list[str], tuple[str, ...]]]:
    """(argv, needles) for every case; every one must be refused."""
    ro, r = str(p["ro"]), p["root"]
    good, bad, unread, rodb = (str(p[k]) for k in ("good_db", "bad_db", "unreadable_db",
                                                   "ro_db"))
    seed, empty, cls = str(p["seed"]), str(p["empty_ckpt"]), str(p["classify"])
    arguments = [
        (["info", "flsh"], ("flsh", "did you mean")),
        (["verify", "flsh"], ("flsh",)),
        (["verify", "--n", "0"], ("n",)),
        (["verify", "--head-dim", "0"], ("head",)),
        (["demo", "--n", "0"], ("n",)),
        (["demo", "--batch", "0"], ("batch",)),
        (["demo", "--mechanisms", "nope"], ("nope",)),
        (["list", "--family", "exakt"], ("exakt",)),
        ([*TINY_BENCH[:1], "--mechanisms", "sdpaa", "--n", "8"], ("did you mean 'sdpa'",)),
        (["bench", "--profile", "quik"], ("quick",)),
        (["bench", "--mechanisms", "sdpa", "--n", "0"], ("length",)),
        (["bench", "--mechanisms", "sdpa", "--n", "-8"], ("length",)),
        (["bench", "--mechanisms", "sdpa", "--n", "8", "--batch", "0"], ("batch",)),
        (["bench", "--mechanisms", "sdpa", "--n", "8", "--heads", "0"], ("heads",)),
        (["bench", "--mechanisms", "sdpa", "--n", "8", "--head-dim", "0"], ("head_dim",)),
        (["bench", "--mechanisms", "sdpa", "--n", "8", "--dtype", "float17"], ("float17",)),
        (["bench", "--mechanisms", "sdpa", "--n", "8", "--threads", "0"], ("threads",)),
        (["bench", "--mechanisms", "sdpa", "--n", "8", "--timeout", "-1"], ("timeout",)),
        (["bench", "--mechanisms", "sdpa", "--n", "8", "--mem-cap-gib", "0"], ("mem_cap",)),
        (["bench", "--mechanisms", "sliding_window:window=-1", "--n", "8"], ("window",)),
        (["bench", "--mechanisms", "sliding_window:wndow=3", "--n", "8"], ("wndow",)),
        (["bench", "--sweep", str(r / "nope.toml")], ("nope.toml",)),
        (["bench", "--sweep", str(r / "bad.toml")], ("bad.toml", "TOML")),
        (["bench", "--sweep", str(r / "window.toml")], ("window",)),
        (["bench", "show", "99", "--db", good], ("99",)),
        (["bench", "show", "abc", "--db", good], ("abc",)),
        (["bench", "compare", "1", "99", "--db", good], ("99",)),
        (["bench", "export", "--format", "parquet", "--db", good], ("--out",)),
        (["bench", "runs", "--db", str(r / "missing.db")], ("missing.db",)),
        (["train", "--max-steps", "2"], ("--task",)),
        (["train", "--task", "copi"], ("copi", "did you mean")),
        (["train", *TINY_TRAIN, "--mechanism", "flsh"], ("flsh",)),
        (["train", *TINY_TRAIN, "--max-steps", "0"], ("max_steps",)),
        (["train", *TINY_TRAIN, "--batch-size", "0"], ("batch_size",)),
        (["train", *TINY_TRAIN, "--lr", "-1"], ("lr",)),
        (["train", *TINY_TRAIN, "--lr", "nan"], ("lr",)),
        (["train", *TINY_TRAIN, "--seeds", "0", "0"], ("seeds",)),
        (["train", *TINY_TRAIN, "--time-budget", "-1"], ("time_budget",)),
        (["train", *TINY_TRAIN, "--set", "lr"], ("--set",)),
        (["train", *TINY_TRAIN, "--set", "nonsense=1"], ("nonsense",)),
        (["train", *TINY_TRAIN, "--task-opt", "lenght=3"], ("lenght", "length")),
        (["train", *TINY_TRAIN, "--task-opt", "length=-1"], ("length",)),
        (["train", *TINY_TRAIN, "--model-opt", "d_model=0"], ("d_model",)),
        (["train", *TINY_TRAIN, "--mechanism", "sliding_window", "--mech-opt", "window=-1"],
         ("window",)),
        (["train", *TINY_TRAIN, "--device", "tpu"], ("tpu",)),
        (["train", *TINY_TRAIN, "--model", "unet"], ("unet",)),
        (["train", *TINY_TRAIN, "--data-dir", str(r)], ("--data-dir",)),
        (["train", "--config", str(r / "nope.toml")], ("nope.toml",)),
        (["train", "--config", str(r / "bad.json")], ("bad.json", "JSON")),
        (["train", "--config", str(r / "bad.toml")], ("bad.toml", "TOML")),
        (["generate", str(r / "nope")], ("nope",)),
        (["generate", seed], ("language model",)),
        (["inpaint", seed], ("inpainting",)),
        (["compare", *TINY_COMPARE, "--mechanisms", "flsh"], ("flsh",)),
        (["compare", *TINY_COMPARE, "--profile", "quik"], ("quick",)),
        (["compare", *TINY_COMPARE, "--task", "copi"], ("copi",)),
        (["compare", *TINY_COMPARE, "--seeds", "0", "0"], ("seeds",)),
        (["compare", *TINY_COMPARE, "--max-steps", "0"], ("max_steps",)),
        (["compare", *TINY_COMPARE, "--jobs", "0"], ("jobs",)),
        (["compare", *TINY_COMPARE, "--advise", "abc"], ("--advise",)),
        (["compare", *TINY_COMPARE, "--advise", "0"], ("--advise",)),
        (["report", str(r / "nothing")], ("nothing",)),
        (["show-attention", "--checkpoint", str(r / "nothing"), "--text", "1"], ("nothing",)),
        (["show-attention", "--checkpoint", cls, "--text", "1", "--layer", "9"],
         ("--layer",)),
    ]
    surroundings = [
        ([*TINY_BENCH, "--db", f"{ro}/new.db"], (ro,)),
        ([*TINY_BENCH, "--db", f"{r}/notdir/x.db"], ("notdir",)),
        ([*TINY_BENCH, "--db", bad], (bad, "corrupt")),
        ([*TINY_BENCH, "--db", unread], (unread,)),
        ([*TINY_BENCH, "--db", rodb], (rodb, "read-only")),
        (["bench", "plot", "--db", good, "--out", f"{ro}/plots"], (ro,)),
        (["bench", "export", "--db", good, "--out", f"{ro}/x.csv"], (ro,)),
        *[(["bench", sub, "--db", db], (db,)) for sub in ("runs", "show", "export", "plot")
          for db in (bad, unread)],
        (["bench", "compare", "1", "1", "--db", bad], (bad,)),
        (["train", *TINY_TRAIN, "--run-dir", f"{ro}/run"], (ro,)),
        (["train", *TINY_TRAIN, "--run-dir", f"{r}/t-ro-db", "--db", f"{ro}/t.db"], (ro,)),
        (["train", *TINY_TRAIN, "--run-dir", f"{r}/t-bad-db", "--db", bad], (bad,)),
        (["train", *TINY_TRAIN, "--run-dir", str(p["empty_ckpt"].parent), "--resume"],
         ("checkpoint.pt",)),
        (["train", *TINY_TRAIN, "--run-dir", str(p["bad_config"].parent), "--resume"],
         ("config.json",)),
        (["generate", empty], ("best.pt",)),
        (["inpaint", empty], ("best.pt",)),
        (["show-attention", "--checkpoint", empty, "--text", "1"], ("best.pt",)),
        (["show-attention", "--checkpoint", str(p["bad_config"]), "--text", "1"],
         ("config.json",)),
        (["show-attention", "--checkpoint", cls, "--text", "1", "--out", f"{ro}/a.png"],
         (ro,)),
        (["compare", *TINY_COMPARE, "--out", f"{ro}/cmp"], (ro,)),
    ]
    return arguments + surroundings


def classify(res: dict, needles: tuple[str, ...]) -> tuple[str, str]:
    """clear / silent / crash for one refused case (see the module docstring)."""
    if res["crash"] is not None or "Traceback" in res["out"] + res["err"]:
        return "crash", (res["crash"] or res["err"])[-400:]
    if res["code"] == 0:
        return "silent", "exit 0"
    lines = [ln for ln in res["err"].splitlines() if ln.strip()]
    last = lines[-1] if lines else ""
    if "error:" not in last:
        return "crash", f"exit {res['code']}, no closing error line: {res['err'][-300:]!r}"
    missing = [n for n in needles if n.lower() not in last.lower()]
    if missing:
        return "crash", f"vague (no {missing}): {last}"
    return "clear", ""


def audit(root: Path) -> list[tuple[list[str], str, str]]:
    p = prepare(root)
    todo = cases(p)
    results = run_cli([argv for argv, _ in todo], cwd=root, timeout=900)
    return [(argv, *classify(res, needles)) for (argv, needles), res in zip(todo, results,
                                                                          strict=True)]


def main() -> None:
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        out = audit(Path(d) / "audit")
        for path in Path(d).rglob("*"):  # let the cleanup remove what was made read-only
            path.chmod(0o755)
    counts = Counter(kind for _, kind, _ in out)
    print(f"command line: {len(out)} cases: " + ", ".join(
        f"{counts.get(k, 0)} {k}" for k in ("clear", "silent", "crash")))
    for argv, kind, detail in out:
        if kind != "clear":
            print(f"  {kind:6s} attnlab {' '.join(argv)}: {detail}")
    print(json.dumps(dict(counts)))


if __name__ == "__main__":
    main()
