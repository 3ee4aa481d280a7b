"""The GPU check: one prepared script, about 5 minutes (at most 8) on one modern GPU, writing JSON.

Run from the repository root on the GPU machine:

    python -m benchmarks.gpu_check                      # CUDA; writes benchmarks/results/gpu_check.json
    python -m benchmarks.gpu_check --cpu-dry-run        # tiny sizes on the CPU, seconds (the test suite runs it)

Parts (each one is recorded as ran / skipped with the reason / failed with the error; one failing part does not
stop the others, and the exit code is 1 when any part that ran failed its check; the JSON is written after every
part with ``"finished": false``, so a check stopped by a time limit keeps the parts that finished):

1. ``amp``: ResNet-50 at 224x224, batch 64: synthetic training steps (the ceiling of
   :mod:`benchmarks.ceiling`: both views through the online network, target forward, backward, SGD step) in
   fp32, bf16 autocast and fp16 autocast with the gradient scaler, all ``channels_last``; bf16 again with
   ``torch.compile``; then our trainer (:func:`reid_ssl.train.train`, bf16, ``channels_last``) on a generated
   image folder, real img/s against the bf16 ceiling measured just before and after it.
2. ``triplet``: a 300-step truncated-triplet run (ResNet-18, 128x64, batch 64, bf16) on the PETS09 crops when
   ``data/pets09`` exists, else on the generated folder; the check is that the loss goes down (the mean of the
   last 30 logged steps below the mean of the first 30).
3. ``eval_faiss``: features of 2,048 crops-sized tensors on the GPU (img/s, and equal to the CPU's within
   2e-3), ``evaluate_rank`` on them; a FAISS gallery (``reid_ssl.index``) built and searched with faiss-gpu when
   it is installed (recall@10 against exact search must be 1.0); skipped without faiss-gpu.
4. ``ddp``: ``torchrun --nproc_per_node 2 -m reid_ssl.cli train`` for a few steps: NCCL on two GPUs when there are
   at least two, else gloo on the CPU; the check is that both processes finish and the checkpoint exists.

``--cpu-dry-run`` runs the same code on the CPU with tiny sizes (ResNet-18 at 32x32, a few steps) so that
everything but the CUDA-only pieces is known to work: fp16 with the scaler, ``torch.compile``, faiss-gpu and
NCCL are reported as not run. No GPU is ever needed by the test suite.
"""

from __future__ import annotations

import argparse
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks import bench_throughput, ceiling, machine, presets, report, runs
from reid_ssl.config import Config, load_config
from reid_ssl.fileio import write_json


def make_folder(root: Path, bags: int, per_bag: int, size: tuple[int, int], seed: int = 0) -> Path:
    """A folder of generated JPEG "people" (coloured blocks on a noisy background), one sub-folder per bag."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    h, w = size
    for b in range(bags):
        colours = rng.integers(0, 256, (3, 3))
        for i in range(per_bag):
            img = rng.integers(0, 60, (h, w, 3)).astype(np.uint8)
            top = int(rng.integers(0, h // 8 + 1))
            for part, colour in enumerate(colours):
                img[top + part * h // 3 : top + (part + 1) * h // 4 + h // 8, w // 4 : 3 * w // 4] = colour
            (root / f"{b:03d}").mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).save(root / f"{b:03d}" / f"{i:03d}.jpg", quality=90)
    return root


def train_config(size: tuple[int, int], backbone: str, batch: int, root: Path, extra: list[str]) -> Config:
    """A folder-source training config without monitor, TensorBoard or periodic checkpoints."""
    h, w = size
    base = [
        "data.source=folder",
        f"data.root={root}",
        f"data.height={h}",
        f"data.width={w}",
        f"data.eval_height={h}",
        f"data.eval_width={w}",
        f"model.backbone={backbone}",
        "model.multires=false",
        f"train.batch_size={batch}",
        "train.eval_dataset=",
        "train.tensorboard=false",
        "train.checkpoint_every_steps=1000000",
        "train.checkpoint_every_epochs=0",
    ]
    return load_config(None, [*base, *extra])


def part_amp(dry: bool, folder: Path, workers: int) -> dict[str, Any]:
    size, backbone, batch, steps = ((32, 32), "resnet18", 16, 3) if dry else ((224, 224), "resnet50", 64, 20)
    modes = {"fp32": ["train.amp=none"], "bf16": ["train.amp=bf16"]}
    out: dict[str, Any] = {"input": list(size), "backbone": backbone, "batch": batch, "not_run": {}}
    if dry:
        out["not_run"]["fp16_scaler"] = "CUDA only (train.amp=fp16 needs a GPU)"
        out["not_run"]["compile"] = "CUDA only in this check (compiling takes minutes on a CPU)"
    else:
        modes["fp16_scaler"] = ["train.amp=fp16"]
        modes["bf16_compile"] = ["train.amp=bf16", "train.compile=true"]
    ceilings = {}
    for name, extra in modes.items():
        cfg = train_config(size, backbone, batch, folder, ["train.channels_last=true", *extra])
        ceilings[name] = ceiling.ceiling_rate(cfg, steps, warmup=3 if name != "bf16_compile" else 5)
        print(f"  amp {name}: ceiling {ceilings[name]['img_per_s']:.0f} img/s", flush=True)
    out["ceiling"] = ceilings
    real_steps = 6 if dry else 40
    extra = ["train.amp=bf16", "train.channels_last=true", f"data.num_workers={workers}"]
    extra += [f"train.max_steps={real_steps}", "train.epochs=100", "train.log_every_steps=1"]
    cfg = train_config(size, backbone, batch, folder, extra)
    cmp = ceiling.loop_vs_ceiling(cfg, warmup=2 if dry else 8, ceiling_steps=steps)
    out["real_vs_ceiling_bf16"] = cmp
    # the data loader alone (decode + two augmented views, same workers): when it is slower than the ceiling,
    # the loop waits for data, not for the GPU
    out["loader_alone_img_per_s"] = bench_throughput.time_loader(cfg, 3 if dry else 30)
    out["workers"] = workers
    out["ratio"] = cmp["ratio"][0]
    out["ok"] = all(c["img_per_s"] > 0 for c in ceilings.values()) and cmp["ratio"][0] > 0
    rate, loader = cmp["real"][0]["img_per_s"], out["loader_alone_img_per_s"]
    print(f"  amp: our loop {rate:.0f} img/s = {out['ratio']:.2f} of the bf16 ceiling; loader alone {loader:.0f} img/s")
    return out


def part_triplet(dry: bool, folder: Path, workers: int) -> dict[str, Any]:
    from reid_ssl.train.logs import read_metrics
    from reid_ssl.train.loop import train

    pets09 = presets.dataset_available("pets09") is None and not dry
    steps, size, batch = (20, (32, 16), 16) if dry else (300, (128, 64), 64)
    source = ["data.source=pets09", f"data.root={presets.PETS09_ROOT}"] if pets09 else []
    extra = [*source, "train.amp=bf16", f"data.num_workers={workers}", f"train.max_steps={steps}"]
    extra += ["train.epochs=1000", "train.log_every_steps=1", "loss.name=truncated_triplet", "optim.lr=0.1"]
    if dry:
        extra += ["model.proj_hidden_dim=64", "model.proj_dim=32", "model.pred_hidden_dim=64"]
    with tempfile.TemporaryDirectory() as tmp:
        cfg = train_config(size, "resnet18", batch, folder, [*extra, f"train.out_dir={tmp}"])
        t = time.perf_counter()
        summary = train(cfg, progress=False)
        losses = [r["loss"] for r in read_metrics(Path(tmp) / "metrics.jsonl") if "loss" in r]
    n = max(1, min(30, len(losses) // 3))
    first, last = float(np.mean(losses[:n])), float(np.mean(losses[-n:]))
    print(f"  triplet: {len(losses)} steps, loss {first:.3f} -> {last:.3f}", flush=True)
    return {
        "data": "pets09" if pets09 else "generated folder",
        "steps": summary["steps"],
        "seconds": time.perf_counter() - t,
        "images_per_second": summary["images_per_second"],
        "loss_first_mean": first,
        "loss_last_mean": last,
        "loss_decreased": last < first,
        # on the dry run 20 tiny steps prove the code path, not learning
        "ok": bool(last < first) if not dry else bool(np.isfinite(last)),
    }


def part_eval_faiss(dry: bool, device: torch.device) -> dict[str, Any]:
    from reid_ssl.checkpoint import make_preprocess
    from reid_ssl.embedder import Embedder
    from reid_ssl.eval.metrics import evaluate_rank
    from reid_ssl.models import build_backbone

    try:  # the GPU image may lack FAISS altogether; the feature and evaluator checks still run
        from reid_ssl.index.gallery import GalleryIndex, GalleryItem, gpu_available

        faiss_gpu, why_not = gpu_available(), "faiss-gpu is not installed or sees no GPU (faiss-cpu only)"
    except ImportError as e:
        faiss_gpu, why_not = False, f"FAISS is not importable here ({e})"

    n, (h, w) = (64, (32, 16)) if dry else (2048, (128, 64))
    torch.manual_seed(0)
    net = build_backbone("resnet18")
    x = torch.randn(n, 3, h, w)
    emb = Embedder(net, make_preprocess(h, w), "gpu-check", device=device, flip=True)
    emb.embed_tensor(x[:8])
    t = time.perf_counter()
    feats = torch.cat([emb.embed_tensor(x[i : i + 256]) for i in range(0, n, 256)]).numpy()
    rate = n / (time.perf_counter() - t)
    cpu = Embedder(build_backbone("resnet18").eval(), make_preprocess(h, w), "cpu", device="cpu", flip=True)
    cpu.backbone.load_state_dict(net.state_dict())
    diff = float(np.abs(cpu.embed_tensor(x[:32]).numpy() - feats[:32]).max())
    pids = np.arange(n) % (n // 8)
    q, g = slice(0, n // 8), slice(n // 8, n)
    dist = 1 - feats[q] @ feats[g].T
    ranked = evaluate_rank(dist, pids[q], pids[g], np.zeros(n // 8, int), np.ones(n - n // 8, int))
    out: dict[str, Any] = {
        "embed_device": str(device),
        "embed_img_per_s": rate,
        "max_abs_diff_vs_cpu": diff,
        "rank1": float(ranked["cmc"][0]),
        "mAP": float(ranked["mAP"]),
        "faiss_gpu": faiss_gpu,
    }
    ok = diff < 2e-3
    if faiss_gpu:
        info = {"fingerprint": "gpu-check", "preprocess": {}, "feature_dim": feats.shape[1], "flip": True}
        idx = GalleryIndex.create({**info, "checkpoint": None}, "flat", use_gpu=True)
        idx.add(feats[g], [GalleryItem(path=f"/g/{i}.jpg", pid=int(p), camid=1) for i, p in enumerate(pids[g])])
        hits = idx.search(feats[q], k=10)
        _, exact = idx.search_exact(feats[q], k=10)
        got = [{h.id for h in row} for row in hits]
        recall = [len(a & set(b)) / len(b) for a, b in zip(got, exact.tolist(), strict=True)]
        out["recall_at_10"] = float(np.mean(recall))
        ok = ok and out["recall_at_10"] == 1.0
    else:
        out["not_run"] = {"faiss_gpu": why_not}
    out["ok"] = ok
    print(f"  eval: {rate:.0f} img/s on {device}, |gpu - cpu| {diff:.1e}; faiss-gpu {faiss_gpu}", flush=True)
    return out


def part_ddp(dry: bool, folder: Path) -> dict[str, Any]:
    gpus = torch.cuda.device_count() if not dry else 0
    backend, device = ("nccl", "cuda") if gpus >= 2 else ("gloo", "cpu")
    size = (32, 16) if dry or backend == "gloo" else (128, 64)
    with tempfile.TemporaryDirectory() as tmp:
        h, w = size
        args = ["train", "-c", str(machine.REPO / "configs" / "smoke.yaml"), f"data.root={folder}"]
        args += [f"data.height={h}", f"data.width={w}", f"data.eval_height={h}", f"data.eval_width={w}"]
        args += [f"train.device={device}", "train.max_steps=3", "train.batch_size=8", f"train.out_dir={tmp}"]
        t = time.perf_counter()
        runs.torchrun("reid_ssl.cli", args, 2, timeout=300)
        done = (Path(tmp) / "checkpoint.pt").is_file()
    reason = None if gpus >= 2 else f"{gpus} GPU(s): NCCL needs two; ran gloo on the CPU instead"
    print(f"  ddp: 2 processes, {backend}, checkpoint written: {done}", flush=True)
    return {"backend": backend, "device": device, "seconds": time.perf_counter() - t, "ok": done, "note": reason}


def run_part(name: str, fn: Callable[[], dict[str, Any]], parts: dict[str, Any]) -> None:
    print(f"{name}:", flush=True)
    t = time.perf_counter()
    try:
        parts[name] = {"ran": True, **fn()}
    except Exception as e:  # a broken part is a result; the others still run
        parts[name] = {"ran": True, "ok": False, "error": f"{type(e).__name__}: {e}"[:2000]}
        traceback.print_exc()
    parts[name]["part_seconds"] = round(time.perf_counter() - t, 1)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu-dry-run", action="store_true", help="tiny sizes on the CPU: seconds, no GPU needed")
    ap.add_argument("--out", type=Path, help="JSON output (default benchmarks/results/gpu_check.json; none dry)")
    ap.add_argument("--workers", type=int, help="data-loader workers (default: min(12, cores - 2); dry run 0)")
    ap.add_argument("--parts", type=presets.parse_list, default=["amp", "triplet", "eval_faiss", "ddp"])
    args = ap.parse_args(argv)
    dry = args.cpu_dry_run
    cuda = torch.cuda.is_available() and not dry
    if not cuda and not dry:
        ap.error("no CUDA device: run on a GPU machine, or use --cpu-dry-run to check the script itself")
    device = torch.device("cuda" if cuda else "cpu")
    workers = (
        args.workers if args.workers is not None else (0 if dry else max(1, min(12, machine.available_cores() - 2)))
    )
    machine.set_threads(1 if dry else None)
    result = report.header("gpu_check", dry)
    result["mode"] = "cpu dry run: tiny sizes, CUDA-only pieces not run" if dry else "CUDA"
    result["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda else []
    print(f"gpu_check: {result['mode']}; GPUs: {result['gpus'] or 'none used'}", flush=True)
    parts: dict[str, Any] = {}
    t = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        # 4,096 images: 64 steps an epoch, so the loop's timed window (steps 8..40) holds no epoch start
        bags, per_bag, size = (16, 6, (64, 32)) if dry else (256, 16, (256, 128))
        folder = make_folder(Path(tmp) / "images", bags, per_bag, size)
        todo = {
            "amp": lambda: part_amp(dry, folder, workers),
            "triplet": lambda: part_triplet(dry, folder, workers),
            "eval_faiss": lambda: part_eval_faiss(dry, device),
            "ddp": lambda: part_ddp(dry, folder),
        }
        out = report.out_path(args.out, dry, "gpu_check")
        for name in args.parts:
            run_part(name, todo[name], parts)
            if out:  # a check cut short by a time limit keeps the parts that finished
                write_json(out, {**result, "parts": parts, "finished": False})
    for name in todo:
        parts.setdefault(name, {"ran": False, "skipped": "not in --parts"})
    result["parts"] = parts
    result["finished"] = True
    result["all_ok"] = all(p.get("ok", False) for p in parts.values() if p["ran"])
    report.finish(result, t)
    print("\npart        ran   ok    not run / note")
    for name, p in parts.items():
        note = p.get("error") or p.get("skipped") or p.get("note") or "; ".join(p.get("not_run", {}).values())
        print(f"{name:<11} {p['ran']!s:<5} {p.get('ok', '-')!s:<5} {note or ''}"[:200])
    report.write_result(result, args.out, dry, "gpu_check")
    return 0 if result["all_ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
