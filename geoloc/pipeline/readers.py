"""Readers: a validated :class:`~geoloc.pipeline.manifests.Manifest` → a stream of :class:`Item` /
:class:`Failure`.

Readers do the *cheap* work in the main process: find each item's bytes (loose file, zip member, tar member,
Parquet cell) or text, and check what can be checked without decoding — a missing file, an empty or
non-finite / out-of-range coordinate, a duplicate id, a path escaping the dataset root. Each such problem
becomes a :class:`Failure` with a one-line reason and the job goes on; decoding (and corrupt-image detection)
happens later in the embed job's DataLoader workers. Only a dataset that is unusable as a whole (root, table
or required column missing) raises :class:`~geoloc.errors.ManifestError`.

Metadata tables (CSV / TSV / Parquet / COCO JSON) go through polars lazily, so projections and the
manifest's row filters run vectorised and a 100M-row TSV is streamed, never loaded whole. Every column is read
as text with NA-string parsing off: ``"NA"`` (Namibia, OSV-5M quirk C) stays ``"NA"``; an empty field is null.

Formats (``format`` in the manifest):
- ``folder``: a table row per item, image at ``<root>/<images>/<image_path>``.
- ``zip``: a table row per item, image = the archive member whose basename is ``member`` (``{id}.jpg``),
  found by walking the archives' member lists (no extraction); items come archive by archive.
- ``wds``: webdataset tar shards; a sample = consecutive members sharing a key, image
  ``.jpg/.jpeg/.png/.webp`` and ``.json`` metadata (lat/lon/labels; ``__key__`` is available as a column).
- ``parquet``: Parquet files with an image-bytes column (binary, or a ``{bytes, path}`` struct as written by
  Hugging Face ``datasets``), streamed row group by row group.
- ``text``: a table row per item; the payload is the ``text`` template.
"""

from __future__ import annotations

import functools
import hashlib
import heapq
import json
import math
import os
import posixpath
import tarfile
import zipfile
import zlib
from collections.abc import Container, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import polars as pl

from geoloc.errors import ManifestError
from geoloc.pipeline.items import Failure, Item
from geoloc.pipeline.manifests import Manifest, SplitSpec, TableSpec, Template
from geoloc.pipeline.tars import iter_tar_samples
from geoloc.suggest import did_you_mean

__all__ = ["IMAGE_EXTENSIONS", "count_items", "iter_items", "unit_hash"]

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
_ROW = "_row"
_BATCH_ROWS = 8192


def unit_hash(ident: str, purpose: bytes = b"split") -> float:
    """A deterministic, platform- and version-independent hash of an id into [0, 1).

    Used for hash splits (``fraction``) and the ``limit`` subsample, which use different ``purpose`` salts
    so that a subsample is not correlated with the split.
    """
    d = hashlib.blake2b(ident.encode("utf-8"), digest_size=8, person=purpose[:16]).digest()
    return int.from_bytes(d, "big") / 2.0**64


# --------------------------------------------------------------------------------------------- public API
def iter_items(
    manifest: Manifest, splits: Sequence[str] | None = None, skip_ids: Container[str] = ()
) -> Iterator[Item | Failure]:
    """Yield every item of the selected splits (manifest order by default), or a Failure for each bad one.

    Args:
        manifest: a loaded manifest.
        splits: split names to read; None = all, in manifest order.
        skip_ids: ids to leave out silently (already in the store); their bytes are not read.

    Ids are unique over one call: a repeated id (within or across splits) is a Failure after its first use.
    Raises ManifestError only when the dataset as a whole is unusable (root, table, archives or a required
    column missing); the message says what to fix.
    """
    chosen = _choose_splits(manifest, splits)
    _check_root(manifest)  # raised here, before the caller starts a progress bar, not at the first next()
    return _iter_splits(manifest, chosen, _Guard(skip_ids))


def _iter_splits(m: Manifest, chosen: list[SplitSpec], guard: _Guard) -> Iterator[Item | Failure]:
    reader = _READERS[m.format]
    for split in chosen:
        yield from reader(m, split, guard)


def count_items(manifest: Manifest, splits: Sequence[str] | None = None) -> int | None:
    """How many records (items + failures) :func:`iter_items` will yield without ``skip_ids``, for an ETA.

    Exact for table-backed formats and Parquet (cheap: polars counts / Parquet footers; splits with a
    ``fraction`` or a ``limit`` hash the ids once), plus one failure per unreadable archive or shard. For
    webdataset shards it uses ``sizes.json`` next to the shards when present, else counts sample keys from the
    tar headers. Returns None if no cheap count exists.
    """
    chosen = _choose_splits(manifest, splits)
    _check_root(manifest)
    total = 0
    for split in chosen:
        n = _COUNTERS[manifest.format](manifest, split)
        if n is None:
            return None
        total += n
    return total


# --------------------------------------------------------------------------------------------- shared checks
def _choose_splits(m: Manifest, splits: Sequence[str] | None) -> list[SplitSpec]:
    if splits is None:
        return list(m.splits.values())
    if isinstance(splits, str):
        splits = [splits]
    out = []
    for s in splits:
        if s not in m.splits:
            did = did_you_mean(s, list(m.splits))
            raise ManifestError(f"{m.path}: no split '{s}'{did}; splits: {', '.join(m.splits)}")
        out.append(m.splits[s])
    return out


def _check_root(m: Manifest) -> None:
    if not m.root.is_dir():
        raise ManifestError(
            f"{m.path.name}: dataset root {m.root} not found; pass --root DIR (or set `root` in {m.path})"
        )


@functools.lru_cache(maxsize=16)
def _real_root(root: Path) -> str:
    return os.path.realpath(root)


def _inside(m: Manifest, p: Path) -> bool:
    """True when ``p`` (after following symlinks) lies inside the dataset root."""
    real = os.path.realpath(p)
    root = _real_root(m.root)
    return real == root or real.startswith(root.rstrip(os.sep) + os.sep)


def _dataset_file(m: Manifest, rel: str, what: str) -> Path:
    p = m.root / rel
    if not _inside(m, p):
        raise ManifestError(
            f"{m.path.name}: {what} {rel!r} resolves outside the dataset root {m.root} (a symlink?); "
            "keep data under the root"
        )
    if not p.is_file():
        raise ManifestError(
            f"{m.path.name}: {what} {p} not found; check `root` (or --root) and the manifest's paths"
        )
    return p


def _dataset_glob(m: Manifest, pattern: str, what: str) -> list[Path]:
    files = sorted(p for p in m.root.glob(pattern) if p.is_file())
    if not files:
        raise ManifestError(
            f"{m.path.name}: no {what} match {pattern!r} under {m.root}; "
            "check `root` (or --root) and `images`"
        )
    for p in files:
        if not _inside(m, p):
            raise ManifestError(
                f"{m.path.name}: {what} {p} resolves outside the dataset root (a symlink?); "
                "keep data under the root"
            )
    return files


def _rel(m: Manifest, p: Path) -> str:
    try:
        return p.relative_to(m.root).as_posix()
    except ValueError:
        return str(p)


def _coord(raw: Any, name: str, bound: float) -> tuple[float | None, str | None]:
    if raw is None or (isinstance(raw, str) and not raw.strip()):
        return None, f"no coordinates: {name} is empty"
    try:
        v = float(raw)
    except (TypeError, ValueError):
        return None, f"{name} {raw!r} is not a number"
    if not math.isfinite(v):
        return None, f"{name} {raw!r} is not finite"
    if not -bound <= v <= bound:
        return None, f"{name} {v} out of range [-{bound:g}, {bound:g}]"
    return v, None


class _Guard:
    """Per-call bookkeeping: skipped ids, ids already used (duplicates), coordinate checks."""

    def __init__(self, skip_ids: Container[str] = ()) -> None:
        self.skip = skip_ids
        self.seen: set[str] = set()
        self.keep: dict[tuple, set[str]] = {}  # `limit` selections per table + filters, for this call only

    def admit(self, ident: str | None, source: str, split: str) -> Failure | bool:
        """False = skip silently; True = go on; a Failure = report it."""
        if ident is None or ident == "":
            return Failure(
                id="", source=source, reason="empty id; every row needs a non-empty id", split=split
            )
        if ident in self.skip:
            self.seen.add(ident)
            return False
        if ident in self.seen:
            return Failure(
                id=ident, source=source, split=split,
                reason=f"duplicate id {ident!r} (an earlier row already used it); ids must be unique",
            )  # fmt: skip
        self.seen.add(ident)
        return True

    @staticmethod
    def coords(lat_raw: Any, lon_raw: Any) -> tuple[float, float] | str:
        lat, why = _coord(lat_raw, "latitude", 90.0)
        if why:
            return why
        lon, why = _coord(lon_raw, "longitude", 180.0)
        if why:
            return why
        return lat, lon  # type: ignore[return-value]


@dataclass
class _Row:
    """One metadata row with its roles rendered; ``ref`` is the image path / member name / text."""

    ident: str | None
    lat: Any
    lon: Any
    ref: Any
    labels: dict[str, str | None]
    source: str


def _render_row(m: Manifest, values: dict[str, Any], source: str, ref_role: str | None = None) -> _Row:
    """Render the roles of a metadata dict in Python (webdataset JSON, Parquet rows)."""
    c = m.columns

    def value(role: str) -> Any:  # a bare column keeps its type (JSON numbers stay numbers)
        t = c[role]
        return values.get(t.parts[0][0]) if t.is_column else t.render(values)

    return _Row(
        ident=c["id"].render(values),
        lat=value("lat"),
        lon=value("lon"),
        ref=value(ref_role) if ref_role else None,
        labels={k: t.render(values) for k, t in m.labels.items()},
        source=source,
    )


def _frame_row(m: Manifest, values: dict[str, Any], source: str, ref_role: str) -> _Row:
    """A row of :func:`_split_frame`, whose roles polars already rendered."""
    return _Row(
        ident=values["_id"],
        lat=values["_lat"],
        lon=values["_lon"],
        ref=values[f"_{ref_role}"],
        labels={k: values[f"_label_{i}"] for i, k in enumerate(m.labels)},
        source=source,
    )


def _selected(ident: str | None, split: SplitSpec, keep: set[str] | None) -> bool:
    """Hash-split and limit selection (applied before skip / duplicate checks)."""
    key = ident or ""
    if keep is not None and key not in keep:
        return False
    if split.fraction is not None:
        lo, hi = split.fraction
        return lo <= unit_hash(key) < hi
    return True


# --------------------------------------------------------------------------------------------- tables
def _template_expr(t: Template) -> pl.Expr:
    """The polars expression for a template (null when a required field is null or empty)."""
    exprs: list[pl.Expr] = []
    for p in t.parts:
        if isinstance(p, str):
            exprs.append(pl.lit(p))
            continue
        col, a, b, pad, default = p
        e = pl.col(col).cast(pl.String)
        e = pl.when(e == "").then(None).otherwise(e)
        if a is not None or b is not None:
            start = a or 0
            if start < 0 or (b is not None and b < 0):
                raise ManifestError(
                    f"template {t.text!r}: negative slices are not supported in table columns"
                )
            e = e.str.slice(start, None if b is None else max(b - start, 0))
        if pad is not None:
            e = e.str.zfill(pad)
        if default is not None:
            e = e.fill_null(pl.lit(default))
        exprs.append(e)
    return pl.concat_str(exprs, ignore_nulls=False)


def _needed_columns(m: Manifest, roles: Iterable[str], split: SplitSpec) -> dict[str, str]:
    """Source column → what needs it (for the 'column not found' message)."""
    need: dict[str, str] = {}
    for role in roles:
        for col in m.columns[role].columns:
            need.setdefault(col, f"columns.{role}")
    for lname, t in m.labels.items():
        for col in t.columns:
            need.setdefault(col, f"label {lname!r}")
    for col, _ in split.equals:
        need.setdefault(col, f"splits.{split.name}.equals")
    for col, _ in split.at_least:
        need.setdefault(col, f"splits.{split.name}.at_least")
    need.pop(_ROW, None)
    return need


def _missing_column(m: Manifest, table: str, col: str, why: str, have: Sequence[str]) -> ManifestError:
    did = did_you_mean(col, list(have), cutoff=0.5)
    shown = ", ".join(list(have)[:40]) + (" ..." if len(have) > 40 else "")
    return ManifestError(f"{m.path.name}: {table}: column '{col}' ({why}) not found{did}; columns: {shown}")


def _coco_frame(m: Manifest, path: Path, want: set[str]) -> pl.DataFrame:
    """COCO-style JSON (iNat21): images left-joined with their first annotation's category and taxonomy."""
    try:
        data = json.loads(path.read_bytes())
    except (OSError, ValueError) as e:
        raise ManifestError(f"{m.path.name}: {path}: not a readable COCO JSON ({e}); re-download it") from e
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise ManifestError(f"{m.path.name}: {path}: no 'images' list; is this a COCO-style annotation file?")
    cat_of: dict[Any, Any] = {}
    for a in data.get("annotations") or []:
        cat_of.setdefault(a.get("image_id"), a.get("category_id"))
    cats = {c.get("id"): c for c in data.get("categories") or []}
    cat_keys = {k for c in cats.values() for k in c if k != "id"}
    img_keys = {k for im in data["images"][:1000] for k in im}
    have = sorted(img_keys | cat_keys | {"category_id"})
    for col in want:
        if col not in have:
            raise _missing_column(m, path.name, col, "COCO images/categories", have)

    def text(v: Any) -> str | None:
        if v is None or (isinstance(v, float) and not math.isfinite(v)):
            return None  # iNat21 writes missing coordinates as NaN or null: both mean "no coordinates"
        return str(v)

    cols: dict[str, list[str | None]] = {c: [] for c in want}
    for im in data["images"]:
        cid = cat_of.get(im.get("id"))
        cat = cats.get(cid, {})
        for c in want:
            if c == "category_id":
                cols[c].append(text(cid))
            elif c in im:
                cols[c].append(text(im[c]))
            else:
                cols[c].append(text(cat.get(c)))
    return pl.DataFrame(cols, schema={c: pl.String for c in want})


def _scan(m: Manifest, spec: TableSpec, need: dict[str, str], add_row: bool = True) -> pl.LazyFrame:
    """A lazy frame of the needed columns (all text) plus ``_row`` (1-based data-row number)."""
    path = _dataset_file(m, spec.path, "table")
    if spec.format == "coco":
        lf = _coco_frame(m, path, set(need)).lazy()
    else:
        if spec.format == "parquet":
            lf = pl.scan_parquet(path, glob=False)
        else:
            lf = pl.scan_csv(
                path,
                has_header=spec.header,
                separator=spec.delimiter,
                quote_char=spec.quote or None,
                infer_schema=False,  # everything is text: no "NA" → null, no id → int64 rounding
                new_columns=list(spec.names) or None,
                encoding="utf8-lossy",
                truncate_ragged_lines=True,
                glob=False,
            )
        try:
            have = lf.collect_schema().names()
        except (pl.exceptions.PolarsError, OSError) as e:
            raise ManifestError(f"{m.path.name}: cannot read table {path}: {e}") from e
        for col, why in need.items():
            if col not in have:
                raise _missing_column(m, spec.path, col, why, have)
    if add_row:
        lf = lf.with_row_index(_ROW, offset=1)
    return lf.select([pl.col(c).cast(pl.String) for c in need] + ([pl.col(_ROW)] if add_row else []))


def _split_frame(m: Manifest, split: SplitSpec, roles: Sequence[str]) -> pl.LazyFrame:
    """The split's table, joined and filtered, with every role and label rendered (vectorised).

    Output columns: ``_row``, ``_<role>`` for each role (``_id``, ``_lat``, ``_lon``, ``_image_path`` ...)
    and ``_label_<i>`` per label column; hash fraction and limit are applied later, in Python.
    """
    assert split.table is not None
    need = _needed_columns(m, roles, split)
    joined: set[str] = set()
    if split.join is not None:
        joined = set(split.join.columns)
        need.setdefault(split.join.left_on, f"splits.{split.name}.join.left_on")
    main_need = {c: w for c, w in need.items() if c not in joined}
    lf = _scan(m, split.table, main_need)
    if split.join is not None:
        j = split.join
        right_need = {j.right_on: f"splits.{split.name}.join.right_on"} | {
            c: f"splits.{split.name}.join.columns" for c in j.columns
        }
        rf = _scan(m, j.table, right_need, add_row=False)
        if j.right_on != j.left_on:
            rf = rf.rename({j.right_on: j.left_on})
        rf = rf.unique(subset=[j.left_on], keep="first")
        lf = lf.join(rf, on=j.left_on, how="left", maintain_order="left")
    conds: list[pl.Expr] = []
    if split.require_coordinates:
        conds += [
            _template_expr(m.columns["lat"]).is_not_null(),
            _template_expr(m.columns["lon"]).is_not_null(),
        ]
    for col, value in split.equals:
        conds.append(pl.col(col) == value)
    for col, bound in split.at_least:
        conds.append(pl.col(col).str.strip_chars().cast(pl.Float64, strict=False) >= bound)
    if split.exclude_ids is not None:
        ids_path = _dataset_file(m, split.exclude_ids, "exclude_ids file")
        with open(ids_path, encoding="utf-8") as f:
            excluded = [line.strip() for line in f if line.strip()]
        id_expr = _template_expr(m.columns["id"])
        conds.append(~id_expr.is_in(pl.Series(excluded, dtype=pl.String)).fill_null(False))
    for c in conds:
        lf = lf.filter(c)
    out = [pl.col(_ROW)] + [_template_expr(m.columns[r]).alias(f"_{r}") for r in roles]
    out += [_template_expr(t).alias(f"_label_{i}") for i, t in enumerate(m.labels.values())]
    return lf.select(out)


def _iter_table_rows(m: Manifest, lf: pl.LazyFrame, table_name: str) -> Iterator[dict[str, Any]]:
    try:
        for df in lf.collect_batches(chunk_size=_BATCH_ROWS):
            yield from df.iter_rows(named=True)
    except pl.exceptions.PolarsError as e:
        raise ManifestError(f"{m.path.name}: cannot read table {table_name}: {e}") from e


def _limit_keep(m: Manifest, split: SplitSpec, roles: Sequence[str], guard: _Guard) -> set[str] | None:
    """The ids kept by ``limit``: the ``limit`` rows with the smallest subsample hash, per table+filters.

    Splits that share a table (and filters) get the same kept set, so their fractions partition it.
    """
    if m.limit is None:
        return None
    assert split.table is not None
    key = (split.table.path, split.equals, split.at_least, split.exclude_ids, split.require_coordinates)
    if key not in guard.keep:
        lf = _split_frame(m, split, roles)
        ids = (r["_id"] or "" for r in _iter_table_rows(m, lf, split.table.path))
        guard.keep[key] = set(heapq.nsmallest(m.limit, ids, key=lambda i: unit_hash(i, b"subsample")))
    return guard.keep[key]


def _table_rows(m: Manifest, split: SplitSpec, roles: Sequence[str], guard: _Guard) -> Iterator[_Row]:
    """Rendered rows of a table-backed split after filters, hash fraction and limit."""
    assert split.table is not None
    keep = _limit_keep(m, split, roles, guard)
    name = PurePosixPath(split.table.path).name
    for values in _iter_table_rows(m, _split_frame(m, split, roles), split.table.path):
        row = _frame_row(m, values, f"{name}:row {values[_ROW]}", roles[-1])
        if _selected(row.ident, split, keep):
            yield row


def _count_table(m: Manifest, split: SplitSpec, roles: Sequence[str]) -> int:
    assert split.table is not None
    lf = _split_frame(m, split, roles)
    if split.fraction is None and m.limit is None:
        try:
            return int(lf.select(pl.len()).collect().item())
        except pl.exceptions.PolarsError as e:
            raise ManifestError(f"{m.path.name}: cannot read table {split.table.path}: {e}") from e
    keep = _limit_keep(m, split, roles, _Guard())
    n = 0
    for values in _iter_table_rows(m, lf.select("_id"), split.table.path):
        n += _selected(values["_id"], split, keep)
    return n


def _admit_row(guard: _Guard, row: _Row, split: str) -> Failure | tuple[float, float] | None:
    ok = guard.admit(row.ident, row.source, split)
    if ok is False:
        return None
    if isinstance(ok, Failure):
        return ok
    latlon = guard.coords(row.lat, row.lon)
    if isinstance(latlon, str):
        return Failure(id=row.ident or "", source=row.source, reason=latlon, split=split)
    return latlon


# --------------------------------------------------------------------------------------------- folder
_FOLDER_ROLES = ("id", "lat", "lon", "image_path")


def _read_file(m: Manifest, base: Path, rel: str | None, row: _Row, split: str) -> bytes | Failure:
    fail = lambda why: Failure(id=row.ident or "", source=row.source, reason=why, split=split)  # noqa: E731
    if rel is None:
        return fail(
            f"no image path: a column of columns.image_path ({m.columns['image_path'].text!r}) is empty"
        )
    p = PurePosixPath(rel.replace("\\", "/"))
    if p.is_absolute() or ".." in p.parts:
        return fail(f"image path {rel!r} escapes the dataset root; paths must be relative to it")
    full = base / p
    if not _inside(m, full):
        return fail(
            f"image path {rel!r} resolves outside the dataset root (a symlink?); keep images under the root"
        )
    try:
        data = full.read_bytes()
    except FileNotFoundError:
        return fail(
            f"image {_rel(m, full)} not found; check `root`/`images` in the manifest or the path column"
        )
    except OSError as e:
        return fail(f"cannot read image {_rel(m, full)}: {e.strerror or e}")
    if not data:
        return fail(f"image {_rel(m, full)} is an empty file")
    return data


def _iter_folder(m: Manifest, split: SplitSpec, guard: _Guard) -> Iterator[Item | Failure]:
    base = m.root / (split.images or ".")
    for row in _table_rows(m, split, _FOLDER_ROLES, guard):
        got = _admit_row(guard, row, split.name)
        if got is None or isinstance(got, Failure):
            if got is not None:
                yield got
            continue
        data = _read_file(m, base, row.ref, row, split.name)
        if isinstance(data, Failure):
            yield data
            continue
        yield Item(
            id=row.ident, split=split.name, lat=got[0], lon=got[1], payload=data,  # type: ignore[arg-type]
            source=_rel(m, base / row.ref), kind="image", labels=row.labels,
        )  # fmt: skip


# --------------------------------------------------------------------------------------------- text
_TEXT_ROLES = ("id", "lat", "lon", "text")


def _iter_text(m: Manifest, split: SplitSpec, guard: _Guard) -> Iterator[Item | Failure]:
    text_t = m.columns["text"]
    for row in _table_rows(m, split, _TEXT_ROLES, guard):
        got = _admit_row(guard, row, split.name)
        if got is None or isinstance(got, Failure):
            if got is not None:
                yield got
            continue
        text = row.ref
        if text is None or not text.strip():
            yield Failure(
                id=row.ident or "",
                source=row.source,
                reason=f"empty text ({text_t.text!r})",
                split=split.name,
            )
            continue
        yield Item(
            id=row.ident, split=split.name, lat=got[0], lon=got[1], payload=text,  # type: ignore[arg-type]
            source=row.source, kind="text", labels=row.labels,
        )  # fmt: skip


# --------------------------------------------------------------------------------------------- zip
_ZIP_ROLES = ("id", "lat", "lon", "member")
_MEMBER = "_member"


def _zip_index(m: Manifest, archives: list[Path]) -> tuple[pl.DataFrame, list[Failure]]:
    """(member basename, archive number, position in the archive's member list) for every file member."""
    names: list[str] = []
    arch: list[int] = []
    pos: list[int] = []
    bad: list[Failure] = []
    for a, path in enumerate(archives):
        try:
            with zipfile.ZipFile(path) as zf:
                for i, info in enumerate(zf.infolist()):
                    if not info.is_dir():
                        names.append(posixpath.basename(info.filename))
                        arch.append(a)
                        pos.append(i)
        except (zipfile.BadZipFile, OSError) as e:
            bad.append(
                Failure(
                    id="",
                    source=_rel(m, path),
                    reason=f"cannot open zip archive ({e}); its images are reported missing; re-download it",
                )
            )
    frame = pl.DataFrame(
        {_MEMBER: names, "_archive": arch, "_pos": pos},
        schema={_MEMBER: pl.String, "_archive": pl.Int32, "_pos": pl.Int64},
    )
    return frame, bad


def _iter_zip(m: Manifest, split: SplitSpec, guard: _Guard) -> Iterator[Item | Failure]:
    assert split.table is not None and split.images is not None
    archives = _dataset_glob(m, split.images, "zip archives")
    index, bad = _zip_index(m, archives)
    yield from (Failure(f.id, f.source, f.reason, split.name) for f in bad)
    keep = _limit_keep(m, split, _ZIP_ROLES, guard)
    lf = _split_frame(m, split, _ZIP_ROLES)
    # One join puts every row next to its archive member; sorting by (archive, position) then reads each
    # archive once, front to back. Rows with no member sort last and become "not found" failures.
    joined = lf.join(index.lazy(), on=_MEMBER, how="left").sort(["_archive", "_pos", _ROW], nulls_last=True)
    name = PurePosixPath(split.table.path).name
    current: tuple[int, zipfile.ZipFile, list[zipfile.ZipInfo]] | None = None
    try:
        for values in _iter_table_rows(m, joined, split.table.path):
            row = _frame_row(m, values, f"{name}:row {values[_ROW]}", "member")
            if not _selected(row.ident, split, keep):
                continue
            got = _admit_row(guard, row, split.name)
            if got is None or isinstance(got, Failure):
                if got is not None:
                    yield got
                continue
            member, a = values[_MEMBER], values["_archive"]
            if a is None:
                where = f"no member {member!r}" if member else "an empty member name (columns.member)"
                yield Failure(
                    row.ident or "",
                    row.source,
                    f"image not found: {where} in any archive matching {split.images!r}",
                    split.name,
                )
                continue
            if current is None or current[0] != a:
                if current is not None:
                    current[1].close()
                zf = zipfile.ZipFile(archives[a])
                current = (a, zf, zf.infolist())
            info = current[2][values["_pos"]]
            src = f"{_rel(m, archives[a])}:{info.filename}"
            if info.file_size == 0:
                yield Failure(row.ident or "", src, "image is an empty file", split.name)
                continue
            try:
                data = current[1].read(info)
            except (zipfile.BadZipFile, zlib.error, OSError, EOFError, ValueError) as e:
                yield Failure(
                    row.ident or "",
                    src,
                    f"cannot read zip member ({e}); the archive may be corrupt",
                    split.name,
                )
                continue
            yield Item(
                id=row.ident, split=split.name, lat=got[0], lon=got[1], payload=data,  # type: ignore[arg-type]
                source=src, kind="image", labels=row.labels,
            )  # fmt: skip
    finally:
        if current is not None:
            current[1].close()


# --------------------------------------------------------------------------------------------- webdataset
def _wds_sample(
    m: Manifest,
    split: SplitSpec,
    guard: _Guard,
    sample: tuple[str, int, dict[str, tarfile.TarInfo], tarfile.TarFile],
    src: str,
) -> Item | Failure | None:
    """One webdataset sample → Item / Failure / None (skipped, or outside the split's fraction)."""
    key, n, members, tf = sample
    values: dict[str, Any] = {"__key__": key, _ROW: n}
    id_t = m.columns["id"]
    if set(id_t.columns) <= {"__key__", _ROW}:
        # The id comes from the key: a stored sample is skipped before any of its members is read.
        ident = id_t.render(values)
        if not _selected(ident, split, None):
            return None
        if ident is not None and ident in guard.skip:
            guard.seen.add(ident)
            return None
    problem = None
    if "json" in members:
        try:
            meta = json.loads(tf.extractfile(members["json"]).read())  # type: ignore[union-attr]
        except ValueError as e:
            meta, problem = {}, f"unreadable .json metadata ({e})"
        if isinstance(meta, dict):
            values = {**meta, **values}
        elif problem is None:
            problem = ".json metadata is not a JSON object"
    elif any(c not in values for t in (m.columns["lat"], m.columns["lon"]) for c in t.columns):
        problem = "sample has no .json metadata (lat/lon come from it)"
    row = _render_row(m, values, src)
    if not _selected(row.ident, split, None):
        return None
    ident = row.ident or (key if problem else None)
    ok = guard.admit(ident, src, split.name)
    if ok is False or isinstance(ok, Failure):
        return ok or None
    if problem is not None:
        return Failure(ident, src, problem, split.name)  # type: ignore[arg-type]
    latlon = guard.coords(row.lat, row.lon)
    if isinstance(latlon, str):
        return Failure(ident, src, latlon, split.name)  # type: ignore[arg-type]
    ext = next((e for e in IMAGE_EXTENSIONS if e in members), None)
    if ext is None:
        exts = "/".join("." + e for e in IMAGE_EXTENSIONS)
        return Failure(ident, src, f"sample has no image member ({exts})", split.name)  # type: ignore[arg-type]
    data = tf.extractfile(members[ext]).read()  # type: ignore[union-attr]
    if not data:
        return Failure(ident, f"{src}.{ext}", "image is an empty file", split.name)  # type: ignore[arg-type]
    return Item(
        id=ident, split=split.name, lat=latlon[0], lon=latlon[1], payload=data,  # type: ignore[arg-type]
        source=f"{src}.{ext}", kind="image", labels=row.labels,
    )  # fmt: skip


def _iter_wds(m: Manifest, split: SplitSpec, guard: _Guard) -> Iterator[Item | Failure]:
    assert split.images is not None
    for shard in _dataset_glob(m, split.images, "tar shards"):
        sname = _rel(m, shard)
        n = 0
        try:
            for sample in iter_tar_samples(shard, lower=True):
                key, members, tf = sample.key, sample.infos, sample.tar
                n += 1
                got = _wds_sample(m, split, guard, (key, n, members, tf), f"{sname}:{key}")
                if got is not None:
                    yield got
        except (tarfile.TarError, OSError, EOFError) as e:
            reason = (
                f"tar shard unreadable after {n} samples ({e}); the rest of it is skipped; re-download it"
            )
            yield Failure("", sname, reason, split.name)


def _count_wds(m: Manifest, split: SplitSpec) -> int | None:
    assert split.images is not None
    shards = _dataset_glob(m, split.images, "tar shards")
    total = 0
    sizes_cache: dict[Path, dict] = {}
    for shard in shards:
        sizes_file = shard.parent / "sizes.json"
        if sizes_file.is_file():
            if sizes_file not in sizes_cache:
                try:
                    sizes_cache[sizes_file] = json.loads(sizes_file.read_text())
                except (OSError, ValueError):
                    sizes_cache[sizes_file] = {}
            n = sizes_cache[sizes_file].get(shard.name)
            if isinstance(n, int):
                total += n
                continue
        try:
            total += sum(1 for _ in iter_tar_samples(shard))
        except (tarfile.TarError, OSError, EOFError):
            return None
    return total


# --------------------------------------------------------------------------------------------- parquet
def _parquet_columns(m: Manifest, split: SplitSpec) -> tuple[str, dict[str, str]]:
    img_t = m.columns["image"]
    if not img_t.is_column:
        raise ManifestError(
            f"{m.path.name}: columns.image must be a plain column name for format 'parquet', "
            f"got {img_t.text!r}"
        )
    need = _needed_columns(m, ("id", "lat", "lon"), split)
    need.setdefault(img_t.text, "columns.image")
    return img_t.text, need


def _image_bytes(v: Any) -> bytes | None:
    if isinstance(v, dict):  # Hugging Face datasets' Image feature: {"bytes": ..., "path": ...}
        v = v.get("bytes")
    return bytes(v) if isinstance(v, (bytes, bytearray, memoryview)) and len(v) else None


def _iter_parquet_file(
    m: Manifest, split: SplitSpec, guard: _Guard, path: Path, image_col: str, need: dict[str, str]
) -> Iterator[Item | Failure]:
    import pyarrow.parquet as pq

    pname = _rel(m, path)
    pf = pq.ParquetFile(path)
    have = pf.schema_arrow.names
    for col, why in need.items():
        if col not in have:
            raise _missing_column(m, pname, col, why, have)
    id_t = m.columns["id"]
    id_cols = [c for c in id_t.columns if c != _ROW]
    first = 1
    for rg in range(pf.num_row_groups):
        nrows = pf.metadata.row_group(rg).num_rows
        if guard.skip and id_cols and nrows:
            # Read only the id column first: a row group whose ids are all stored is skipped unread.
            ids = pf.read_row_group(rg, columns=id_cols).to_pylist()
            rendered = [id_t.render({**r, _ROW: first + i}) for i, r in enumerate(ids)]
            if all(i is not None and i in guard.skip for i in rendered):
                guard.seen.update(rendered)  # type: ignore[arg-type]
                first += nrows
                continue
        n = first
        for batch in pf.iter_batches(batch_size=256, row_groups=[rg], columns=list(need)):
            for values in batch.to_pylist():
                values[_ROW] = n
                row = _render_row(m, values, f"{pname}:row {n}")
                n += 1
                if not _selected(row.ident, split, None):
                    continue
                got = _admit_row(guard, row, split.name)
                if got is None or isinstance(got, Failure):
                    if got is not None:
                        yield got
                    continue
                data = _image_bytes(values[image_col])
                if data is None:
                    reason = f"no image bytes in column {image_col!r}"
                    yield Failure(row.ident or "", row.source, reason, split.name)
                    continue
                yield Item(
                    id=row.ident, split=split.name, lat=got[0], lon=got[1], payload=data,  # type: ignore[arg-type]
                    source=row.source, kind="image", labels=row.labels,
                )  # fmt: skip
        first += nrows


def _iter_parquet(m: Manifest, split: SplitSpec, guard: _Guard) -> Iterator[Item | Failure]:
    import pyarrow as pa

    assert split.images is not None
    image_col, need = _parquet_columns(m, split)
    for path in _dataset_glob(m, split.images, "Parquet files"):
        try:
            yield from _iter_parquet_file(m, split, guard, path, image_col, need)
        except (pa.ArrowException, OSError) as e:
            reason = f"Parquet file unreadable ({e}); the rest of it is skipped; re-download or rewrite it"
            yield Failure("", _rel(m, path), reason, split.name)


def _count_parquet(m: Manifest, split: SplitSpec) -> int:
    import pyarrow as pa
    import pyarrow.parquet as pq

    assert split.images is not None
    id_t = m.columns["id"]
    cols = [c for c in id_t.columns if c != _ROW]
    total = 0
    for p in _dataset_glob(m, split.images, "Parquet files"):
        try:
            if split.fraction is None:
                total += pq.ParquetFile(p).metadata.num_rows
                continue
            n = pq.ParquetFile(p).metadata.num_rows
            rows = pq.read_table(p, columns=cols).to_pylist() if cols else [{}] * n
        except (pa.ArrowException, OSError):
            total += 1  # iter_items reports the unreadable file as one failure
            continue
        lo, hi = split.fraction
        total += sum(lo <= unit_hash(id_t.render({**r, _ROW: i + 1}) or "") < hi for i, r in enumerate(rows))
    return total


# --------------------------------------------------------------------------------------------- registry
_READERS = {
    "folder": _iter_folder,
    "zip": _iter_zip,
    "wds": _iter_wds,
    "parquet": _iter_parquet,
    "text": _iter_text,
}
_COUNTERS = {
    "folder": lambda m, s: _count_table(m, s, _FOLDER_ROLES),
    "zip": lambda m, s: _count_table(m, s, _ZIP_ROLES),
    "text": lambda m, s: _count_table(m, s, _TEXT_ROLES),
    "wds": _count_wds,
    "parquet": _count_parquet,
}
