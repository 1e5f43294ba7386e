"""Published metrics: closed forms, known distances, PRDC against a dense reference, and the compat quirks."""

from __future__ import annotations

import math

import numpy as np
import pytest

from geoloc.errors import InputError
from geoloc.gazetteer import LEVELS, Gazetteer
from geoloc.metrics import (
    MISS_KM,
    admin_metrics,
    distance_metrics,
    distances_km,
    geoscore,
    gt_label_ids,
    localizability_bits,
    localizability_stats,
    nll_bits_per_dim,
    prdc,
    score,
)

R = 6371.0


@pytest.fixture(scope="module")
def gaz() -> Gazetteer:
    return Gazetteer.load(table=False)  # the exact rule; the table's agreement is tested in test_gazetteer.py


def _uniform(rng, n):
    z = rng.uniform(-1, 1, n)
    return np.c_[np.degrees(np.arcsin(z)), rng.uniform(-180, 180, n)]


def test_haversine_known_pairs():
    a = np.array([[0.0, 0.0], [0.0, 0.0], [90.0, 0.0], [36.12, -86.67], [51.5, 10.0]])
    b = np.array([[0.0, 90.0], [0.0, 180.0], [-90.0, 0.0], [33.94, -118.40], [51.5, 10.0]])
    d = distances_km(a, b)
    assert d[0] == pytest.approx(math.pi * R / 2, rel=1e-12)
    assert d[1] == pytest.approx(math.pi * R, rel=1e-12)
    assert d[2] == pytest.approx(math.pi * R, rel=1e-12)
    # Nashville → Los Angeles: 2887.2600 km with R = 6372.8 (the classic worked example), rescaled to 6371.
    assert d[3] == pytest.approx(2887.2599506071106 * R / 6372.8, rel=1e-9)
    assert d[4] == 0.0


def test_uniform_baseline_matches_closed_forms():
    rng = np.random.default_rng(2024)
    n = 200_000
    s = score(_uniform(rng, n), _uniform(rng, n)).as_dict()
    # θ ~ sin θ / 2 on [0, π]: E[d] = πR/2, sd(d) = R·sqrt(π²/4 − 2).
    se_d = R * math.sqrt(math.pi**2 / 4 - 2) / math.sqrt(n)
    assert s["dist_km"] == pytest.approx(math.pi * R / 2, abs=4 * se_d)
    assert math.pi * R / 2 == pytest.approx(10007.5, abs=0.1)
    # E[5000 e^{−aθ}] = 2500 (1 + e^{−aπ}) / (1 + a²), a = R / 1492.7 → 130.1.
    a = R / 1492.7
    expected_gs = 2500 * (1 + math.exp(-a * math.pi)) / (1 + a * a)
    assert expected_gs == pytest.approx(130.1, abs=0.05)
    sd_gs = math.sqrt(
        2500**2 * 2 * (1 + math.exp(-2 * a * math.pi)) / (1 + 4 * a * a) - expected_gs**2
    )  # ≈ 390
    assert s["geoscore"] == pytest.approx(expected_gs, abs=4 * sd_gs / math.sqrt(n))
    p2500 = (1 - math.cos(2500 / R)) / 2
    assert p2500 == pytest.approx(0.0380, abs=5e-5)
    assert s["acc_2500km"] == pytest.approx(p2500, abs=4 * math.sqrt(p2500 * (1 - p2500) / n))
    assert s["acc_1km"] < 1e-4 and s["n"] == n and s["n_failed"] == 0


def test_thresholds_are_strict_and_geoscore_formula():
    m = distance_metrics(np.array([25.0, 24.999999, 2500.0, 0.0]))
    assert m.accuracy_km[25.0] == 0.5
    assert m.accuracy_km[2500.0] == 0.75
    assert m.accuracy_km[1.0] == 0.25
    assert geoscore(np.array([0.0, 1492.7, np.nan])).tolist() == pytest.approx([5000.0, 5000 / math.e, 0.0])


def test_failed_predictions_fixed_vs_plonk():
    gt = np.array([[0.0, 0.0], [10.0, 10.0], [20.0, 20.0], [30.0, 30.0]])
    pred = gt.copy()
    pred[1] = [np.nan, 5.0]
    pred[3] = [30.0, 31.0]
    d = distances_km(pred, gt)
    assert np.isnan(d[1]) and d[0] == 0.0
    fixed = distance_metrics(d)
    assert (fixed.n, fixed.n_failed) == (4, 1)
    assert fixed.mean_km == pytest.approx((MISS_KM + d[3]) / 4)
    assert pytest.approx(20015.09, abs=0.01) == MISS_KM
    assert fixed.geoscore == pytest.approx((5000 + 0 + 5000 + geoscore(d[3:])[0]) / 4)
    assert fixed.accuracy_km[200.0] == 0.75
    plonk = distance_metrics(d, compat="plonk")  # quirk D: the failed item leaves numerator and denominator
    assert (plonk.n, plonk.n_failed) == (3, 1)
    assert plonk.mean_km == pytest.approx(d[3] / 3)
    assert plonk.accuracy_km[200.0] == 1.0
    with pytest.raises(InputError, match="ground truth"):
        distances_km(pred, np.where(np.isnan(pred), 0.0, np.nan))
    with pytest.raises(InputError, match="compat"):
        distance_metrics(d, compat="osv")


# Five OSV-5M-like items: ground-truth keys exactly as pandas reads OSV-5M's test.csv (NaN = missing).
NAN = float("nan")
WINDHOEK, WAITANGI, PARIS, TOKYO = (
    (-22.56, 17.08),
    (-43.8048, -176.6141),
    (48.8566, 2.3522),
    (35.6895, 139.6917),
)
GT_POINTS = np.array([WINDHOEK, WAITANGI, PARIS, PARIS, PARIS])
PREDS = np.array([WINDHOEK, (-43.9, -176.5), PARIS, (NAN, NAN), TOKYO])
GT_KEYS = {
    "country": [NAN, "NZ", "FR", "FR", "FR"],  # quirk C: Namibia's "NA" read as NaN
    "region": ["Khomas_NA", "Chatham Islands_NZ", "Ile-de-France_FR", "Ile-de-France_FR", "Ile-de-France_FR"],
    "sub-region": [NAN, NAN, "Paris_Ile-de-France_FR", "Paris_Ile-de-France_FR", "Paris_Ile-de-France_FR"],
    "city": [
        "Windhoek_NaN_Khomas_NA",
        "Waitangi_NaN_Chatham Islands_NZ",
        "Paris_Paris_Ile-de-France_FR",
        "Paris_Paris_Ile-de-France_FR",
        "Paris_Paris_Ile-de-France_FR",
    ],
}


def test_admin_accuracy_fixed_counts_everything_and_repairs_keys(gaz):
    m = admin_metrics(PREDS, gaz, LEVELS, gt_keys=GT_KEYS)
    # Items 0–2 hit at every level (Namibia recovered from "…_NA", "NaN" admin2 read as empty); the failed
    # prediction and Tokyo miss; all five count.
    assert m.accuracy == {lv: 0.6 for lv in LEVELS}
    assert m.n == dict.fromkeys(LEVELS, 5)
    assert m.hits["city"].tolist() == [True, True, True, False, False]
    assert m.n_unmatchable == dict.fromkeys(LEVELS, 0)
    # A raw "NA" (CSV read without NA conversion) is Namibia too.
    raw = dict(GT_KEYS, country=["NA", "NZ", "FR", "FR", "FR"])
    assert admin_metrics(PREDS, gaz, ("country",), gt_keys=raw).accuracy["country"] == 0.6


def test_admin_accuracy_plonk_reproduces_quirks(gaz):
    m = admin_metrics(PREDS, gaz, LEVELS, gt_keys=GT_KEYS, compat="plonk")
    assert m.n == dict.fromkeys(
        LEVELS, 4
    )  # quirk D drops the failed item; quirk B's "nan" mask drops nothing
    assert m.accuracy["country"] == 0.5  # Windhoek never country-correct (C); Tokyo wrong
    assert m.accuracy["region"] == 0.75  # "Khomas_NA" survives pandas
    assert m.accuracy["sub-region"] == 0.25  # missing admin2 can never match (A)
    assert m.accuracy["city"] == 0.25  # "…_NaN_…" vs the prediction's "…__…" (A)
    assert m.n_unmatchable == {"country": 1, "region": 0, "sub-region": 2, "city": 2}
    # Even a raw "NA" string is read by pandas as NaN.
    raw = dict(GT_KEYS, country=["NA", "NZ", "FR", "FR", "FR"])
    assert admin_metrics(PREDS, gaz, ("country",), gt_keys=raw, compat="plonk").accuracy["country"] == 0.5


@pytest.mark.parametrize("compat", ["fixed", "plonk"])
def test_ground_truth_from_points_matches_published_keys(gaz, compat):
    from_keys = admin_metrics(PREDS, gaz, LEVELS, gt_keys=GT_KEYS, compat=compat)
    from_points = admin_metrics(PREDS, gaz, LEVELS, gt_latlon=GT_POINTS, compat=compat)
    assert from_points.accuracy == from_keys.accuracy
    ids_k, _ = gt_label_ids(gaz, LEVELS, gt_keys=GT_KEYS, compat=compat)
    ids_p, _ = gt_label_ids(gaz, LEVELS, gt_latlon=GT_POINTS, compat=compat)
    for lv in LEVELS:
        assert ids_k[lv].tolist() == ids_p[lv].tolist()


def test_admin_input_errors(gaz):
    with pytest.raises(InputError, match="exactly one"):
        gt_label_ids(gaz, ("country",))
    with pytest.raises(InputError, match="lack level"):
        gt_label_ids(gaz, ("city",), gt_keys={"country": ["FR"]})
    with pytest.raises(InputError, match="unknown label level"):
        gt_label_ids(gaz, ("continent",), gt_keys={"country": ["FR"]})
    with pytest.raises(InputError, match="gazetteer"):
        score(PREDS, GT_POINTS, levels=("country",))


def test_score_bundles_everything(gaz):
    s = score(PREDS, GT_POINTS, gazetteer=gaz, levels=LEVELS, gt_keys=GT_KEYS)
    d = s.as_dict()
    assert d["n"] == 5 and d["n_failed"] == 1 and d["acc_city"] == 0.6
    assert set(d) >= {
        "geoscore",
        "dist_km",
        "median_km",
        "acc_1km",
        "acc_25km",
        "acc_200km",
        "acc_750km",
        "acc_2500km",
    }
    assert s.per_item["failed"].tolist() == [False, False, False, True, False]
    assert s.per_item["hit_country"].tolist() == [True, True, True, False, False]


def test_nll_and_localizability():
    lp = np.full(10, -math.log(4 * math.pi))
    nll = nll_bits_per_dim(np.append(lp, np.nan))
    assert nll.bits_per_dim == pytest.approx(math.log2(4 * math.pi) / 3)
    assert nll.bits_per_dim == pytest.approx(1.2172, abs=1e-4)
    assert (nll.n, nll.n_failed) == (10, 1)
    samples = np.full((4, 16), -math.log(4 * math.pi))
    assert localizability_bits(samples) == pytest.approx(np.full(4, -math.log2(4 * math.pi)))
    assert localizability_bits(samples, compat="plonk") == pytest.approx(
        np.full(4, -math.log(4 * math.pi) / (4 * math.pi * math.log(2)))
    )
    loc = np.linspace(-2, 5, 200)
    stats = localizability_stats(loc, dist_km=np.exp(-loc) * 1000, bins=4)
    assert stats["spearman_vs_dist"] == pytest.approx(-1.0)
    assert [b["n"] for b in stats["by_bin"]] == [50, 50, 50, 50]
    assert stats["by_bin"][0]["mean_km"] > stats["by_bin"][-1]["mean_km"]
    assert stats["quantiles"][0.5] == pytest.approx(1.5)


def _prdc_dense(real, fake, k):
    """The reference formulas on a dense float64 haversine matrix (radians), for small sets."""

    def angles(a, b):
        a, b = np.radians(a), np.radians(b)
        dlat = a[:, None, 0] - b[None, :, 0]
        dlon = a[:, None, 1] - b[None, :, 1]
        h = np.sin(dlat / 2) ** 2 + np.cos(a[:, None, 0]) * np.cos(b[None, :, 0]) * np.sin(dlon / 2) ** 2
        return 2 * np.arcsin(np.sqrt(np.clip(h, 0, 1)))

    rr = np.sort(angles(real, real), axis=1)[:, k]
    rf = np.sort(angles(fake, fake), axis=1)[:, k]
    d = angles(real, fake)
    return (
        (d < rr[:, None]).any(0).mean(),
        (d < rf[None, :]).any(1).mean(),
        (d < rr[:, None]).sum(0).mean() / k,
        (d.min(1) < rr).mean(),
    )


def _clustered(rng, n):
    centres = _uniform(rng, 6)
    pts = centres[rng.integers(0, 6, n)] + rng.normal(0, 2.0, (n, 2))
    pts[:, 0] = np.clip(pts[:, 0], -89, 89)
    pts[: n // 10] = pts[n // 10 : 2 * (n // 10)]  # exact duplicates, as repeated photo locations
    return pts


def test_prdc_matches_dense_reference():
    rng = np.random.default_rng(1)
    real, fake = _clustered(rng, 300), _clustered(rng, 300)
    got = prdc(real, fake, k=3, chunks=None)
    assert list(got.as_dict().values()) == pytest.approx(_prdc_dense(real, fake, 3), abs=1e-12)
    # 7 chunks as torch.chunk cuts 300 rows: ceil(300/7) = 43 per chunk, the last one 42; plain mean.
    parts = [_prdc_dense(real[a : a + 43], fake[a : a + 43], 3) for a in range(0, 300, 43)]
    assert list(prdc(real, fake, k=3, chunks=7).as_dict().values()) == pytest.approx(
        np.mean(parts, axis=0), abs=1e-12
    )


def test_prdc_extremes_and_errors():
    rng = np.random.default_rng(2)
    pts = _uniform(rng, 2000)
    same = prdc(pts, pts, k=3)
    assert same.as_dict() == {"precision": 1.0, "recall": 1.0, "density": 1.0, "coverage": 1.0}
    real = np.c_[rng.uniform(-1, 1, 400), rng.uniform(-1, 1, 400)]
    fake = real + np.array([0.0, 90.0])
    apart = prdc(real, fake, k=3)
    assert apart.as_dict() == {"precision": 0.0, "recall": 0.0, "density": 0.0, "coverage": 0.0}
    with pytest.raises(InputError, match="more than 3 points"):
        prdc(pts[:41], pts[:41], k=3, chunks=20)  # ceil(41/20) = 3 rows per chunk
    with pytest.raises(InputError, match="non-finite"):
        prdc(pts[:10], np.full((10, 2), np.nan))
