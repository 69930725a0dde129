"""Run a sweep: every point of a grid in its own child process, stored as it finishes.

Children are forked from a *forkserver* that has imported torch and attnlab once, so a
point costs a fork (milliseconds), not an interpreter start-up (about 1.5 s), while its
peak memory is still its own. A child is capped in address space (``RLIMIT_AS``, CPU
only) and in time; a crash, an out-of-memory or a hang costs only that point, which is
stored with its status (``oom``, ``timeout``, ``error``) and never as a number. After an
``oom`` or ``timeout`` the longer lengths of the same series are stored as ``skipped``.

Resume: starting the same grid again on the same machine continues the latest unfinished
run (points already stored are skipped; ``UNIQUE(run_id, point_key)`` makes a double
count impossible). The process measuring a run holds it (``store.locks``, an OS
lock that dies with the process): a second process that would resume it is refused.
A mechanism's correctness gate runs in its first child; if it fails, every point of that
mechanism and configuration is stored ``FAILED`` without running.

Roof: the matmul roof (:func:`attnlab.bench.machine.matmul_roof_gflops`, on the grid's
threads, as the points) is measured when a run starts, when it resumes and when it ends;
the best sample is the run's roof (:mod:`attnlab.bench.roof`). Each point's fraction is
checked against the best roof known when it is stored, and all of them are recomputed
against the final best when the run ends (and on resume), so a stored fraction is never
above 1, an interrupted run's included: one above 1 is stored as NULL with a message.
"""

from __future__ import annotations

import math
import multiprocessing as mp
import os
import resource
import signal
import time
from collections.abc import Callable
from dataclasses import asdict

from attnlab.bench import machine as mach
from attnlab.bench.grid import Grid, Point
from attnlab.bench.measure import measure_point
from attnlab.bench.roof import best_roof, check_fraction, record_roof, with_roof_note
from attnlab.bench.store import Store
from attnlab.registry import get
from attnlab.util.progress import make_progress

__all__ = ["run_sweep"]

_CTX = None


def _context():
    global _CTX
    if _CTX is None:
        _CTX = mp.get_context("forkserver")
        _CTX.set_forkserver_preload(["attnlab", "attnlab.bench.warm"])
    return _CTX


def _child(conn, point: dict, cfg: dict) -> None:
    """Child process body: cap memory, measure, send one dict back."""
    try:
        if cfg.get("mem_cap_bytes") and point["device"] == "cpu":
            cap = cfg["mem_cap_bytes"]
            resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
        if cfg.get("_test_hook"):  # tests only: make a child fail on purpose
            _test_hooks(cfg["_test_hook"], point)

        res = measure_point(point, cfg)
    except MemoryError as e:
        res = {"status": "oom", "message": f"MemoryError: {e}"[:500]}
    except RuntimeError as e:
        text = str(e)
        oom = any(w in text.lower() for w in ("out of memory", "alloc", "can't allocate"))
        res = {"status": "oom" if oom else "error", "message": text[:500]}
    except Exception as e:  # recorded, never a number
        res = {"status": "error", "message": f"{type(e).__name__}: {e}"[:500]}
    conn.send(res)
    conn.close()


def _test_hooks(hook: dict, point: dict) -> None:
    """Deliberate failures for the harness's own tests, chosen by mechanism and length."""
    what = hook.get(f"{point['label']}@{point['N']}")
    if what == "raise":
        raise ValueError("deliberate failure (test hook)")
    if what == "hang":
        time.sleep(3600)
    if what == "allocate":
        _hog = bytearray(hook["bytes"])  # noqa: F841 - past RLIMIT_AS: MemoryError
    if what == "die":
        os.kill(os.getpid(), signal.SIGKILL)
    if what == "break_gate":  # a wrong mechanism: its output shifted by 0.1

        cls = get(point["mechanism"]).cls
        attend = cls._attend

        def broken(self, *args):
            out, w = attend(self, *args)
            return out + 0.1, w

        cls._attend = broken


def _run_child(point: Point, cfg: dict, timeout: float) -> dict:
    ctx = _context()
    parent, child = ctx.Pipe(duplex=False)
    d = asdict(point)
    d["hparams"] = dict(point.hparams)
    proc = ctx.Process(target=_child, args=(child, d, cfg), daemon=True)
    proc.start()
    child.close()
    res = None
    try:
        if parent.poll(timeout):
            try:
                res = parent.recv()
            except EOFError:  # died mid-way (e.g. killed by the kernel's OOM killer)
                res = None
        else:
            res = {"status": "timeout", "message": f"no result within {timeout:g} s"}
    finally:
        proc.join(2)
        if proc.is_alive():
            proc.kill()
            proc.join()
        parent.close()
    if res is None:
        code = proc.exitcode
        killed = code is not None and code < 0 and -code == signal.SIGKILL
        res = {"status": "oom" if killed else "error",
               "message": f"child exited with code {code}"
                          + (" (SIGKILL: most likely the kernel's OOM killer)" if killed else "")}
    return res


def _row(point: Point, res: dict, roof: float | None, wall: float) -> dict:
    row = {**asdict(point), "hparams": dict(point.hparams), **res, "wall_s": wall}
    if res.get("status") == "ok" and res.get("flops") and res.get("time_s"):
        row["gflops_per_s"] = res["flops"] / res["time_s"] / 1e9
        row["roof_fraction"], note = check_fraction(row["gflops_per_s"], roof)
        row["message"] = with_roof_note(res.get("message"), note)
    if res.get("status") != "ok":  # a point that did not pass is never a number
        for k in ("time_s", "time_iqr_s", "runs", "peak_mem_bytes", "flops", "gflops_per_s",
                  "roof_fraction", "error", "timed_s", "flops_method"):
            row[k] = None
    return row


def _sample_roof(grid: Grid, store: Store, run_id: int, when: str) -> float | None:
    """Measure the roof now (``resume`` or ``end``), add it to the run's machine JSON and
    recompute the stored fractions against the best sample; returns that best."""
    machine = record_roof(store.run(run_id)["machine"], when,
                          mach.matmul_roof_gflops(grid.threads, grid.device))
    store.set_machine(run_id, machine)
    roof = best_roof(machine)
    store.set_roof_fractions(run_id, roof)
    return roof


def _gate_record(r: dict) -> dict:
    return {"passed": r["status"] != "FAILED", "gate_error": r.get("gate_error"),
            "gate_tol": r.get("gate_tol"), "message": r.get("message") or ""}


def _gate_key(p: Point) -> tuple:
    return (p.mechanism, p.hparams, p.head_dim, p.dtype, p.causal, p.device)


def run_sweep(grid: Grid, store: Store, *, command: str = "", resume: bool = True,
              progress: bool = True, console=None, test_hook: dict | None = None,
              on_row: Callable[[dict], None] | None = None) -> int:
    """Measure every point of ``grid`` not yet in the database; returns the run id."""
    points = grid.points()
    run_id, ram_gib = _start_run(grid, store, command, resume, len(points))
    try:
        return _sweep(grid, store, run_id, points, ram_gib, progress=progress,
                      console=console, test_hook=test_hook, on_row=on_row)
    finally:
        store.locks.release(run_id)


def _start_run(grid: Grid, store: Store, command: str, resume: bool,
               n_points: int) -> tuple[int, float]:
    """The run this process measures, claimed, and the machine's RAM in GiB: the latest
    unfinished run of the same grid on the same machine (``resume``) or a new one.
    RunLockError when another process is measuring that run: two sweeps on the same cores
    would spoil each other's timings."""
    machine = mach.describe(grid.device)
    fp = mach.fingerprint(machine, grid.threads)
    digest = grid.digest()
    with store.locks.choosing():
        run_id = store.resumable(digest, fp) if resume else None
        if run_id is not None:
            store.locks.claim(run_id)
            store.set_status(run_id, "running")
            _sample_roof(grid, store, run_id, "resume")
            return run_id, machine["ram_gib"]
        machine = record_roof(machine, "start",
                              mach.matmul_roof_gflops(grid.threads, grid.device))
        run_id = store.new_run(grid=grid.to_json(), digest=digest, machine=machine,
                               fingerprint=fp, versions=mach.versions(),
                               commit=mach.git_commit(), command=command,
                               profile=grid.profile, points_total=n_points)
        store.locks.claim(run_id)
        return run_id, machine["ram_gib"]


def _history(stored: list[dict]) -> tuple[dict, dict, dict]:
    """What a resumed run's stored points say about the rest: the series whose longer
    lengths are skipped (and why), the gates already run, the wall times of ok points."""
    dead: dict[tuple, str] = {}  # series -> why longer lengths are skipped
    gates: dict[tuple, dict] = {}  # gate key -> {"passed", "gate_error", "gate_tol", ...}
    walls: dict[tuple, list] = {}  # series -> [(N, wall seconds)] of its ok points
    for r in stored:
        p = _point(r)
        if r["status"] == "ok":
            walls.setdefault(p.series, []).append((p.N, r["wall_s"]))
        if r["status"] in ("oom", "timeout"):
            dead.setdefault(p.series, f"after {r['status']} at N={r['N']}")
        if r.get("gate_error") is not None or r["status"] == "FAILED":
            gates.setdefault(_gate_key(p), _gate_record(r))
    return dead, gates, walls


def _sweep(grid: Grid, store: Store, run_id: int, points: list[Point], ram_gib: float, *,
           progress: bool, console, test_hook: dict | None,
           on_row: Callable[[dict], None] | None) -> int:
    roof = best_roof(store.run(run_id)["machine"])
    done = store.done_keys(run_id)
    dead, gates, walls = _history(store.measurements(run_id))
    mem_cap = int((grid.mem_cap_gib or 0.9 * ram_gib) * 2**30)
    cfg = {"threads": grid.threads, "min_run_time": grid.min_run_time,
           "error_max_n": grid.error_max_n, "mem_cap_bytes": mem_cap,
           "_test_hook": test_hook}
    todo = [p for p in points if p.key not in done]
    bar = _Bar(progress, console, len(points), len(points) - len(todo))
    old = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        with bar:
            for p in todo:
                bar.describe(p)
                t0 = time.perf_counter()
                why = p.unsupported()
                g = gates.get(_gate_key(p))
                if why:
                    res = {"status": "unsupported", "message": why}
                elif p.series in dead:
                    res = {"status": "skipped", "message": dead[p.series]}
                elif (t := _predicted_wall(walls.get(p.series, []), p.N)) > grid.timeout_s:
                    res = {"status": "skipped", "message": f"predicted {t:.0f} s from the "
                           f"shorter lengths > timeout {grid.timeout_s:g} s"}
                elif g is not None and not g["passed"]:  # failed for this configuration
                    res = {"status": "FAILED", "message": g["message"],
                           "gate_error": g["gate_error"], "gate_tol": g["gate_tol"]}
                else:
                    res = _run_child(p, {**cfg, "gate": g is None}, grid.timeout_s)
                    if g is None and (res.get("gate_error") is not None
                                      or res["status"] == "FAILED"):
                        g = gates[_gate_key(p)] = _gate_record(res)
                    if g is not None and res["status"] != "FAILED":  # the gate it passed
                        res.update(gate_error=g["gate_error"], gate_tol=g["gate_tol"])
                    if res["status"] in ("oom", "timeout"):
                        dead[p.series] = f"after {res['status']} at N={p.N}"
                row = _row(p, res, roof, time.perf_counter() - t0)
                if row["status"] == "ok":
                    walls.setdefault(p.series, []).append((p.N, row["wall_s"]))
                store.add(run_id, p.key, row)
                if on_row is not None:
                    on_row(row)
                bar.advance()
        _sample_roof(grid, store, run_id, "end")
        store.set_status(run_id, "done")
    except KeyboardInterrupt:
        store.set_status(run_id, "interrupted")
        raise
    finally:
        signal.signal(signal.SIGTERM, old)
    return run_id


def _predicted_wall(history: list, n: int) -> float:
    """Seconds a point at length ``n`` will take, extrapolated from the series' two longest
    ok points (local exponent, at least 1); 0 without two points. Saves running a point
    that would only time out: it is stored as ``skipped`` with the prediction."""
    if len(history) < 2:
        return 0.0
    (n1, w1), (n2, w2) = sorted(history)[-2:]
    if n <= n2 or w1 <= 0 or w2 <= 0 or n1 == n2:
        return 0.0
    a = max(1.0, math.log(w2 / w1) / math.log(n2 / n1))
    return w2 * (n / n2) ** a


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def _point(r: dict) -> Point:
    return Point(r["mechanism"], r["label"], tuple(sorted(r["hparams"].items())), r["N"],
                 r["batch"], r["heads"], r["head_dim"], r["dtype"], r["pass_"],
                 bool(r["causal"]), r["device"])


class _Bar:
    """A rich progress bar with ETA (or nothing, when ``enabled`` is false)."""

    def __init__(self, enabled: bool, console, total: int, completed: int) -> None:
        self.progress = None
        if enabled:
            self.progress = make_progress(console=console)
            self.task = self.progress.add_task("bench", total=total, completed=completed)

    def __enter__(self):
        if self.progress:
            self.progress.__enter__()
        return self

    def __exit__(self, *exc):
        if self.progress:
            self.progress.__exit__(*exc)

    def describe(self, p: Point) -> None:
        if self.progress:
            self.progress.update(self.task, description=f"{p.label} N={p.N} {p.pass_}"
                                 f"{' causal' if p.causal else ''}")

    def advance(self) -> None:
        if self.progress:
            self.progress.advance(self.task)
