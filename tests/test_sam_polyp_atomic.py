"""examples.sam_polyp.atomic: a failed write leaves the old file and no temp files."""

import pytest

from examples.sam_polyp.atomic import atomic_path


def test_atomic_path_replaces_on_success_and_keeps_old_file_on_failure(tmp_path):
    target = tmp_path / "sub" / "results.json"
    with atomic_path(target) as tmp:
        tmp.write_text("first")
    assert target.read_text() == "first"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half writ")
            raise RuntimeError("crash mid-write")
    assert target.read_text() == "first"
    assert sorted(p.name for p in target.parent.iterdir()) == ["results.json"]
