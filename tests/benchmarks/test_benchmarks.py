"""The benchmark scripts' ``--smoke`` modes end to end, and the pure helpers they share.

Each script runs as ``python -m benchmarks.bench_<name>`` from the repository root, in its own subprocess
(single-threaded in smoke mode); the four training benchmarks start together, so the module takes about as long
as the slowest one plus the CPU they share (~1 min on 2 quiet cores). Each test then checks
the JSON its script wrote: the expected keys, finite numbers, and the PNG next to it.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from benchmarks import machine, presets, stats
from reid_ssl.config import to_dict
from reid_ssl.fileio import write_json

REPO = machine.REPO
HAVE_PETS09 = presets.dataset_available("pets09") is None
HAVE_FASHION = presets.dataset_available("fashion-mnist") is None
HAVE_LIGHTLY = machine.package_version("lightly") is not None
# Keys that may be null: no GPU / lightly here, curves not long enough, a run that did not resume
# (resumed_at_step), a smoke run too short for the loss to be read back (loss: the trainer reads it every
# train.log_every_steps), a curve that never reaches the reference arm's final value (R1_first_step_...), a
# warm-cache run (page_cache_dropped).
NULLABLE = {
    "gpu",
    "lightly",
    "mean_curve",
    "per_seed",
    "resumed_at_step",
    "loss",
    "R1_first_step_reaching_reference_final",
    "page_cache_dropped",
}
SMOKE_TIMEOUT_S = 600  # every smoke starts at once: on 2 cores the last ones wait for the others


def _scripts(tmp: Path) -> dict[str, list[str]]:
    datasets = "fashion-mnist,pets09" if HAVE_PETS09 else "fashion-mnist"
    scripts = {
        "efficiency": ["--datasets", datasets],
        "ablations": [],
        "peer_lightly": [],
        "throughput": [],
        "learning_efficiency": ["--datasets", datasets],
        "ceiling": ["--breakdown"],
        "startup": [],
        "shards": [],
    }
    if HAVE_PETS09:
        scripts["precision"] = []
        scripts["calibration"] = []
    if (REPO / "data" / "vtest.avi").is_file():
        scripts["own_footage"] = ["--work-dir", str(tmp / "own_footage")]
    if not HAVE_LIGHTLY:
        del scripts["peer_lightly"], scripts["throughput"]
    return scripts


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, tuple[subprocess.Popen, Path]]]:
    """Start every script's smoke mode at once; yields name -> (process, JSON path)."""
    if not HAVE_FASHION:
        pytest.skip(presets.dataset_available("fashion-mnist"))
    tmp = tmp_path_factory.mktemp("bench")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    procs = {}
    for name, extra in _scripts(tmp).items():
        out = tmp / f"{name}.json"
        cmd = [sys.executable, "-m", f"benchmarks.bench_{name}", "--smoke", "--out", str(out), *extra]
        log = (tmp / f"{name}.log").open("w")
        procs[name] = (subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT), out)
    yield procs
    for proc, _ in procs.values():
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def result_of(smoke: dict[str, tuple[subprocess.Popen, Path]], name: str) -> dict[str, Any]:
    if name not in smoke:
        pytest.skip("lightly is not installed (pip install -e '.[bench]')")
    proc, out = smoke[name]
    rc = proc.wait(timeout=SMOKE_TIMEOUT_S)
    log = out.with_suffix(".log").read_text()
    assert rc == 0, f"bench_{name}.py --smoke failed:\n{log[-3000:]}"
    result = json.loads(out.read_text())
    assert result["benchmark"] == name and result["smoke"] is True
    assert {"cpu", "cores_available", "torch", "load_average_1_5_15"} <= set(result["machine"])
    assert result["date"] and result["command"].startswith(f"python -m benchmarks.bench_{name} --smoke")
    assert_finite(result)
    return result


def leaves(obj: Any, key: str = "") -> Iterator[tuple[str, Any]]:
    """(nearest dict key, value) for every scalar in a JSON tree."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from leaves(v, k)
    elif isinstance(obj, list):
        for v in obj:
            yield from leaves(v, key)
    else:
        yield key, obj


def assert_finite(result: dict[str, Any]) -> None:
    for key, value in leaves(result):
        if value is None:
            assert key in NULLABLE or key.startswith("epochs_to_byol_final"), f"{key} is null"
        elif isinstance(value, float):
            assert math.isfinite(value), f"{key} = {value}"


def assert_curve(curve: dict[str, list[Any]], points: int) -> None:
    assert curve["epochs"] == list(range(points))
    assert len(curve["mean"]) == len(curve["std"]) == points
    assert all(0.0 <= v <= 1.0 for v in curve["mean"])


# ---------------------------------------------------------------------------------------------------------
# Smoke runs of the scripts
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_efficiency_smoke(smoke):
    r = result_of(smoke, "efficiency")
    assert r["settings"]["methods"] == ["truncated_triplet", "byol", "simclr"]
    expected = {"fashion-mnist": ("knn_top1", 3)} | ({"pets09": ("rank1", 2)} if HAVE_PETS09 else {})
    assert set(r["datasets"]) == set(expected)
    for dataset, (metric, points) in expected.items():
        d = r["datasets"][dataset]
        assert set(d["methods"]) == {"truncated_triplet", "byol", "simclr"}
        assert Path(d["plot"]).stat().st_size > 5000
        assert d["byol_final"][metric]["mean"] == d["methods"]["byol"]["final"][metric]["mean"]
        for entry in d["methods"].values():
            assert_curve(entry["curves"][metric], points)
            assert len(entry["runs"]) == 1 and entry["runs"][0]["seconds"] > 0
            to_byol = entry["epochs_to_byol_final"][metric]
            assert to_byol["mean_curve"] is None or 0 <= to_byol["mean_curve"] < points
            if dataset == "fashion-mnist":
                assert 0.0 < entry["linear_top1"]["mean"] <= 1.0
        assert [row["method"] for row in d["table"]] == ["truncated_triplet", "byol", "simclr"]
    if HAVE_PETS09:
        assert "mAP" in r["datasets"]["pets09"]["methods"]["byol"]["curves"]


@pytest.mark.slow
def test_peer_lightly_smoke(smoke):
    r = result_of(smoke, "peer_lightly")
    for name in ("byol", "simclr"):
        eq = r["loss_equivalence"][name]
        assert eq["max_abs_value_diff"] < 1e-9 and eq["max_abs_grad_diff"] < 1e-9
        m = r["datasets"]["fashion-mnist"]["methods"][name]
        assert isinstance(m["within_noise"], bool)
        k = m["metrics"]["knn_top1"]
        assert len(k["diff_of_means"]) == len(k["stderr_of_diff"]) == 3
        assert_curve(k["lightly"], 3)
        assert [run["impl"] for run in m["runs"]["lightly"]] == ["lightly"]
    assert Path(r["datasets"]["fashion-mnist"]["plot"]).is_file()


@pytest.mark.slow
def test_ablations_smoke(smoke):
    r = result_of(smoke, "ablations")
    rows = {row["variant"]: row for row in r["table"]}
    assert set(rows) == {"reference", "rank_k", "median", "bag_positives", "ddp2_gathered"}
    head = "rank1" if HAVE_PETS09 else "knn_top1"
    assert rows["reference"][f"delta_{head}"] == 0.0
    assert r["variants"]["ddp2_gathered"]["processes"] == 2  # ran under torchrun with 2 gloo processes
    assert "train.batch_size=12" in r["variants"]["ddp2_gathered"]["overrides"]
    k = int(r["variants"]["rank_k"]["overrides"][0].split("=")[1])
    assert 2 <= k < 24
    if HAVE_PETS09:
        assert 0.0 <= rows["bag_positives"][f"final_{head}"] <= 1.0
    else:
        assert "no bags" in rows["bag_positives"]["skipped"]
    assert Path(r["plot"]).stat().st_size > 5000


@pytest.mark.slow
def test_throughput_smoke(smoke):
    r = result_of(smoke, "throughput")
    for method in ("byol", "simclr"):
        loop = r["loops"][method]
        assert loop["ours_img_per_s"] > 0 and loop["reference_img_per_s"] > 0
        assert loop["ratio_ours_over_reference"] > 0
    assert "reference_img_per_s" not in r["loops"]["truncated_triplet"]
    for entry in r["data_loading"].values():
        assert 0.0 <= entry["data_wait_fraction"] <= 1.0 and entry["loader_only_img_per_s"] > 0
    assert r["flags"]["baseline"]["speedup_vs_baseline"] == 1.0
    assert {"channels_last_off", "bf16_autocast", "multires_on"} <= set(r["flags"])
    assert "skipped" in r["flags"]["compile"]
    fx = r["feature_extraction"]
    assert fx["tensor_flip_off_img_per_s"] > 0 and fx["images_workers_0_img_per_s"] > 0
    assert Path(r["plot"]).is_file()


@pytest.mark.slow
def test_ceiling_smoke(smoke):
    r = result_of(smoke, "ceiling")
    assert set(r["configs"]) == {"cpu_default", "cpu_default_bf16", "paper_r50_small"}
    for c in r["configs"].values():
        assert len(c["ratio"]) == 1 and len(c["ceiling"]) == 2 and c["ratio_min"] == c["ratio_max"] > 0
        real = c["real"][0]
        assert real["img_per_s"] > 0 and real["cpu_s"]["main_process"] > 0 and real["cpu_s"]["loader_workers"] >= 0
    assert r["configs"]["paper_r50_small"]["overrides"]["backbone"] == "resnet50"
    parts = r["breakdown"]  # --breakdown: the ingredients one by one, each a measured rate
    assert set(parts["median_img_per_s"]) == {"synthetic", "real_batches", "loss_ema", "augment"}
    assert parts["ratio_to_synthetic"]["synthetic"] == 1.0 and min(parts["median_img_per_s"].values()) > 0
    assert set(parts["real_loop_ratio_to_synthetic"]) == {"checkpoint_every_epoch", "configured"}


@pytest.mark.slow
@pytest.mark.skipif(not HAVE_PETS09, reason="PETS09 crops not built (make data)")
def test_precision_smoke(smoke):
    r = result_of(smoke, "precision")
    assert set(r["precisions"]) == {"none", "bf16"}
    for m in ("rank1", "mAP"):
        d = r["bf16_minus_fp32"][m]
        assert len(d["per_seed"]) == 1
        fp32, bf16 = (r["precisions"][a]["final"][m]["mean"] for a in ("none", "bf16"))
        assert d["mean"] == pytest.approx(bf16 - fp32)
    assert r["precisions"]["bf16"]["runs"][0]["epochs"] == [0, 1, 2] and Path(r["plot"]).is_file()


@pytest.mark.slow
@pytest.mark.skipif(not HAVE_PETS09, reason="PETS09 crops not built (make data)")
def test_calibration_smoke(smoke):
    r = result_of(smoke, "calibration")
    (run,) = r["runs"]
    for scores in (run["raw"], run["centred"]):
        assert scores["queries"] > 100 and 0 <= scores["youden_j"] <= scores["j_ceiling"] + 1e-6
    low, high = run["raw"]["top10_range"]
    assert run["centred"]["top10_range"][0] < low <= high <= 1.0 + 1e-6  # centring spreads the scores


@pytest.mark.slow
@pytest.mark.skipif(not (REPO / "data" / "vtest.avi").is_file(), reason="data/vtest.avi not fetched (make data)")
def test_own_footage_smoke(smoke):
    r = result_of(smoke, "own_footage")
    assert {"prepare", "train", "eval video", "index", "app_ready"} <= set(r["commands_seconds"])
    split = r["counts"]["split"]
    assert split["train_tracklets"] > 0 and split["query"] > 0 and split["gallery"] > 0
    assert r["index"]["n_indexed"] == split["gallery"] and r["train"]["steps"] == 2
    assert 0 <= r["eval"]["video"]["mAP"] <= 1


@pytest.mark.slow
def test_startup_smoke(smoke):
    r = result_of(smoke, "startup")
    rows = {row["variant"]: row for row in r["rows"]}
    assert set(rows) == {"before", "after"} and rows["before"]["images"] == rows["after"]["images"] == 20_000
    for row in rows.values():
        assert row["first_batch_s"] > 0 and len(row["workers"]) == r["workers"] == 2
        assert all(w["private_mb"] > 0 and w["pss_mb"] >= w["private_mb"] for w in row["workers"])


@pytest.mark.slow
def test_shards_smoke(smoke):
    r = result_of(smoke, "shards")
    assert r["images"] == 2_000 and r["ratio_median"] > 0 and len(r["rows"]) == 2 * len(r["ratio_shards_over_files"])


@pytest.mark.slow
def test_learning_efficiency_smoke(smoke):
    r = result_of(smoke, "learning_efficiency")
    expected = {"fashion-mnist": "linear_top1"} | ({"pets09": "mAP"} if HAVE_PETS09 else {})
    assert set(r["datasets"]) == set(expected)
    for dataset, primary in expected.items():
        d = r["datasets"][dataset]
        assert d["protocol"]["primary"] == primary and Path(d["plot"]).stat().st_size > 5000
        assert d["floors"]["untrained"][primary]["n"] == 2 and 0 < d["floors"]["raw_pixels"][primary] <= 1
        assert set(d["pilot"]["chosen_lr"]) == {"byol", "tt", "tt_auto", "byol_2x"}
        assert d["pilot"]["chosen_lr"]["byol_2x"] == 2 * d["pilot"]["chosen_lr"]["byol"]
        assert set(d["arms"]) == {"byol", "tt", "tt_auto", "byol_2x"}
        for arm in d["arms"].values():
            assert arm["curves"][primary]["epochs"] == [0, 2, 4]  # steps 0 (untrained), then every 2 steps
        k_rule = d["arms"]["tt_auto"]["runs"][0]["k_rule"]
        assert k_rule["k"] == "auto" and k_rule["k_lo"] > 2  # 23 negatives: the rule moves the window up
        for key in ("tt_vs_byol", "tt_auto_vs_byol", "tt_vs_byol_2x", "tt_auto_vs_byol_2x"):
            v = d["verdicts"][f"{key}_{primary}"]
            assert v["verdict"] in ("holds", "does not hold", "no semantic learning yet")
            assert v["verdict"] != "holds" or (v["R1"] and v["R2"] and v["R3"] and v["passes_raw_pixels"])


def test_decision_rule_on_made_up_curves():
    """R1 (reach the reference's final within the bound), R2 (every seed ends higher), R3 (every seed's area)."""
    from benchmarks.bench_learning_efficiency import verdict

    def run(seed, values):
        return {"seed": seed, "steps": [0, 100, 200, 300], "metrics": {"m": values}}

    byol = [run(0, [0.5, 0.55, 0.6, 0.62]), run(1, [0.5, 0.54, 0.58, 0.6])]
    fast = [run(0, [0.5, 0.62, 0.66, 0.68]), run(1, [0.5, 0.6, 0.64, 0.66])]
    v = verdict(fast, byol, "m", bound=200, raw=0.6)
    assert v["R1_first_step_reaching_reference_final"] == 100 and v["R1"] and v["R2"] and v["R3"]
    assert v["verdict"] == "holds"
    assert verdict(fast, byol, "m", bound=200, raw=0.7)["verdict"] == "no semantic learning yet"
    late = [run(0, [0.5, 0.5, 0.55, 0.7]), run(1, [0.5, 0.5, 0.55, 0.7])]  # ends higher, but late and less area
    v = verdict(late, byol, "m", bound=200, raw=0.6)
    assert v["R2"] and not v["R1"] and not v["R3"] and v["verdict"] == "does not hold"
    # fewer paired seeds than planned: never a bare verdict
    assert (
        verdict(fast, byol, "m", bound=200, raw=0.6, planned=3)["verdict"] == "incomplete: 2 of 3 seeds (so far: holds)"
    )


@pytest.mark.slow
@pytest.mark.parametrize("name", ["evaluator", "index"])
def test_search_benchmarks_smoke(tmp_path, name):
    """The evaluator and FAISS benchmarks run as modules from the repository root and write the shared header."""
    out = tmp_path / f"{name}.json"
    cmd = [sys.executable, "-m", f"benchmarks.bench_{name}", "--smoke", "--out", str(out)]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=SMOKE_TIMEOUT_S)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["benchmark"] == name and result["smoke"] is True and result["date"]
    assert result["command"] == f"python -m benchmarks.bench_{name} --smoke --out {out}"
    assert {"cpu", "cores_available", "torch", "load_average_1_5_15", "load_average_end"} <= set(result["machine"])


@pytest.mark.slow
def test_gpu_check_cpu_dry_run(tmp_path):
    """The GPU check's every part runs on the CPU at tiny sizes; the CUDA-only pieces say that they did not run."""
    out = tmp_path / "gpu_check.json"
    cmd = [sys.executable, "-m", "benchmarks.gpu_check", "--cpu-dry-run", "--out", str(out)]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # the same on a machine with a GPU
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=SMOKE_TIMEOUT_S)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["benchmark"] == "gpu_check" and r["smoke"] is True and r["gpus"] == []
    assert r["all_ok"] is True and r["finished"] is True
    parts = r["parts"]
    assert all(parts[p]["ran"] and parts[p]["ok"] for p in ("amp", "triplet", "eval_faiss", "ddp"))
    assert set(parts["amp"]["ceiling"]) == {"fp32", "bf16"} and parts["amp"]["ratio"] > 0
    assert set(parts["amp"]["not_run"]) == {"fp16_scaler", "compile"}
    assert parts["ddp"]["backend"] == "gloo" and "NCCL" in parts["ddp"]["note"]
    assert parts["eval_faiss"]["max_abs_diff_vs_cpu"] < 2e-3
    assert "not installed" in parts["eval_faiss"]["not_run"]["faiss_gpu"]
    assert "cpu dry run" in done.stdout and "CUDA only" in done.stdout  # it says what ran and what did not


def test_no_benchmark_edits_sys_path():
    """The benchmarks are a package run with ``python -m``: no script may patch the import path."""
    offenders = [p.name for p in (REPO / "benchmarks").glob("*.py") if "sys.path" in p.read_text()]
    assert offenders == []


# ---------------------------------------------------------------------------------------------------------
# Pure helpers
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.skipif(not HAVE_PETS09, reason="PETS09 crops not built (make data)")
def test_pets09_default_smoke(tmp_path):
    """The README table's script on the real split, with an untrained checkpoint standing in for the demo's."""
    from tests.helpers import write_checkpoint

    ckpt = write_checkpoint(tmp_path / "c.pt", height=64, width=32, seed=7)
    out = tmp_path / "pets09.json"
    cmd = [sys.executable, "-m", "benchmarks.bench_pets09_default", "--smoke", "--checkpoint", str(ckpt)]
    done = subprocess.run([*cmd, "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    result = json.loads(out.read_text())
    models = [r["model"] for r in result["rows"]]
    assert len(models) == 3 and "random init (seed 0)" in models[1] and "histogram" in models[2]
    assert result["num_query"] == 184 and result["rows"][0]["test_size"] == "64x32"
    for row in result["rows"]:
        assert 0 < row["mAP"] <= 1 and row["rank1"] <= row["rank5"] <= row["rank10"] <= 1
    # the histogram row is the documented baseline (datasets/README.md)
    assert abs(result["rows"][2]["rank1"] - 0.473) < 0.05


def test_mean_spread_uses_the_sample_std_and_ignores_missing_values():
    s = stats.mean_spread([0.5, 0.7, None, float("nan")])
    assert s["mean"] == pytest.approx(0.6) and s["std"] == pytest.approx(math.sqrt(0.02)) and s["n"] == 2
    assert stats.mean_spread([0.3])["std"] == 0.0
    assert stats.mean_spread([])["mean"] is None


def test_first_epoch_reaching():
    assert stats.first_epoch_reaching([0, 1, 2, 3], [0.1, 0.5, 0.4, 0.6], 0.45) == 1
    assert stats.first_epoch_reaching([0, 1, 2], [0.1, None, 0.2], 0.3) is None
    # the untrained network (epoch 0) reaching the threshold does not count as reaching it by training
    assert stats.first_epoch_reaching([0, 1, 2, 3], [0.8, 0.6, 0.7, 0.75], 0.7) == 2


def test_curve_summary_per_epoch():
    c = stats.curve_summary([0, 1], [[0.1, 0.3], [0.3, 0.5]])
    assert c["mean"] == pytest.approx([0.2, 0.4]) and c["min"] == [0.1, 0.3] and c["max"] == [0.3, 0.5]


def test_jsonable_writes_strict_json(tmp_path):
    import numpy as np

    path = write_json(tmp_path / "r.json", {"a": np.float32(0.5), "b": float("nan"), "c": (1, np.int64(2))})
    assert json.loads(path.read_text()) == {"a": 0.5, "b": None, "c": [1, 2]}


def test_parse_size():
    assert presets.parse_size("32") == (32, 32) and presets.parse_size("128x64") == (128, 64)


def test_methods_share_everything_but_the_loss():
    p = presets.preset("fashion-mnist")
    configs = {m: to_dict(presets.build_config(p, m, 3)) for m in presets.METHODS}
    for m, cfg in configs.items():
        assert cfg["data"] == configs["byol"]["data"] and cfg["optim"] == configs["byol"]["optim"]
        assert cfg["model"]["backbone"] == "resnet18" and cfg["train"]["seed"] == 3, m
    assert configs["simclr"]["model"]["target"] == "shared" and not configs["simclr"]["model"]["predictor"]
    bern = configs["truncated_triplet_bernoulli"]["loss"]
    assert bern["k_lo"] == bern["k_hi"] > 10  # 127 negatives, 10 classes: ~13 same-class negatives expected


def test_steady_rate_skips_the_warmup_steps():
    assert stats.steady_rate([5.0, 6.0, 7.0, 8.0], batch=10, warmup=1) == pytest.approx(10.0)
    assert stats.steady_rate([1.0], batch=10, warmup=1) is None


@pytest.mark.skipif(not HAVE_FASHION, reason="Fashion-MNIST not installed")
def test_scores_every_n_steps_leave_training_bit_identical(tmp_path):
    """``stepwise.score_on_save`` scores each checkpoint before it is written and restores every RNG after."""
    import random

    import numpy as np
    import torch

    from benchmarks import stepwise
    from reid_ssl.checkpoint import load_checkpoint
    from reid_ssl.train.loop import train

    def noisy_monitor(embedder):  # draws from every RNG the trainer uses, as a careless monitor might
        return {"draw": float(torch.rand(1)) + random.random() + float(np.random.rand()), "dim": embedder.feature_dim}

    states = []
    for scored in (False, True):
        p = presets.preset("fashion-mnist", smoke=True)
        cfg = presets.build_config(p, "truncated_triplet", 0, ["train.checkpoint_every_steps=2", "train.max_steps=4"])
        out = tmp_path / f"scored_{scored}"
        cfg = presets.with_overrides(cfg, [f"train.out_dir={out}", "train.checkpoint_every_epochs=0"])
        with stepwise.score_on_save(noisy_monitor, out / "scores.jsonl") if scored else contextlib.nullcontext():
            train(cfg, progress=False)
        states.append(load_checkpoint(out / "checkpoint.pt"))
    assert states[0]["backbone"]["sha256"] == states[1]["backbone"]["sha256"]
    assert all(torch.equal(v, states[1]["model"][k]) for k, v in states[0]["model"].items())
    scores = stepwise.read_scores(tmp_path / "scored_True" / "scores.jsonl")
    assert sorted(scores) == [2, 4] and scores[4]["dim"] == 512


def test_run_key_ignores_where_and_how_often_files_are_written():
    """A new checkpoint default must not discard finished runs; a new learning rate must."""
    from benchmarks import runs
    from benchmarks.presets import with_overrides

    p = presets.preset("fashion-mnist", smoke=True)
    cfg = presets.build_config(p, "byol", 0)
    key = runs.run_key(cfg, p.monitor, "scored", False)
    for change in ("train.checkpoint_every_epochs=7", "train.checkpoint_every_steps=3", "train.out_dir=elsewhere",
                   "train.tensorboard=true", "train.sample_log=true"):  # fmt: skip
        assert runs.run_key(with_overrides(cfg, [change]), p.monitor, "scored", False) == key, change
    for change in ("optim.lr=0.123", "train.seed=5", "train.log_every_steps=3"):
        assert runs.run_key(with_overrides(cfg, [change]), p.monitor, "scored", False) != key, change
