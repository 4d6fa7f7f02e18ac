"""sar_fast.files' atomic replacement: the one way the package replaces a file (checkpoints,
exports, caches, shards, manifests, reports). A reader sees the old file or the whole new
one; an error inside the block leaves the old file and no temporary file behind."""
import json
import os

import numpy as np
import pytest

from sar_fast import files


class Boom(Exception):
    pass


def _names(folder) -> list[str]:
    return sorted(os.listdir(folder))


def test_new_content_appears_only_when_the_block_exits(tmp_path):
    path = tmp_path / "a.bin"
    path.write_bytes(b"old")
    with files.atomic_write(path) as f:
        f.write(b"new, first half ")
        f.flush()
        assert path.read_bytes() == b"old"  # a reader now still sees the old file whole
        f.write(b"and second half")
        f.flush()
        assert path.read_bytes() == b"old"
    assert path.read_bytes() == b"new, first half and second half"
    assert _names(tmp_path) == ["a.bin"]


def test_a_new_file_does_not_exist_until_the_block_exits(tmp_path):
    path = tmp_path / "fresh.json"
    with files.atomic_write(path, "w") as f:
        f.write('{"x": 1}')
        f.flush()
        assert not path.exists()
    assert json.loads(path.read_text()) == {"x": 1}


def test_an_error_inside_the_block_keeps_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "a.bin"
    path.write_bytes(b"old")
    with pytest.raises(Boom):
        with files.atomic_write(path) as f:
            f.write(b"half a new file")
            f.flush()
            raise Boom()
    assert path.read_bytes() == b"old"
    assert _names(tmp_path) == ["a.bin"]


def test_an_error_on_a_new_path_leaves_nothing(tmp_path):
    with pytest.raises(Boom):
        with files.atomic_write(tmp_path / "never.npz") as f:
            np.savez(f, x=np.arange(3))
            raise Boom()
    assert _names(tmp_path) == []


def test_atomic_path_serves_writers_that_take_a_name(tmp_path):
    path = tmp_path / "plot.png"
    with files.atomic_path(path, suffix=".png") as tmp:
        assert tmp.endswith(".png") and os.path.dirname(tmp) == str(tmp_path)
        with open(tmp, "wb") as f:
            f.write(b"png bytes")
        assert not path.exists()
    assert path.read_bytes() == b"png bytes"
    assert _names(tmp_path) == ["plot.png"]
    with pytest.raises(Boom):
        with files.atomic_path(path) as tmp:
            with open(tmp, "wb") as f:
                f.write(b"cut short")
            raise Boom()
    assert path.read_bytes() == b"png bytes"
    assert _names(tmp_path) == ["plot.png"]


def test_each_call_gets_its_own_temporary_file(tmp_path):
    path = tmp_path / "shared.txt"
    with files.atomic_path(path) as first, files.atomic_path(path) as second:
        assert first != second
        for name, text in ((first, "one"), (second, "two")):
            with open(name, "w") as f:
                f.write(text)
    assert path.read_text() == "one"  # the outer block exits last and wins
    assert _names(tmp_path) == ["shared.txt"]


def test_the_folder_is_synced_after_the_rename(tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr(files, "fsync_dir", lambda folder: seen.append((folder, _names(folder))))
    files.write_json_atomic(tmp_path / "m.json", {"a": [1, 2]})
    assert seen == [(str(tmp_path), ["m.json"])]


def test_write_json_atomic(tmp_path):
    path = tmp_path / "m.json"
    files.write_json_atomic(path, {"a": [1, 2]})
    assert path.read_text() == json.dumps({"a": [1, 2]}, indent=1)
    files.write_json_atomic(path, {"b": object()}, default=lambda v: "obj")
    assert json.loads(path.read_text()) == {"b": "obj"}
    with pytest.raises(TypeError):  # not serialisable: the previous document stays
        files.write_json_atomic(path, {"c": object()})
    assert json.loads(path.read_text()) == {"b": "obj"}
    assert _names(tmp_path) == ["m.json"]


@pytest.mark.parametrize("mode", ["a", "ab", "r+", "x"])
def test_only_whole_file_write_modes(tmp_path, mode):
    with pytest.raises(ValueError, match="mode"):
        with files.atomic_write(tmp_path / "a", mode):
            pass
    assert _names(tmp_path) == []
