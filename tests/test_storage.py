"""Atomic writes: what they leave behind (permissions, links, names), and how bad record files are refused."""

import os
import stat

import pytest

from tf_retrieval.errors import InvalidInputError
from tf_retrieval.storage import RecordStore, atomic_directory, save_with_digest, write_json, write_text


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_new_files_and_folders_get_the_umask_modes_and_rewritten_ones_keep_theirs(tmp_path, umask_022):
    write_json(tmp_path / "new.json", {"a": 1})
    assert mode(tmp_path / "new.json") == 0o644  # as open() would make it, not mkstemp's owner-only 0600
    os.chmod(tmp_path / "new.json", 0o640)
    write_text(tmp_path / "new.json", "{}")
    assert mode(tmp_path / "new.json") == 0o640 and (tmp_path / "new.json").read_text() == "{}"

    with atomic_directory(tmp_path / "bundle") as tmp:
        write_text(os.path.join(tmp, "catalog.json"), "[]")
    assert mode(tmp_path / "bundle") == 0o755  # not mkdtemp's 0700
    os.chmod(tmp_path / "bundle", 0o750)
    with atomic_directory(tmp_path / "bundle") as tmp:
        write_text(os.path.join(tmp, "catalog.json"), "[1]")
    assert mode(tmp_path / "bundle") == 0o750

    path = save_with_digest(lambda p: open(p, "w").write("weights"), str(tmp_path / "run"), "head", ".keras")
    assert mode(path) == 0o644


def test_links_are_written_through(tmp_path):
    (tmp_path / "big").mkdir()
    (tmp_path / "big" / "bundle").mkdir()
    (tmp_path / "big" / "bundle" / "old").write_text("old")
    os.symlink(tmp_path / "big" / "bundle", tmp_path / "bundle")
    with atomic_directory(tmp_path / "bundle") as tmp:
        write_text(os.path.join(tmp, "new"), "new")
    assert os.path.islink(tmp_path / "bundle")  # still the link, and its target holds only the new content
    assert sorted(os.listdir(tmp_path / "big")) == ["bundle"] and os.listdir(tmp_path / "big" / "bundle") == ["new"]
    assert sorted(os.listdir(tmp_path)) == ["big", "bundle"]  # no temp folder left beside the link

    os.symlink(tmp_path / "big" / "bundle" / "new", tmp_path / "file-link")
    write_text(tmp_path / "file-link", "newer")
    assert os.path.islink(tmp_path / "file-link") and (tmp_path / "big" / "bundle" / "new").read_text() == "newer"


def test_save_with_digest_names_the_file_by_its_content_with_an_absolute_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    saved = []

    def save(path):
        saved.append(path)
        with open(path, "w") as f:
            f.write("content")

    path = save_with_digest(save, "run", "head", ".keras")
    assert os.path.isabs(path) and os.path.dirname(path) == str(tmp_path / "run")
    assert os.path.basename(path).startswith("head-") and path.endswith(".keras")
    assert saved[0].endswith(".keras") and saved[0] != path and not os.path.exists(saved[0])  # a temp, renamed
    assert save_with_digest(save, "run", "head", ".keras") == path  # same content, same name
    assert saved[0] != saved[1]  # each save its own temp file: two at once do not write into each other's
    assert os.listdir(tmp_path / "run") == [os.path.basename(path)]


def test_a_records_path_that_is_a_folder_is_a_clear_error(tmp_path):
    with pytest.raises(InvalidInputError, match="is a folder, not a records file"):
        RecordStore(tmp_path, key=("run",)).load()
