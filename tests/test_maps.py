"""Rendering of density maps: the PNG (equal-area world, no holes, outlines, zoom) and the interactive HTML
page, which is loaded in a real headless Chromium (skipped, with the reason, where Chromium is absent)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from geoloc.density import density_map, highest_density_regions
from geoloc.maps import format_bits, map_title, mollweide, render_html, render_png, world_lines
from tests.test_density import vmf_geolocator

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def two_modes():
    geo = vmf_geolocator([(48.85, 2.35), (40.7, -74.0)], [5000.0, 300.0], weights=[0.6, 0.4])
    return density_map(geo, torch.zeros(4), generator=torch.Generator().manual_seed(0))


def _png_pixels(path: Path) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(path).convert("RGB"))


def test_mollweide_is_equal_area_and_bounded():
    # Equal area: two 1°×1° boxes at the equator and at 60° N differ in area by cos(60°), as on the sphere.
    def area(lat):
        box = np.array([[0, lat], [1, lat], [1, lat + 1], [0, lat + 1]], dtype=float)
        xy = mollweide(box)
        x, y = xy[:, 0], xy[:, 1]
        return 0.5 * abs(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1)))

    sphere = (math.sin(math.radians(61)) - math.sin(math.radians(60))) / math.sin(math.radians(1))
    assert area(60.0) / area(0.0) == pytest.approx(sphere, rel=1e-3)
    corners = mollweide(np.array([[180.0, 0.0], [0.0, 90.0], [-180.0, 0.0]]))
    assert corners[0] == pytest.approx([2 * math.sqrt(2), 0.0], abs=1e-9)
    assert corners[1] == pytest.approx([0.0, math.sqrt(2)], abs=1e-9)


def test_world_lines_come_from_the_shipped_basemap():
    coast, borders = world_lines("coast", "c"), world_lines("borders", "c")
    assert len(coast) > 500 and len(borders) > 200
    for seg in coast[:200]:  # cut at the antimeridian: no segment jumps across the map
        assert np.abs(np.diff(seg[:, 0])).max() <= 180.0
        assert seg[:, 0].min() >= -180.0 and seg[:, 0].max() <= 180.0


def test_title_uses_the_tables_number():
    assert format_bits(1.2345) == "1.23" and format_bits(None) == "" and format_bits(float("nan")) == ""
    assert map_title("gn-4", "Paris", 1.234) == "gn-4: Paris · localizability 1.23 bits"
    assert map_title("img/a.jpg", "img/a.jpg") == "img/a.jpg"


def test_png_map_has_no_holes_and_marks(tmp_path, two_modes):
    traj = np.stack(
        [np.linspace([-60.0, -170.0], [48.85, 2.35], 20), np.linspace([0.0, 170.0], [40.7, -74.0], 20)]
    )
    modes = [
        {"lat": 48.85, "lon": 2.35, "mass": 0.6, "label": "Paris, Île-de-France, FR"},
        {"lat": 40.7, "lon": -74.0, "mass": 0.4},
    ]
    png = render_png(
        two_modes,
        tmp_path / "m.png",
        title=map_title("x", "two modes", 2.5),
        truth=(48.9, 2.4),
        estimate=(48.8, 2.3),
        trajectories=traj,
        modes=modes,
        dpi=60,
    )
    px = _png_pixels(png)
    h, w, _ = px.shape
    assert w > 700 and h > 350
    # Inside the globe no pixel is the white background: every cell is painted, below-floor ones at the floor.
    cx, cy = int(0.01 * w + 0.33 * w), int(h - (0.13 + 0.37) * h)
    patch = px[cy - 40 : cy + 40, cx - 80 : cx + 80].reshape(-1, 3)
    assert (patch.min(axis=1) < 250).mean() > 0.999
    assert not list(tmp_path.glob(".*tmp"))


def test_regions_nest_and_hold_their_mass(two_modes):
    r50, r90 = highest_density_regions(two_modes, (0.5, 0.9))
    assert 0.5 <= r50.mass < 0.55 and 0.9 <= r90.mass < 0.93
    assert set(r50.cells.tolist()) <= set(r90.cells.tolist())
    assert 0 < r50.area_km2 < r90.area_km2 < 4 * math.pi * 6371.0**2
    assert r50.outline and all(len(ring) >= 3 for poly in r50.outline for ring in poly)


def test_html_is_self_contained(tmp_path, two_modes):
    path = render_html(
        two_modes,
        tmp_path / "m.html",
        title="two <modes>",
        truth=(48.9, 2.4),
        estimate=(48.8, 2.3),
        localizability_bits=2.5,
    )
    text = path.read_text()
    assert "<script src" not in text and "<link" not in text.split("<body>")[0].replace("<link/", "")
    assert "two &lt;modes&gt;" in text and "L.geoJSON" in text
    data = json.loads(text.split("var GEOLOC_DATA = ", 1)[1].split(";\n", 1)[0].replace("<\\/", "</"))
    assert len(data["cells"]["features"]) == len(two_modes)
    assert data["info"]["localizability"] == "2.50" and data["marks"]["truth"] == [48.9, 2.4]


@pytest.mark.skipif(
    CHROMIUM is None, reason="Chromium not installed (apt-get install chromium; .ci/run does)"
)
def test_html_map_loads_in_a_headless_browser(tmp_path, two_modes):
    playwright = pytest.importorskip("playwright.sync_api", reason="playwright not installed (dev extra)")
    path = render_html(
        two_modes, tmp_path / "m.html", title="two modes", truth=(48.9, 2.4), estimate=(48.8, 2.3)
    )
    errors: list[str] = []
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM,
            args=[
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--no-first-run",
            ],
        )
        page = browser.new_page()
        # Offline by construction: every request that is not the file itself fails, as it would without
        # network.
        page.route(
            "**/*",
            lambda route: route.continue_() if route.request.url.startswith("file:") else route.abort(),
        )
        page.on("pageerror", lambda exc: errors.append(f"pageerror: {exc}"))

        def on_console(msg):
            # The tile probe's failed request is the page noticing it is offline, which it handles.
            if msg.type == "error" and "tile.openstreetmap.org" not in (msg.location or {}).get("url", ""):
                errors.append(f"console: {msg.text}")

        page.on("console", on_console)
        page.goto(path.as_uri())
        page.wait_for_function("window.geolocMap !== undefined", timeout=20000)
        n_cells = page.evaluate("window.geolocMap.cells.getLayers().length")
        n_regions = page.evaluate("window.geolocMap.regions.getLayers().length")
        n_marks = page.evaluate("window.geolocMap.marks.getLayers().length")
        has_tiles = page.evaluate(
            "Object.values(window.geolocMap.map._layers).some(l => l instanceof L.TileLayer)"
        )
        legend = page.inner_text(".leaflet-bottom.leaflet-right")
        browser.close()
    assert errors == []
    assert n_cells == len(two_modes) and n_regions == 2
    assert n_marks == len(two_modes.peaks(3)) + 2  # modes, estimate, truth
    assert not has_tiles  # offline: the bundled world outline only
    assert "per km²" in legend
