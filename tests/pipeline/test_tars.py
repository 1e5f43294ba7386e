"""iter_tar_samples, the one webdataset grouper: grouping by key, truncation caught, not passed silently."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest

from geoloc.pipeline.tars import TarSampleError, iter_tar_samples


def _tar(path: Path, members: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    path.write_bytes(buf.getvalue())
    return buf.getvalue()


MEMBERS = [
    ("d/a.json", b"{}"),
    ("d/a.emb.npy", b"x" * 700),
    ("d/b.json", b"{1}"),
    ("d/b.JPG", b"jp"),
    (".hidden.json", b""),
    ("noext", b""),
    ("c.json", b"{2}"),
]


def test_groups_consecutive_members_by_key(tmp_path: Path) -> None:
    _tar(tmp_path / "s.tar", MEMBERS)
    got = list(iter_tar_samples(tmp_path / "s.tar", read=("json",), lower=True))
    assert [s.key for s in got] == ["d/a", "d/b", "c"]
    assert sorted(got[0].infos) == ["emb.npy", "json"] and sorted(got[1].infos) == ["jpg", "json"]
    assert [s.data for s in got] == [{"json": b"{}"}, {"json": b"{1}"}, {"json": b"{2}"}]


def test_cut_inside_a_header_is_an_error_not_an_end(tmp_path: Path) -> None:
    data = _tar(tmp_path / "s.tar", MEMBERS[:4])
    # d/a.json 0-1024, d/a.emb.npy 1024-2560, d/b.json 2560-3584: cut inside d/b.json's data.
    (tmp_path / "s.tar").write_bytes(data[: 2560 + 612])
    seen = []
    with pytest.raises(TarSampleError) as err:
        for s in iter_tar_samples(tmp_path / "s.tar", read=("json",)):
            seen.append(s.key)
    assert seen == ["d/a"]
    assert err.value.partial is not None and err.value.partial.key == "d/b"
    assert isinstance(err.value, tarfile.ReadError)


def test_cut_between_members_is_caught_by_the_end_check(tmp_path: Path) -> None:
    data = _tar(tmp_path / "s.tar", MEMBERS[:4])
    # Exactly where the third member's header starts: tarfile alone reads this as a normal end of archive.
    (tmp_path / "s.tar").write_bytes(data[:2560])
    with pytest.raises(TarSampleError, match="truncated tar") as err:
        list(iter_tar_samples(tmp_path / "s.tar"))
    assert err.value.samples == 0 and err.value.partial is not None and err.value.partial.key == "d/a"


def test_cut_inside_member_data_is_an_error(tmp_path: Path) -> None:
    data = _tar(tmp_path / "s.tar", MEMBERS[:2])
    (tmp_path / "s.tar").write_bytes(data[: 512 + 512 + 512 + 300])  # inside d/a.emb.npy's data
    with pytest.raises(TarSampleError) as err:
        list(iter_tar_samples(tmp_path / "s.tar", read=("emb.npy",)))
    assert err.value.samples == 0 and err.value.partial is not None and err.value.partial.key == "d/a"
