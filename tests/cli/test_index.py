"""`reid_ssl index ...` through ``cli.main``: every action, one-line errors, short searches, odd file names."""

from __future__ import annotations

import ast
import json
import os
import re
from pathlib import Path

import numpy as np
import pytest

from reid_ssl import cli
from reid_ssl.cli.main import build_parser
from reid_ssl.embedder import load_embedder
from reid_ssl.index import INDEX_TYPES, GalleryIndex, GalleryItem, embedder_info
from tests.helpers import build_market_index, latin1_name, write_checkpoint, write_person_image

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """One Market tree, checkpoint and index (built through the library) shared by read-only tests."""
    return build_market_index(tmp_path_factory.mktemp("built"))


def test_cli_build_info_search_add_remove(tmp_path, built, capsys):
    checkpoint, market_tree = built["checkpoint"], built["tree"]
    out = str(tmp_path / "idx")
    assert (
        cli.main(
            ["index", "build", "--checkpoint", str(checkpoint), "--images", str(market_tree), "--out", out, "--json"]
        )
        == 0
    )
    built = json.loads(capsys.readouterr().out)
    assert built["n_indexed"] == 36 and built["index_type"] == "flat"

    assert cli.main(["index", "info", "--index", out, "--json"]) == 0
    info_ = json.loads(capsys.readouterr().out)
    assert info_["ntotal"] == 36 and info_["cameras"] == [0, 1, 2] and info_["threshold"] == built["threshold"]

    query = sorted((market_tree / "query").iterdir())[0]  # pid 11, file name c1: camid 0
    assert (
        cli.main(
            ["index", "search", "--index", out, "--query", str(query), "-k", "4", "--exclude-camid", "0", "--json"]
        )
        == 0
    )
    found = json.loads(capsys.readouterr().out)["queries"][0]
    assert len(found["results"]) == 4 and all(r["camid"] != 0 for r in found["results"])
    scores = [r["score"] for r in found["results"]]
    assert scores == sorted(scores, reverse=True) and found["match"] in (True, False)

    new = write_person_image(tmp_path / "more" / "0099_c4s1_000001_00.jpg", 99, np.random.default_rng(9))
    assert cli.main(["index", "add", str(new.parent), "--index", out, "--json"]) == 0
    added = json.loads(capsys.readouterr().out)
    assert added["added"] == 1 and added["ids"] == [36] and added["ntotal"] == 37
    assert cli.main(["index", "add", str(new), "--index", out, "--json"]) == 0  # same path again: skipped
    assert json.loads(capsys.readouterr().out)["added"] == 0
    # nothing that could be added: a text file, a corrupt JPEG, an empty folder -> bad input: exit 2 and the reason
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8 not really")
    (tmp_path / "empty").mkdir()
    for path, why in [("notes.txt", "no image files"), ("broken.jpg", "only unreadable"), ("empty", "no images")]:
        assert cli.main(["index", "add", str(tmp_path / path), "--index", out, "--json"]) == 2
        captured = capsys.readouterr()
        assert json.loads(captured.out)["added"] == 0 and f"nothing added: {tmp_path / path} held {why}" in captured.err
        assert cli.main(["index", "add", str(tmp_path / path), "--index", out]) == 2
        err = capsys.readouterr().err
        assert ("listed above" in err) == (path != "empty")  # an empty folder lists nothing: no "(listed above)"
    assert GalleryIndex.load(out).ntotal == 37
    # ids that are not in the index: none of them -> exit 2 naming them; some of them -> removed, the rest noted
    assert cli.main(["index", "remove", "--index", out, "--ids", "9999"]) == 2
    assert "nothing removed: --ids 9999 not in" in capsys.readouterr().err
    assert cli.main(["index", "remove", "--index", out, "--path-prefix", str(tmp_path / "nowhere")]) == 2
    assert "no indexed path under it" in capsys.readouterr().err
    assert GalleryIndex.load(out).ntotal == 37

    argv = ["index", "remove", "--index", out, "--path-prefix", str(new.parent), "--ids", "0", "9999", "--json"]
    assert cli.main(argv) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["removed"] == 2 and json.loads(captured.out)["not_found"] == [9999]
    assert "1 of the --ids are not in the index: 9999" in captured.err
    assert GalleryIndex.load(out).ntotal == 35


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["index", "build", "--images", "NOPE_DIR", "--out", "X"], "no such image folder"),
        (["index", "info", "--index", "NOPE_IDX"], "index not found"),
        (["index", "search", "--index", "IDX", "--query", "NOPE.jpg"], "query image not found"),
        (["index", "remove", "--index", "IDX"], "nothing to remove"),
    ],
)
def test_cli_bad_input_is_one_clear_line(tmp_path, built, capsys, monkeypatch, argv, message):
    monkeypatch.chdir(tmp_path)
    argv = [str(built["index"]) if a == "IDX" else a for a in argv]
    if argv[1] == "build":
        argv = [*argv, "--checkpoint", str(built["checkpoint"])]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


@pytest.mark.parametrize("k", ["0", "-3", "100000"])
def test_cli_rejects_absurd_k(k, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["index", "search", "--query", "q.jpg", "-k", k])
    assert e.value.code == 2 and "-k" in capsys.readouterr().err


def test_cli_search_with_another_checkpoint_is_refused(tmp_path, built, capsys):
    out = built["index"]
    other = write_checkpoint(tmp_path / "other.pt", seed=3)
    query = sorted((built["tree"] / "query").iterdir())[0]
    assert cli.main(["index", "search", "--index", str(out), "--query", str(query), "--checkpoint", str(other)]) == 2
    assert "rebuild the index" in capsys.readouterr().err


def test_build_help_lists_exactly_the_registered_index_types(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "1000")  # argparse would wrap "re-ranking" at its hyphen
    with pytest.raises(SystemExit):
        cli.main(["index", "build", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    choices = re.search(r"--type \{([^}]*)\}", text).group(1).split(",")
    assert choices == ["auto", *INDEX_TYPES.names()]
    assert all(f"{name} = {INDEX_TYPES.help(name)}" in text for name in INDEX_TYPES)


def test_search_help_names_the_camid_convention(capsys):
    with pytest.raises(SystemExit):
        cli.main(["index", "search", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--exclude-camid CAMID" in text and "camera id, 0-based: file name c1 = camid 0" in text
    assert "--exclude-camera" not in text


@pytest.fixture(scope="module")
def ivf_index(tmp_path_factory, built):
    """An IVF index of 3000 random features under the real embedder's identity (so the CLI accepts it)."""
    folder = tmp_path_factory.mktemp("ivf") / "idx"
    embedder = load_embedder(built["checkpoint"], device="cpu")
    x = np.random.default_rng(0).standard_normal((3000, embedder.feature_dim)).astype(np.float32)
    idx = GalleryIndex.create(embedder_info(embedder, built["checkpoint"]), "ivf-flat")
    idx.add(x, [GalleryItem(f"/g/{i}.jpg", pid=i, camid=i % 3) for i in range(3000)])
    idx.save(folder)
    return folder


def test_a_short_search_says_why_and_which_option_fixes_it(built, ivf_index, capsys):
    """`-k 150 --nprobe 1` on an IVF index used to print fewer results without a word."""
    query = str(sorted((built["tree"] / "query").iterdir())[0])
    nlist = GalleryIndex.load(ivf_index).info()["factory"].split(",")[0][3:]
    argv = ["index", "search", "--index", str(ivf_index), "--query", query, "-k", "150", "--nprobe", "1"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    m = re.search(r"only (\d+) of 150 results: (.*)", out)
    assert m and int(m.group(1)) == len(re.findall(r"/g/\d+\.jpg", out)) < 150
    assert "rerun with a larger --nprobe (now 1;" in m.group(2) and f"--nprobe {nlist} visits every list" in m.group(2)
    assert cli.main([*argv, "--json"]) == 0
    q = json.loads(capsys.readouterr().out)["queries"][0]
    assert q["returned"] == len(q["results"]) < 150 and q["shortfall"]["cause"] == "nprobe"
    assert q["shortfall"]["maximum"] == int(nlist) and "--nprobe" in q["shortfall"]["hint"]
    assert cli.main([*argv[:-1], nlist, "--json"]) == 0  # the suggested option fills k
    q = json.loads(capsys.readouterr().out)["queries"][0]
    assert q["returned"] == 150 and q["shortfall"] is None


def test_a_search_of_a_small_gallery_or_strict_filters_says_so(built, capsys):
    query = str(sorted((built["tree"] / "query").iterdir())[0])
    argv = ["index", "search", "--index", str(built["index"]), "--query", query, "--json"]
    assert cli.main([*argv, "-k", "50"]) == 0
    q = json.loads(capsys.readouterr().out)["queries"][0]
    assert q["returned"] == 36 and "the gallery holds only 36 items" in q["shortfall"]["hint"]
    assert "-k" in q["shortfall"]["hint"]
    assert cli.main([*argv, "-k", "30", "--exclude-camid", "0"]) == 0
    q = json.loads(capsys.readouterr().out)["queries"][0]
    assert q["returned"] == 24 and q["shortfall"]["cause"] == "filters"  # 12 of the 36 items are camid 0
    assert "without --exclude-camid" in q["shortfall"]["hint"]
    assert cli.main([*argv, "-k", "3", "--nprobe", "4"]) == 0  # a flat index has no lists
    assert json.loads(capsys.readouterr().out)["notes"] == ["note: --nprobe has no effect on a flat index"]


def test_file_names_that_are_not_utf8_work_in_every_command(tmp_path, built, capsys):
    """Latin-1 file names: build, info, search (table and JSON), add and remove, without a crash."""
    rng = np.random.default_rng(4)
    gallery = tmp_path / "gallery"
    for n in range(4):
        write_person_image(gallery / f"000{n}_c1s1_000001_00.jpg", n, rng)
    odd = write_person_image(latin1_name(gallery, b"0001_c2s1_000002_00_caf\xe9.jpg"), 1, rng)
    out = str(tmp_path / "idx")
    ckpt = str(built["checkpoint"])
    assert cli.main(["index", "build", "--checkpoint", ckpt, "--images", str(gallery), "--out", out]) == 0
    assert "indexed                 5" in capsys.readouterr().out
    assert cli.main(["index", "info", "--index", out]) == 0
    assert "camids (0-based)" in capsys.readouterr().out
    assert cli.main(["index", "search", "--index", out, "--query", str(odd), "-k", "5"]) == 0
    text = capsys.readouterr().out
    assert "caf\\xe9.jpg  (" in text or "caf\\xe9.jpg\n" in text  # the query line, escaped for the terminal
    assert "0001_c2s1_000002_00_caf\\xe9.jpg" in text.split("\n", 2)[2]  # and among the results
    assert cli.main(["index", "search", "--index", out, "--query", str(odd), "-k", "1", "--json"]) == 0
    top = json.loads(capsys.readouterr().out)["queries"][0]["results"][0]
    assert os.fsencode(top["path"]) == os.fsencode(odd.resolve()) and top["camid"] == 1
    more = write_person_image(latin1_name(tmp_path / "more", b"\xff\xfe.png"), 7, rng)
    assert cli.main(["index", "add", str(more), "--index", out, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["added"] == 1
    assert cli.main(["index", "remove", "--index", out, "--path-prefix", str(more.parent), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["removed"] == 1


def test_a_version_1_index_is_one_line_naming_the_rebuild(tmp_path, built, capsys):
    idx = GalleryIndex.load(built["index"])
    idx.save(tmp_path / "old", force=True)
    gen = tmp_path / "old" / "gen-00000001" / "manifest.json"
    gen.write_text(json.dumps({**json.loads(gen.read_text()), "format_version": 1}))
    assert cli.main(["index", "info", "--index", str(tmp_path / "old")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "reid_ssl index build --checkpoint" in err[0] and err[0].endswith("--overwrite")


def _flags_in_messages(path: Path) -> set[str]:
    """``--flags`` named in the string literals of a module (docstrings left out: they show other tools)."""
    tree = ast.parse(path.read_text())
    docstrings = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.ClassDef))
        and node.body
        and isinstance(node.body[0], ast.Expr)
        and isinstance(node.body[0].value, ast.Constant)
    }
    flags = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            flags |= set(re.findall(r"(?<![\w-])--[a-z][a-z-]*[a-z]", node.value))
    return flags


def test_every_flag_a_message_of_the_index_suggests_exists():
    index_actions = build_parser()._subparsers._group_actions[0].choices["index"]._subparsers._group_actions[0]
    known = {opt for action in index_actions.choices.values() for a in action._actions for opt in a.option_strings}
    files = [
        *sorted((REPO / "reid_ssl" / "index").glob("*.py")),
        *sorted((REPO / "reid_ssl" / "cli").glob("index*.py")),
    ]
    suggested = set().union(*(_flags_in_messages(f) for f in files))
    assert {"--overwrite", "--nprobe", "--ef-search", "--exclude-camid", "--checkpoint"} <= suggested
    assert suggested <= known, f"messages name options that `reid_ssl index` lacks: {suggested - known}"


def test_more_user_mistakes_are_one_line_with_exit_code_2(tmp_path, built, capsys):
    ckpt, tree = str(built["checkpoint"]), str(built["tree"])
    (tmp_path / "a_file").write_text("x")
    cases = [
        (["index", "build", "--checkpoint", ckpt, "--images", tree, "--out", str(tmp_path / "a_file")], "is a file"),
        (["index", "build", "--checkpoint", ckpt, "--images", tree, "--out", "X", "--factory", "IVF,No"], "factory"),
        (["index", "calibrate", "--index", str(built["index"]), "--queries", str(tmp_path)], "no image files"),
    ]
    moved = tmp_path / "moved"
    GalleryIndex.load(built["index"]).save(moved, force=True)
    gen = moved / "gen-00000001" / "manifest.json"
    manifest = json.loads(gen.read_text())
    manifest["embedder"]["checkpoint"] = str(tmp_path / "gone.pt")
    gen.write_text(json.dumps(manifest))
    query = str(sorted((built["tree"] / "query").iterdir())[0])
    cases.append((["index", "search", "--index", str(moved), "--query", query], "pass --checkpoint"))
    for argv, message in cases:
        assert cli.main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err


def test_the_command_line_takes_person_crops_by_the_apps_shape_rule(tmp_path, built, capsys):
    """A 1x1 or 10x5000 image was refused by the app but searched and added by `index search` / `index add`."""
    from PIL import Image

    out = str(tmp_path / "idx")
    GalleryIndex.load(built["index"]).save(out, force=True)
    dot, strip = tmp_path / "bad" / "dot.png", tmp_path / "bad" / "strip.png"
    dot.parent.mkdir()
    Image.new("RGB", (1, 1)).save(dot)
    Image.new("RGB", (10, 5000)).save(strip)
    assert cli.main(["index", "search", "--index", out, "--query", str(dot)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "dot.png: too small for a person crop: 1x1" in err[0] and "prepare video" in err[0]
    assert cli.main(["index", "search", "--index", out, "--query", str(strip)]) == 2
    assert "not the shape of a person crop" in capsys.readouterr().err
    good = write_person_image(tmp_path / "bad" / "0099_c4s1_000001_00.jpg", 99, np.random.default_rng(9))
    assert cli.main(["index", "add", str(dot.parent), "--index", out, "--json"]) == 0
    added = json.loads(capsys.readouterr().out)
    assert added["added"] == 1 and {Path(p).name for p, _ in added["skipped"]} == {"dot.png", "strip.png"}
    assert GalleryIndex.load(out).ntotal == 37 and good.is_file()
