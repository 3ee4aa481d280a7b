"""The one output contract (reid_ssl.fileio): nothing that exists is replaced without --overwrite."""

from __future__ import annotations

from pathlib import Path

import pytest

from reid_ssl.errors import AlreadyExistsError, InputError
from reid_ssl.fileio import check_new_file, check_output_folder, check_result_file, write_json


def test_check_new_file(tmp_path: Path) -> None:
    src, other = tmp_path / "in.pt", tmp_path / "other.pt"
    src.write_bytes(b"input")
    other.write_bytes(b"other")
    assert check_new_file(tmp_path / "new.pt", False) == tmp_path / "new.pt"
    with pytest.raises(AlreadyExistsError, match=r"--out .*other.pt already exists.*--overwrite"):
        check_new_file(other, False)
    assert check_new_file(other, True) == other
    for overwrite in (False, True):  # the input itself, also through another spelling of its path
        with pytest.raises(InputError, match="is the input"):
            check_new_file(tmp_path / "." / "in.pt", overwrite, inputs=[src])
    with pytest.raises(InputError, match="is a folder"):
        check_new_file(tmp_path, True)


def test_check_output_folder(tmp_path: Path) -> None:
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("x")
    with pytest.raises(AlreadyExistsError, match="not empty and does not hold a thing"):
        check_output_folder(mine, False, lambda p: False, "a thing")
    check_output_folder(mine, False, lambda p: True, "a thing")  # its own output
    check_output_folder(mine, True, lambda p: False, "a thing")
    (tmp_path / "empty").mkdir()
    check_output_folder(tmp_path / "empty", False, lambda p: False, "a thing")
    check_output_folder(tmp_path / "new", False, lambda p: False, "a thing")
    with pytest.raises(InputError, match="is a file"):
        check_output_folder(mine / "notes.txt", True, lambda p: True, "a thing")


def test_check_result_file(tmp_path: Path) -> None:
    path = tmp_path / "eval.json"
    check_result_file(path, {"a": 1}, False)
    write_json(path, {"rank1": 0.5, "options": {"a": 1}})
    check_result_file(path, {"a": 1}, False)  # an identical re-run
    with pytest.raises(AlreadyExistsError, match=r"other options \(a: 1 -> 2\)"):
        check_result_file(path, {"a": 2}, False)
    check_result_file(path, {"a": 2}, True)
    write_json(path, {"rank1": 0.5})
    with pytest.raises(AlreadyExistsError, match="not recorded"):
        check_result_file(path, {"a": 1}, False)
