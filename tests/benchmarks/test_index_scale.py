"""``python -m benchmarks.bench_index_scale --smoke`` end to end, and its extrapolation on paper."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from typing import Any

import pytest

from tests.helpers import REPO, SUBPROCESS_ENV


def leaves(obj: Any, key: str = ""):
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from leaves(v, f"{key}.{k}")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from leaves(v, f"{key}[{i}]")
    else:
        yield key, obj


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("scale") / "scale.json"
    cmd = [sys.executable, "-m", "benchmarks.bench_index_scale", "--smoke", "--out", str(out)]
    res = subprocess.run(cmd, cwd=REPO, env=SUBPROCESS_ENV, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert out.with_suffix(".png").stat().st_size > 10_000
    return json.loads(out.read_text())


def test_smoke_writes_every_section_with_machine_date_and_finite_numbers(smoke):
    assert smoke["benchmark"] == "index_scale" and smoke["smoke"] is True and smoke["date"]
    assert {"cpu", "load_average_1_5_15", "load_average_end"} <= set(smoke["machine"])
    assert smoke["threads"] == 1
    assert set(smoke["sections"]) == {"small", "large", "ondisk", "hnsw"}
    for name, sec in smoke["sections"].items():
        assert sec["date"] and len(sec["load_average_start"]) == 3, name
    for key, value in leaves(smoke):
        assert not (isinstance(value, float) and not math.isfinite(value)), key


def test_smoke_measures_every_type_against_exact_search(smoke):
    large = {e["type"]: e for e in smoke["sections"]["large"]["types"] + smoke["sections"]["hnsw"]["types"]}
    small = {e["type"]: e for e in smoke["sections"]["small"]["types"]}
    assert set(large) == {"flat", "ivf-flat", "ivf-pq", "ivf-opq", "hnsw"} and set(small) == {"flat", "hnsw"}
    assert large["ivf-opq"]["factory"].startswith("OPQ")
    for e in [*large.values(), *small.values()]:
        assert e["build_s"] >= 0 and e["faiss_bytes_per_vector"] > 0
        for row in e["settings"]:
            assert set(row["recall@10"]) == {"present", "absent"}
            assert all(0 <= r <= 1 for r in row["recall@10"].values())
            lat = row["latency_1_thread"]
            assert 0 < lat["p50_ms"] <= lat["p99_ms"] and lat["n"] == 40  # 2 rounds x 20
            assert len(row["latency_rounds"]) == 2
    assert large["flat"]["settings"][0]["recall@10"] == {"present": 1.0, "absent": 1.0}
    ivf = large["ivf-flat"]["settings"]
    assert ivf[0]["setting"] == {"nprobe": large["ivf-flat"]["default"]["nprobe"]}  # the default comes first
    assert large["ivf-flat"]["faiss_bytes_per_vector"] > 4 * 32  # full vectors in the lists
    assert large["ivf-pq"]["faiss_bytes_per_vector"] < large["ivf-flat"]["faiss_bytes_per_vector"]
    study = smoke["sections"]["small"]["train_study"]
    assert study and all(len(r["by_nprobe"]) == 5 for r in study)


def test_smoke_serves_the_same_index_from_ram_and_from_disk(smoke):
    runs = smoke["sections"]["ondisk"]["runs"]
    assert [r["lists_on_disk"] for r in runs] == [False, True, True, True] * 2  # two rounds in turn
    assert {r["cache"] for r in runs} == {"cold", "warm"}
    assert len({r["recall@10"] for r in runs}) == 1  # the same results, wherever the lists live
    for r in runs:
        assert r["after_load"]["anon_gb"] >= 0 and r["latency"]["p50_ms"] > 0


def test_defaults_and_extrapolation_are_labelled_and_grow_with_n(smoke):
    sizes = [row["n"] for row in smoke["defaults_by_size"]]
    assert sizes == sorted(sizes) and sizes[-1] == 100_000_000
    ext = smoke["extrapolation"]
    assert "NOT MEASURED" in ext["label"]
    by_type: dict[str, list] = {}
    for row in ext["rows"]:
        by_type.setdefault(row["type"], []).append(row)
    for name, rows in by_type.items():
        gb = [r["faiss_gb"] for r in rows if "check" not in r]
        assert gb == sorted(gb) and gb[-1] > gb[0], name
    assert by_type["hnsw"][0]["measured"] is True  # the rows at the measured size repeat the measurement
    check = [r for r in by_type["hnsw"] if "check" in r]
    assert len(check) == 1 and check[0]["measured"] is False and check[0]["from_n"] < check[0]["n"]
