"""Dataset manifests: one TOML file per dataset, validated on load into a frozen :class:`Manifest`.

A manifest says *where* a dataset lives (``root``, overridable with ``--root`` because datasets live outside
the repository), *how* its items are stored (``format``: loose files, zip archives, webdataset tars, Parquet
with image bytes, or a text column), *which* columns carry id / coordinates / labels, and which rows form each
split. Keeping this declarative means a new dataset is a new TOML file, not new code, and every problem with
the file (a typo in a key, a path that escapes the root) is reported before any work starts.

Column references: every value under ``[columns]`` and ``[label_templates]`` is either a bare column name
(``"latitude"``) or a template with ``{column}`` fields (``"{hash[0:3]}/{hash[3:6]}/{hash}.jpg"``,
``"{name}_{admin2|NaN}_{admin1}_{cc}"``, ``"gn-{_row:06d}"``); see :class:`Template`. ``_row`` is the 1-based
data-row number of the table (header excluded).

Manifests are looked up by bare name (``"osv5m"``) in ``data_manifests/`` next to the package (a checkout) or
in ``<sys.prefix>/share/geoloc/data_manifests`` (an installed wheel).
"""

from __future__ import annotations

import hashlib
import importlib.util
import re
import sys
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from geoloc.errors import ManifestError
from geoloc.suggest import did_you_mean

try:  # Python >= 3.11
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - Python 3.10 fallback
    import tomli as tomllib  # type: ignore[no-redef]

__all__ = [
    "FORMATS",
    "KINDS",
    "MANIFEST_DIRS",
    "TABLE_FORMATS",
    "JoinSpec",
    "Manifest",
    "SplitSpec",
    "TableSpec",
    "Template",
    "list_manifests",
    "load_manifest",
]

FORMATS = ("folder", "zip", "wds", "parquet", "text")
KINDS = ("osv5m", "inat21", "yfcc4k", "yfcc100m", "folder", "text", "custom")
TABLE_FORMATS = ("csv", "tsv", "parquet", "coco")

# Where bare manifest names are looked up, in order: a source checkout, then an installed wheel's data files.
MANIFEST_DIRS: tuple[Path, ...] = (
    Path(__file__).resolve().parents[2] / "data_manifests",
    Path(sys.prefix) / "share" / "geoloc" / "data_manifests",
)

_TOP_KEYS = {
    "name", "kind", "format", "root", "licence", "description", "limit",
    "columns", "label_templates", "table", "splits",
}  # fmt: skip
_COLUMN_KEYS = {"id", "lat", "lon", "image_path", "member", "image", "text", "labels"}
_TABLE_KEYS = {"format", "header", "names", "delimiter", "quote"}
_SPLIT_KEYS = {
    "table",
    "images",
    "fraction",
    "require_coordinates",
    "equals",
    "at_least",
    "exclude_ids",
    "join",
}
_JOIN_KEYS = _TABLE_KEYS | {"table", "left_on", "right_on", "columns"}
_PKG_PREFIX = "pkg:"

# Role defaults (a manifest may leave these out) and the roles each format requires.
_COLUMN_DEFAULTS = {"id": "id", "lat": "lat", "lon": "lon", "member": "{id}.jpg", "image": "image"}
_REQUIRED_COLUMNS = {"folder": ("image_path",), "text": ("text",)}
_NEEDS_TABLE = ("folder", "zip", "text")


# --------------------------------------------------------------------------------------------- templates
_FIELD = re.compile(r"\{([^{}\[\]|:]+)(?:\[(-?\d*):(-?\d*)\])?(?::0(\d+)d)?(?:\|([^{}]*))?\}")


@dataclass(frozen=True)
class Template:
    """A string built from columns: ``{col}``, ``{col[a:b]}`` (slice), ``{col:06d}`` (zero-pad), ``{col|x}``.

    A field whose column is null or empty makes the whole result null, unless it has a default (``|x``):
    this is how the OSV-5M keys behave (``unique_sub-region`` is missing when admin2 is empty, while
    ``unique_city`` spells a missing admin2 as the literal ``NaN``; docs/eval-protocol.md §1.3). A bare column
    name (no braces) is the template ``{name}``.
    """

    text: str
    parts: tuple[str | tuple[str, int | None, int | None, int | None, str | None], ...]

    @classmethod
    def parse(cls, text: str, where: str) -> Template:
        if not isinstance(text, str) or not text:
            raise ManifestError(f"{where}: expected a non-empty string (a column name or a template)")
        if "{" not in text and "}" not in text:
            return cls(text, ((text, None, None, None, None),))
        parts: list[Any] = []
        pos = 0
        for m in _FIELD.finditer(text):
            if m.start() > pos:
                parts.append(text[pos : m.start()])
            col, a, b, pad, default = m.groups()
            parts.append(
                (col, int(a) if a else None, int(b) if b else None, int(pad) if pad else None, default)
            )
            pos = m.end()
        if pos < len(text):
            parts.append(text[pos:])
        if any(isinstance(p, str) and ("{" in p or "}" in p) for p in parts):
            raise ManifestError(
                f"{where}: cannot parse template {text!r}; use {{column}}, {{column[a:b]}}, "
                "{column:06d} or {column|default}"
            )
        return cls(text, tuple(parts))

    @property
    def columns(self) -> tuple[str, ...]:
        """The source columns this template reads (``_row`` included)."""
        return tuple(dict.fromkeys(p[0] for p in self.parts if not isinstance(p, str)))

    @property
    def is_column(self) -> bool:
        """True for a bare column reference (no literal text, no slicing): the value is passed through."""
        return (
            len(self.parts) == 1 and not isinstance(self.parts[0], str) and self.parts[0][1:] == (None,) * 4
        )

    def render(self, row: dict[str, Any]) -> str | None:
        """Render against one row (values: str / number / None); None when a required field is missing."""
        out: list[str] = []
        for p in self.parts:
            if isinstance(p, str):
                out.append(p)
                continue
            col, a, b, pad, default = p
            v = row.get(col)
            if isinstance(v, float) and v != v:  # NaN from JSON metadata counts as missing
                v = None
            s = "" if v is None else str(v)
            if s == "":
                if default is None:
                    return None
                out.append(default)
                continue
            if a is not None or b is not None:
                s = s[a:b]
            if pad is not None:
                s = s.zfill(pad)
            out.append(s)
        return "".join(out)


# --------------------------------------------------------------------------------------------- specs
@dataclass(frozen=True)
class TableSpec:
    """A metadata table: a CSV/TSV (streamed), a Parquet file, or a COCO-style JSON (iNat21).

    ``names`` gives the column names of a headerless file (their order *is* the column positions);
    ``quote=""`` turns quoting off (the YFCC dumps contain bare ``"`` characters).
    """

    path: str
    format: str
    header: bool = True
    names: tuple[str, ...] = ()
    delimiter: str = ","
    quote: str = '"'


@dataclass(frozen=True)
class JoinSpec:
    """A lookup table left-joined onto the main table (YFCC100M: ``photo_id → hash``)."""

    table: TableSpec
    left_on: str
    right_on: str
    columns: tuple[str, ...]


@dataclass(frozen=True)
class SplitSpec:
    """Which rows (and which archives / shards) form one split.

    Attributes:
        name: the split name written into the store ("train", "test", ...).
        table: the metadata table (folder / zip / text formats); None for wds / parquet (metadata inline).
        images: folder: base directory of ``image_path``; zip / wds / parquet: a glob of archive files.
        fraction: keep rows whose id hashes into ``[lo, hi)`` (deterministic, version-independent); lets
            several splits share one table disjointly.
        require_coordinates: drop rows with an empty lat or lon silently (a dataset *selection*, e.g. the
            non-geotagged YFCC100M photos) instead of reporting each one as a failure.
        equals / at_least: keep rows whose column equals a string / parses to a number >= a bound.
        exclude_ids: a file (one id per line) of ids to leave out (YFCC4k out of YFCC100M training).
        join: a lookup table to join before anything else.
    """

    name: str
    table: TableSpec | None = None
    images: str | None = None
    fraction: tuple[float, float] | None = None
    require_coordinates: bool = False
    equals: tuple[tuple[str, str], ...] = ()
    at_least: tuple[tuple[str, float], ...] = ()
    exclude_ids: str | None = None
    join: JoinSpec | None = None


@dataclass(frozen=True)
class Manifest:
    """A validated dataset manifest (see the module docstring and ``data_manifests/*.toml``).

    ``columns`` maps the roles id / lat / lon / image_path / member / image / text to templates;
    ``labels`` maps each label column (the store's label columns, in order) to its template.
    ``sha256`` fingerprints the manifest file, the resolved root and the limit, and is recorded in the store.
    """

    name: str
    kind: str
    format: str
    root: Path
    splits: dict[str, SplitSpec]
    columns: dict[str, Template]
    labels: dict[str, Template]
    licence: str
    description: str
    path: Path
    sha256: str
    limit: int | None = None

    @property
    def label_columns(self) -> tuple[str, ...]:
        return tuple(self.labels)

    @property
    def kind_of_item(self) -> str:
        """``"text"`` or ``"image"``: what the payload of this dataset's items is."""
        return "text" if self.format == "text" else "image"


# --------------------------------------------------------------------------------------------- loading
def list_manifests() -> list[str]:
    """Names of the manifests shipped with geoloc (``data_manifests/*.toml``)."""
    names: set[str] = set()
    for d in MANIFEST_DIRS:
        if d.is_dir():
            names.update(p.stem for p in d.glob("*.toml"))
    return sorted(names)


def _find(path_or_name: str | Path) -> Path:
    p = Path(path_or_name).expanduser()
    if p.suffix == ".toml" or p.exists() or len(p.parts) > 1:
        if not p.is_file():
            raise ManifestError(
                f"manifest file {p} not found; pass a .toml path or one of: {', '.join(list_manifests())}"
            )
        return p
    for d in MANIFEST_DIRS:
        cand = d / f"{p.name}.toml"
        if cand.is_file():
            return cand
    names = list_manifests()
    did = did_you_mean(str(path_or_name), names)
    raise ManifestError(
        f"unknown manifest '{path_or_name}'{did}; known: {', '.join(names) or 'none'}, or pass a .toml path"
    )


def _unknown_keys(d: dict, allowed: set[str], where: str) -> None:
    for k in d:
        if k not in allowed:
            did = did_you_mean(k, sorted(allowed), cutoff=0.6)
            raise ManifestError(f"{where}: unknown key '{k}'{did}; allowed: {', '.join(sorted(allowed))}")


def _get(
    d: dict, key: str, typ: type | tuple[type, ...], where: str, default: Any = ..., *, required: bool = False
) -> Any:
    if key not in d:
        if required:
            raise ManifestError(f"{where}: missing required key '{key}'")
        return default
    v = d[key]
    if typ is float and isinstance(v, int) and not isinstance(v, bool):
        v = float(v)
    if not isinstance(v, typ) or (typ is int and isinstance(v, bool)):
        tname = typ.__name__ if isinstance(typ, type) else "/".join(t.__name__ for t in typ)
        raise ManifestError(f"{where}: key '{key}' must be a {tname}, got {type(v).__name__} {v!r}")
    return v


def _rel_path(value: str, where: str, *, glob: bool = False) -> str:
    """Check a root-relative path (or glob): no absolute paths, no ``..``, no empty string."""
    if not value:
        raise ManifestError(f"{where}: empty path; use '.' for the dataset root")
    p = PurePosixPath(value.replace("\\", "/"))
    if p.is_absolute() or re.match(r"^[A-Za-z]:", value) or value.startswith("~"):
        raise ManifestError(
            f"{where}: path {value!r} is absolute; "
            "paths must be relative to the dataset root (set `root` instead)"
        )
    if ".." in p.parts:
        raise ManifestError(
            f"{where}: path {value!r} escapes the dataset root ('..'); keep data under `root`"
        )
    if not glob and any(c in value for c in "*?["):
        raise ManifestError(f"{where}: path {value!r} may not be a glob here")
    return str(p)


def _resolve_root(value: str, where: str) -> Path:
    if value.startswith(_PKG_PREFIX):
        pkg = value[len(_PKG_PREFIX) :]
        spec = importlib.util.find_spec(pkg) if pkg else None
        if spec is None or not spec.submodule_search_locations:
            raise ManifestError(
                f"{where}: root {value!r}: Python package '{pkg}' is not installed; pip install it"
            )
        return Path(next(iter(spec.submodule_search_locations))).resolve()
    return Path(value).expanduser().resolve()


def _table_spec(d: dict, path: str, where: str) -> TableSpec:
    fmt = _get(d, "format", str, where, None)
    if fmt is None:
        ext = PurePosixPath(path).suffix.lower()
        fmt = {".csv": "csv", ".tsv": "tsv", ".txt": "tsv", ".parquet": "parquet", ".json": "coco"}.get(ext)
        if fmt is None:
            raise ManifestError(
                f"{where}: cannot tell the format of table {path!r} from its extension; "
                f"set format = one of {', '.join(TABLE_FORMATS)}"
            )
    if fmt not in TABLE_FORMATS:
        did = did_you_mean(fmt, TABLE_FORMATS)
        raise ManifestError(
            f"{where}: unknown table format '{fmt}'{did}; use one of {', '.join(TABLE_FORMATS)}"
        )
    header = _get(d, "header", bool, where, True)
    names = tuple(_get(d, "names", list, where, []))
    if not all(isinstance(n, str) and n for n in names):
        raise ManifestError(f"{where}: 'names' must be a list of non-empty strings")
    if len(set(names)) != len(names):
        raise ManifestError(f"{where}: 'names' has duplicates")
    if not header and not names and fmt in ("csv", "tsv"):
        raise ManifestError(f"{where}: header = false needs 'names' (the column names in file order)")
    delimiter = _get(d, "delimiter", str, where, "\t" if fmt == "tsv" else ",")
    if len(delimiter) != 1:
        raise ManifestError(f"{where}: 'delimiter' must be one character")
    quote = _get(d, "quote", str, where, '"')
    if len(quote) > 1:
        raise ManifestError(f"{where}: 'quote' must be one character, or \"\" for no quoting")
    return TableSpec(path=path, format=fmt, header=header, names=names, delimiter=delimiter, quote=quote)


def _split_spec(name: str, d: Any, fmt: str, table_defaults: dict, where: str) -> SplitSpec:
    if not isinstance(d, dict):
        raise ManifestError(f"{where}: must be a table ([splits.{name}])")
    _unknown_keys(d, _SPLIT_KEYS, where)
    table = None
    if "table" in d:
        tpath = _rel_path(_get(d, "table", str, where), f"{where}.table")
        table = _table_spec(table_defaults, tpath, f"{where} (table options)")
    elif fmt in _NEEDS_TABLE:
        raise ManifestError(
            f"{where}: missing required key 'table' (format '{fmt}' reads its metadata from a table)"
        )
    images = d.get("images")
    if images is not None:
        images = _rel_path(
            _get(d, "images", str, where), f"{where}.images", glob=fmt in ("zip", "wds", "parquet")
        )
    elif fmt in ("zip", "wds", "parquet"):
        raise ManifestError(
            f"{where}: missing required key 'images' (a glob of the {fmt} files, "
            f"e.g. 'images/{name}/*.{'tar' if fmt == 'wds' else fmt}')"
        )
    fraction = None
    if "fraction" in d:
        fr = _get(d, "fraction", list, where)
        if (
            len(fr) != 2
            or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in fr)
            or not 0 <= fr[0] < fr[1] <= 1
        ):
            raise ManifestError(f"{where}: 'fraction' must be [lo, hi] with 0 <= lo < hi <= 1, got {fr!r}")
        fraction = (float(fr[0]), float(fr[1]))
    equals = _get(d, "equals", dict, where, {})
    if not all(isinstance(v, str) for v in equals.values()):
        raise ManifestError(
            f'{where}.equals: values must be strings (columns are compared as text), e.g. marker = "0"'
        )
    at_least = _get(d, "at_least", dict, where, {})
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in at_least.values()):
        raise ManifestError(f"{where}.at_least: values must be numbers, e.g. accuracy = 12")
    exclude = d.get("exclude_ids")
    if exclude is not None:
        exclude = _rel_path(_get(d, "exclude_ids", str, where), f"{where}.exclude_ids")
    join = None
    if "join" in d:
        jd = _get(d, "join", dict, where)
        jw = f"{where}.join"
        _unknown_keys(jd, _JOIN_KEYS, jw)
        jpath = _rel_path(_get(jd, "table", str, jw, required=True), f"{jw}.table")
        jcols = _get(jd, "columns", list, jw, required=True)
        join = JoinSpec(
            table=_table_spec(jd, jpath, jw),
            left_on=_get(jd, "left_on", str, jw, required=True),
            right_on=_get(jd, "right_on", str, jw, required=True),
            columns=tuple(jcols),
        )
    if (equals or at_least or join or d.get("require_coordinates")) and table is None:
        raise ManifestError(
            f"{where}: filters and joins apply to a metadata table; this split has no 'table'"
        )
    return SplitSpec(
        name=name,
        table=table,
        images=images,
        fraction=fraction,
        require_coordinates=_get(d, "require_coordinates", bool, where, False),
        equals=tuple(equals.items()),
        at_least=tuple((k, float(v)) for k, v in at_least.items()),
        exclude_ids=exclude,
        join=join,
    )


def _check_overlaps(splits: dict[str, SplitSpec], where: str) -> None:
    """Two splits reading the same table must select disjoint hash ranges, or every row would be in both."""
    by_table: dict[tuple, list[SplitSpec]] = {}
    for s in splits.values():
        if s.table is not None:
            by_table.setdefault((s.table.path, s.images), []).append(s)
    for group in by_table.values():
        for i, a in enumerate(group):
            for b in group[i + 1 :]:
                fa, fb = a.fraction or (0.0, 1.0), b.fraction or (0.0, 1.0)
                same_filters = (a.equals, a.at_least, a.exclude_ids) == (b.equals, b.at_least, b.exclude_ids)
                if same_filters and fa[0] < fb[1] and fb[0] < fa[1]:
                    raise ManifestError(
                        f"{where}: splits '{a.name}' and '{b.name}' read the same table {a.table.path!r} "
                        f"with overlapping fractions {list(fa)} and {list(fb)}; make them disjoint"
                    )


def load_manifest(
    path_or_name: str | Path, root: str | Path | None = None, *, limit: int | None = None
) -> Manifest:
    """Load and validate a manifest.

    Args:
        path_or_name: a ``.toml`` path, or the bare name of a shipped manifest (``"osv5m"``,
            ``"demo-geonames"``).
        root: overrides the manifest's ``root`` (``--root``); relative roots resolve against the working
            directory; ``pkg:<package>`` names an installed package's directory.
        limit: overrides the manifest's ``limit`` (a deterministic subsample of that many rows, taken before
            the split); 0 or None in the file means "all rows".

    Raises:
        ManifestError: unknown / missing keys, wrong types, paths escaping the root. Columns and files are
            checked when the dataset is read (the root may be on a machine other than this one).
    """
    path = _find(path_or_name)
    where = str(path)
    data = path.read_bytes()
    try:
        raw = tomllib.loads(data.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ManifestError(f"{where}: not valid TOML: {e}") from e
    _unknown_keys(raw, _TOP_KEYS, where)
    name = _get(raw, "name", str, where, required=True)
    kind = _get(raw, "kind", str, where, required=True)
    if kind not in KINDS:
        did = did_you_mean(kind, KINDS)
        raise ManifestError(f"{where}: unknown kind '{kind}'{did}; use one of {', '.join(KINDS)}")
    fmt = _get(raw, "format", str, where, required=True)
    if fmt not in FORMATS:
        did = did_you_mean(fmt, FORMATS)
        raise ManifestError(f"{where}: unknown format '{fmt}'{did}; use one of {', '.join(FORMATS)}")
    root_value = str(root) if root is not None else _get(raw, "root", str, where, required=True)
    root_path = _resolve_root(root_value, f"{where}: root")

    cols_raw = _get(raw, "columns", dict, where, {})
    _unknown_keys(cols_raw, _COLUMN_KEYS, f"{where} [columns]")
    for req in _REQUIRED_COLUMNS.get(fmt, ()):
        if req not in cols_raw:
            raise ManifestError(f"{where} [columns]: missing required key '{req}' for format '{fmt}'")
    columns: dict[str, Template] = {}
    for role in ("id", "lat", "lon", "image_path", "member", "image", "text"):
        value = cols_raw.get(role, _COLUMN_DEFAULTS.get(role))
        if value is not None:
            columns[role] = Template.parse(value, f"{where} [columns].{role}")

    labels: dict[str, Template] = {}
    label_list = _get(cols_raw, "labels", list, f"{where} [columns]", [])
    for c in label_list:
        if not isinstance(c, str) or not c:
            raise ManifestError(f"{where} [columns].labels: entries must be column names, got {c!r}")
        labels[c] = Template(c, ((c, None, None, None, None),))
    for lname, tmpl in _get(raw, "label_templates", dict, where, {}).items():
        if lname in labels:
            raise ManifestError(
                f"{where} [label_templates].{lname}: also listed in [columns].labels; keep one"
            )
        labels[lname] = Template.parse(tmpl, f"{where} [label_templates].{lname}")
    reserved = {"id", "split", "lat", "lon", "emb"} & set(labels)
    if reserved:
        raise ManifestError(
            f"{where}: label name(s) {sorted(reserved)} clash with the store's own columns; rename them"
        )

    table_defaults = _get(raw, "table", dict, where, {})
    _unknown_keys(table_defaults, _TABLE_KEYS, f"{where} [table]")
    splits_raw = _get(raw, "splits", dict, where, required=True)
    if not splits_raw:
        raise ManifestError(f"{where}: [splits] is empty; add at least one [splits.<name>] table")
    splits = {
        s: _split_spec(s, d, fmt, table_defaults, f"{where} [splits.{s}]") for s, d in splits_raw.items()
    }
    _check_overlaps(splits, where)

    lim = limit if limit is not None else _get(raw, "limit", int, where, None)
    if lim is not None and lim < 0:
        raise ManifestError(f"{where}: limit must be >= 0 (0 = all rows), got {lim}")
    lim = lim or None
    if lim is not None and fmt not in _NEEDS_TABLE:
        raise ManifestError(
            f"{where}: limit needs a metadata table "
            f"(formats {', '.join(_NEEDS_TABLE)}); format '{fmt}' has none"
        )

    h = hashlib.sha256(data)
    h.update(b"\0root=" + str(root_path).encode())
    h.update(b"\0limit=" + str(lim).encode())
    return Manifest(
        name=name,
        kind=kind,
        format=fmt,
        root=root_path,
        splits=splits,
        columns=columns,
        labels=labels,
        licence=_get(raw, "licence", str, where, ""),
        description=_get(raw, "description", str, where, ""),
        path=path.resolve(),
        sha256=h.hexdigest(),
        limit=lim,
    )
