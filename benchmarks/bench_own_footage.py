"""The README's "your own footage" block, run and timed: prepare video -> train -> eval -> index -> app.

Runs exactly the commands a user types, as subprocesses of the installed CLI, on ``data/vtest.avi`` (the
PETS09-S2L1 clip that ``make data`` fetches; any video works with ``--video``), and records each step's wall
time, the tracklet and crop counts of the prepared folder, the validation and test numbers of the trained
checkpoint, the index size, and the app's start-up time (it is started, asked for its page, and stopped).

    python -m benchmarks.bench_own_footage                     # the README's block (~15 min on 2 cores)
    python -m benchmarks.bench_own_footage --smoke             # 20 s of video, 2 training steps (CI)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from benchmarks.machine import REPO
from benchmarks.report import default_out, finish, header
from reid_ssl.fileio import write_json

CLI = [sys.executable, "-m", "reid_ssl.cli"]


def _run(step: str, args: list[str], timings: dict[str, float]) -> dict[str, Any]:
    """Run ``reid_ssl <args> --json``; returns its JSON and stores its wall time under ``step``."""
    t = time.perf_counter()
    done = subprocess.run([*CLI, *args, "--json"], cwd=REPO, capture_output=True, text=True)
    timings[step] = round(time.perf_counter() - t, 1)
    if done.returncode != 0:
        raise RuntimeError(f"{step}: reid_ssl {' '.join(args)} failed:\n{done.stderr[-3000:]}")
    print(f"{step}: {timings[step]:.0f} s", flush=True)
    return json.loads(done.stdout[done.stdout.index("{") :])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _app_start_seconds(index: Path, timeout: float = 300.0) -> float:
    """Start ``reid_ssl app --index``, wait until its page answers, stop it; seconds to the first answer."""
    port = _free_port()
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"}
    cmd = [*CLI, "app", "--index", str(index), "--port", str(port)]
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        while time.perf_counter() - t < timeout:
            if proc.poll() is not None:
                raise RuntimeError(f"the app exited: {proc.stderr.read()[-2000:] if proc.stderr else ''}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as r:
                    if r.status == 200:
                        return round(time.perf_counter() - t, 1)
            except OSError:
                time.sleep(1)
        raise RuntimeError(f"the app did not answer within {timeout:.0f} s")
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--video", default=str(REPO / "data" / "vtest.avi"), help="input video (default data/vtest.avi)")
    p.add_argument("--work-dir", default=str(REPO / "runs" / "own_footage"), help="replaced on every run")
    p.add_argument("--smoke", action="store_true", help="20 s of video and 2 training steps")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    started = time.perf_counter()
    work = Path(args.work_dir)
    shutil.rmtree(work, ignore_errors=True)
    data, run = work / "vtest", work / "run"
    ckpt = run / "checkpoint.pt"
    timings: dict[str, float] = {}
    clip = ["--end", "20"] if args.smoke else []
    short = ["train.max_steps=2", "train.batch_size=16", "train.eval_dataset="] if args.smoke else []

    prepared = _run("prepare", ["prepare", "video", args.video, "--out", str(data), "--split", *clip], timings)
    trained = _run(
        "train",
        ["train", "data.source=video", f"data.root={data}", f"train.out_dir={run}", "-q", *short],
        timings,
    )
    scores = {}
    for split in [s for s, folder in (("video-val", "market_val"), ("video", "market")) if (data / folder).is_dir()]:
        scores[split] = _run(
            f"eval {split}", ["eval", "--checkpoint", str(ckpt), "--dataset", split, "--root", str(data)], timings
        )
    built = _run(
        "index",
        ["index", "build", "--checkpoint", str(ckpt), "--images", str(data / "market"), "--out", str(run / "gallery")],
        timings,
    )
    timings["app_ready"] = _app_start_seconds(run / "gallery")
    print(f"app: answered after {timings['app_ready']:.0f} s", flush=True)

    result = header("own_footage", args.smoke)
    result.update(
        video=args.video,
        commands_seconds=timings,
        total_seconds=round(sum(timings.values()), 1),
        counts={k: prepared.get(k) for k in ("split", "counts", "inputs")},
        train={k: trained.get(k) for k in ("steps", "epochs", "images_per_second", "seconds", "k_rule")},
        eval={s: {k: v for k, v in r.items() if k in ("rank1", "rank5", "rank10", "mAP")} for s, r in scores.items()},
        index={k: built.get(k) for k in ("n_indexed", "index_type", "threshold")},
    )
    path = Path(args.out) if args.out else default_out("own_footage")
    write_json(path, finish(result, started))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
