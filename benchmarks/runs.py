"""Training runs of the benchmarks, cached: one call of our trainer (or of the reference loop) with its
monitor after every epoch, its result in ``run.json``, reused by a later benchmark with the same resolved
config, monitor and implementation; several runs at once in single-threaded processes; DDP runs under
``torchrun``.

A run is one call of :func:`reid_ssl.train.train` (``impl="ours"``) or of
:func:`benchmarks.reference_loop.reference_loop` (``impl="lightly"``), with a monitor evaluated after every
epoch and once before training ("epoch 0": the seed's freshly initialised backbone; ``train`` seeds and
builds the model the same way). Each finished run leaves ``run.json`` in its folder under ``runs/bench/``; a
later benchmark with the same resolved config, monitor and implementation reuses it (``--fresh`` ignores it),
so an interrupted full run resumes and ``bench_peer_lightly`` reuses the "ours" runs of ``bench_efficiency``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks import report
from benchmarks.machine import REPO, set_threads
from benchmarks.monitors import KnnMonitor, TimedMonitor, build_monitor, initial_metrics
from benchmarks.presets import METRICS, WORK_DIR, MonitorSpec, Preset, with_overrides
from reid_ssl.config import FILE_CADENCE_KEYS, Config, from_dict, to_dict
from reid_ssl.fileio import write_json


def run_key(cfg: Config, spec: MonitorSpec, impl: str, linear: bool, ddp: int = 1) -> str:
    """A hash of everything that determines a run's result (not its output folder)."""
    from reid_ssl import __version__

    d = to_dict(cfg)
    # where and how often a run writes files does not change what it learns: changing those settings (a new
    # default, say) must not discard finished runs
    for key in ("train.out_dir", *FILE_CADENCE_KEYS):
        section, name = key.split(".")
        d[section].pop(name)
    monitor = {k: v for k, v in asdict(spec).items() if k != "split" or v}  # runs from before `split` keep keys
    blob = {"config": d, "monitor": monitor, "impl": impl, "linear": linear, "ddp": ddp, "reid_ssl": __version__}
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()


def run_dir(work: Path, cfg: Config, spec: MonitorSpec, impl: str, label: str, key: str) -> Path:
    return work / f"{spec.dataset}-{label}-{impl}-s{cfg.train.seed}-{key[:10]}"


def read_run_metrics(out_dir: Path) -> tuple[dict[int, dict[str, float]], dict[int, float]]:
    """Per-epoch monitor values (``eval_*`` records) and per-epoch mean training loss from metrics.jsonl.

    Loss records carry the 0-based epoch they were logged in; eval records the number of finished epochs.
    """
    evals: dict[int, dict[str, float]] = {}
    losses: dict[int, list[float]] = {}
    path = out_dir / "metrics.jsonl"
    for line in path.read_text().splitlines() if path.is_file() else []:
        r = json.loads(line)
        if "loss" in r:
            losses.setdefault(int(r["epoch"]) + 1, []).append(float(r["loss"]))
        scores = {k[5:]: float(v) for k, v in r.items() if k.startswith("eval_")}
        if scores:
            evals[int(r["epoch"])] = scores
    return evals, {e: float(np.mean(v)) for e, v in losses.items()}


def assemble_run(
    cfg: Config,
    impl: str,
    label: str,
    initial: dict[str, float],
    evals: dict[int, dict[str, float]],
    losses: dict[int, float],
    seconds: float,
    monitor_seconds: float | None,
    images: int,
) -> dict[str, Any]:
    """One run's result: curves per metric over epochs 0..E (0 = before training), loss, timings."""
    epochs = [0, *sorted(evals)]
    names = sorted(initial)
    curves = {n: [initial[n], *(evals[e].get(n, math.nan) for e in epochs[1:])] for n in names}
    train_s = seconds - (monitor_seconds or 0.0)
    return {
        "impl": impl,
        "method": label,
        "seed": cfg.train.seed,
        "epochs": epochs,
        "metrics": curves,
        "loss": [losses.get(e) for e in epochs[1:]],
        "seconds": round(seconds, 2),
        "monitor_seconds": None if monitor_seconds is None else round(monitor_seconds, 2),
        "train_images_per_second": images / train_s if train_s > 0 else None,
    }


def run_training(
    cfg: Config,
    spec: MonitorSpec,
    label: str,
    impl: str = "ours",
    work: Path = WORK_DIR,
    fresh: bool = False,
    keep_checkpoint: bool = False,
    linear: bool = False,
    processes: int = 1,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Train one run (``impl="ours"``: :func:`reid_ssl.train.train`; ``"lightly"``: :func:`reference_loop`).

    With ``processes > 1`` our trainer runs under ``torchrun`` (gloo on CPU, one thread per process) and
    ``cfg.train.batch_size`` is the per-process batch.

    Returns the result of :func:`assemble_run`, plus ``linear`` (Fashion-MNIST linear probe of the final
    backbone) when asked. A finished identical run found under ``work`` is reused (``"cached": true``).
    """
    if processes > 1 and impl != "ours":
        raise ValueError("only our trainer runs on several processes")
    key = run_key(cfg, spec, impl, linear, processes)
    out = run_dir(work, cfg, spec, impl, label, key)
    done = out / "run.json"
    if done.is_file() and not fresh:
        result = json.loads(done.read_text())
        if result.get("key") == key:
            log(f"  {label} ({impl}) seed {cfg.train.seed}: reused {done}")
            return {**result, "cached": True}
    if out.exists():
        shutil.rmtree(out)
    cfg = with_overrides(cfg, [f"train.out_dir={out}"])
    monitor = build_monitor(spec)
    ref: dict[str, Any] | None = None
    initial = initial_metrics(cfg, spec, monitor)
    timed = TimedMonitor(monitor)
    t = time.perf_counter()
    if impl == "ours" and processes > 1:
        out.mkdir(parents=True, exist_ok=True)
        spec_file = write_json(out / "worker_spec.json", {"config": to_dict(cfg), "monitor": asdict(spec)})
        torchrun("benchmarks.runs", ["--ddp-worker", str(spec_file)], processes)
        worker = json.loads((out / "worker.json").read_text())
        steps, timed.seconds = int(worker["steps"]), float(worker["monitor_seconds"])
        evals, losses = read_run_metrics(out)
    elif impl == "ours":
        from reid_ssl.train.loop import train

        summary = train(cfg, monitor=timed, progress=False)
        steps = int(summary["steps"])
        evals, losses = read_run_metrics(out)
    elif impl == "lightly":
        from benchmarks.reference_loop import reference_loop

        ref = reference_loop(cfg, monitor=timed)
        steps = ref["steps"]
        evals, losses = ref["evals"], ref["epoch_loss"]
        out.mkdir(parents=True, exist_ok=True)
    else:
        raise KeyError(f"unknown implementation {impl!r} (ours | lightly)")
    seconds = time.perf_counter() - t
    result = assemble_run(
        cfg,
        impl,
        label,
        initial,
        evals,
        losses,
        seconds,
        timed.seconds,
        steps * cfg.train.batch_size * cfg.train.accumulate * processes,
    )
    if linear and isinstance(monitor, KnnMonitor):
        result["linear"] = monitor.linear(_final_embedder(cfg, out, ref))
    if not keep_checkpoint:
        (out / "checkpoint.pt").unlink(missing_ok=True)
    result["key"], result["dir"] = key, str(out)
    write_json(done, result)
    first = METRICS[spec.dataset][0]
    log(
        f"  {label} ({impl}) seed {cfg.train.seed}: {first} {result['metrics'][first][0]:.4f} -> "
        f"{result['metrics'][first][-1]:.4f} in {seconds:.0f} s"
    )
    return {**result, "cached": False}


def ddp_worker(spec_file: Path) -> None:
    """One ``torchrun`` process of :func:`run_training`: train, and on rank 0 monitor and write worker.json."""
    from reid_ssl.train.loop import train

    torch.set_num_threads(1)
    spec = json.loads(Path(spec_file).read_text())
    cfg = from_dict(spec["config"])
    main = int(os.environ.get("RANK", "0")) == 0
    timed = TimedMonitor(build_monitor(MonitorSpec(**spec["monitor"]))) if main else None
    summary = train(cfg, monitor=timed, progress=False)
    if main:
        assert timed is not None
        info = {"steps": summary["steps"], "monitor_seconds": timed.seconds, "seconds": summary["seconds"]}
        write_json(Path(cfg.train.out_dir) / "worker.json", info)


def training_task(p: Preset, cfg: Config, label: str, work: Path, args: Any, **extra: Any) -> dict[str, Any]:
    """The keyword arguments of :func:`run_training` for one run of a benchmark: the preset's monitor, the work
    folder, ``--fresh`` and ``--keep-checkpoints``, a linear probe on Fashion-MNIST (its labels allow one);
    ``extra`` adds or overrides."""
    return {
        "cfg": cfg,
        "spec": p.monitor,
        "label": label,
        "work": work,
        "fresh": args.fresh,
        "keep_checkpoint": args.keep_checkpoints,
        "linear": p.monitor.dataset == "fashion-mnist",
        **extra,
    }


def run_many(
    tasks: Sequence[dict[str, Any]], jobs: int = 1, fn: Callable[..., dict[str, Any]] | None = None
) -> list[dict[str, Any]]:
    """``fn`` (default :func:`run_training`) for each task (its keyword arguments), in task order.

    With ``jobs > 1`` the runs go to ``jobs`` spawned processes with one torch thread each: on a small CPU
    two single-threaded trainings get more done than one two-threaded one, and a busy machine does not
    stall them the way it stalls a multi-threaded run.
    """
    fn = fn or run_training
    if jobs <= 1 or len(tasks) <= 1:
        return [fn(**t) for t in tasks]
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(min(jobs, len(tasks)), mp_context=ctx, initializer=set_threads, initargs=(1,)) as pool:
        futures = [pool.submit(fn, **t) for t in tasks]
        return [f.result() for f in futures]


def run_scored(
    cfg: Config,
    spec: MonitorSpec,
    label: str,
    every: int,
    work: Path = WORK_DIR,
    only_finished: bool = False,
    log: Callable[[str], None] = print,
) -> dict[str, Any] | None:
    """Our trainer with the monitor's scores every ``every`` optimizer steps (:mod:`benchmarks.stepwise`).

    Fashion-MNIST is scored by :class:`~benchmarks.monitors.ProbeMonitor` (linear probe and kNN), PETS09 by its
    retrieval monitor. A killed run continues from its last checkpoint when called again (the trainer resumes a
    folder whose checkpoint has the same config); a finished one is reused from ``run.json``. With
    ``only_finished`` nothing is trained: a run that has not finished gives None.

    Returns:
        ``steps`` (0 = the untrained backbone, then every ``every`` steps and the last), ``metrics`` (name ->
        values at those steps), ``seconds`` of this call's training and scoring, ``label``, ``seed``, ``lr``.
    """
    from benchmarks.monitors import build_probe_monitor
    from benchmarks.stepwise import read_scores, score_on_save
    from reid_ssl.train.loop import train

    cfg = with_overrides(cfg, [f"train.checkpoint_every_steps={every}", "train.checkpoint_every_epochs=0"])
    key = run_key(cfg, spec, "ours-scored", linear=spec.dataset == "fashion-mnist")
    out = run_dir(work, cfg, spec, "scored", label, key)
    done = out / "run.json"
    if done.is_file() and json.loads(done.read_text()).get("key") == key:
        log(f"  {label} seed {cfg.train.seed}: reused {done}")
        return {**json.loads(done.read_text()), "cached": True}
    if only_finished:
        return None
    cfg = with_overrides(cfg, [f"train.out_dir={out}"])
    monitor = build_probe_monitor(spec)
    initial = initial_metrics(cfg, spec, monitor)
    t = time.perf_counter()
    with score_on_save(monitor, out / "scores.jsonl", flip=spec.dataset == "pets09"):
        summary = train(cfg, progress=False)
    scores = read_scores(out / "scores.jsonl")
    steps = [0, *sorted(scores)]
    names = sorted(initial)
    result = {
        "label": label,
        "seed": cfg.train.seed,
        "lr": cfg.optim.lr,
        "steps": steps,
        "metrics": {n: [initial[n], *(scores[s][n] for s in steps[1:])] for n in names},
        "seconds": round(time.perf_counter() - t, 1),
        "resumed_at_step": summary["resumed_at_step"],
        "k_rule": summary["k_rule"],
        "key": key,
        "dir": str(out),
    }
    (out / "checkpoint.pt").unlink(missing_ok=True)
    write_json(done, result)
    first = "linear_top1" if "linear_top1" in names else names[0]
    log(f"  {label} seed {cfg.train.seed}: {first} {result['metrics'][first][0]:.4f} -> "
        f"{result['metrics'][first][-1]:.4f} in {result['seconds']:.0f} s")  # fmt: skip
    return {**result, "cached": False}


def _final_embedder(cfg: Config, out: Path, ref: dict[str, Any] | None) -> Any:
    """The trained backbone: the reference loop's, or the one in our run's checkpoint (without flip)."""
    from reid_ssl.embedder import load_embedder

    if ref is not None:
        return ref["embedder"]
    device = cfg.train.device if cfg.train.device != "auto" else None
    return load_embedder(out / "checkpoint.pt", device=device, flip=False)


@contextlib.contextmanager
def work_dir(requested: Path | None, smoke: bool) -> Iterator[Path]:
    """The folder for training runs: ``requested``, else a temporary one (smoke) or ``runs/bench``."""
    if requested is not None:
        requested.mkdir(parents=True, exist_ok=True)
        yield requested
    elif smoke:
        with tempfile.TemporaryDirectory(prefix="reid_ssl_bench_") as tmp:
            yield Path(tmp)
    else:
        WORK_DIR.mkdir(parents=True, exist_ok=True)
        yield WORK_DIR


def run_datasets(
    result: dict[str, Any], args: Any, run_dataset: Callable[[str, Any, Path], dict[str, Any]], started: float
) -> None:
    """``result["datasets"][d] = run_dataset(d, args, work)`` for each of ``args.datasets``, in one work folder
    (:func:`work_dir`). ``args.out`` is rewritten after each dataset (a long benchmark that dies keeps the
    datasets it finished) and finished (:func:`benchmarks.report.finish`) at the end."""
    result["datasets"] = {}
    with work_dir(args.work_dir, args.smoke) as work:
        for dataset in args.datasets:
            result["datasets"][dataset] = run_dataset(dataset, args, work)
            write_json(args.out, {**result, "seconds": round(time.perf_counter() - started, 1)})
    write_json(args.out, report.finish(result, started))


def torchrun(module: str, args: Sequence[str], nproc: int, timeout: float | None = None) -> None:
    """Run ``python -m module args`` under ``torch.distributed.run`` with ``nproc`` local processes (gloo on CPU),
    from the repository root (so ``benchmarks`` and ``reid_ssl`` import as packages)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m", module]
    proc = subprocess.run([*cmd, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"torchrun failed ({proc.returncode}):\n{proc.stderr[-4000:]}")


if __name__ == "__main__":  # the torchrun worker of run_training(processes > 1)
    if len(sys.argv) != 3 or sys.argv[1] != "--ddp-worker":
        sys.exit("usage: python -m benchmarks.runs --ddp-worker SPEC.json (started by run_training through torchrun)")
    ddp_worker(Path(sys.argv[2]))
