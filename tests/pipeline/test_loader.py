"""Feature loader: exact epoch coverage, weights, seeding, resume, where/split filters, DDP equality, errors.

The stores here encode each row's number in its embedding (``emb[0] = i // 1024``, ``emb[1] = i % 1024``,
``emb[2]`` = store number: integers that float16 holds exactly), so a batch tells exactly which rows it holds.
"""

from __future__ import annotations

import gc
import itertools
import json
import threading
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from geoloc.errors import ConfigError, StoreError
from geoloc.pipeline.eval_batches import iter_eval_batches, read_tensors
from geoloc.pipeline.loader import FeatureLoader
from geoloc.pipeline.selection import StoreSpec
from geoloc.pipeline.store import BackboneInfo, FeatureStore, build_table
from geoloc.sphere import latlon_to_xyz
from tests.helpers import make_store

DIM = 8
COUNTRIES = np.array(["FR", "DE", "IT", "ES"], dtype=object)


def write_store(
    root: Path,
    n: int,
    shards: int = 4,
    *,
    store_no: int = 0,
    backbone: str = "test",
    dim: int = DIM,
    seed: int = 0,
    bad_row: int | None = None,
) -> FeatureStore:
    """n rows over ``shards`` uneven shards; splits train/test 3:1 (every 4th row is test)."""
    rng = np.random.default_rng(seed)
    i = np.arange(n)
    lat = rng.uniform(-80, 80, n)
    lon = rng.uniform(-179, 179, n)
    if bad_row is not None:
        lat[bad_row] = np.nan
    emb = rng.normal(size=(n, dim)).astype(np.float32)
    emb[:, 0], emb[:, 1], emb[:, 2] = i // 1024, i % 1024, store_no
    split = np.where(i % 4 == 3, "test", "train").astype(object)
    country = COUNTRIES[i % len(COUNTRIES)]
    st = FeatureStore.create(root, BackboneInfo(backbone, "r1", dim), label_columns=["unique_country"])
    # Uneven shard sizes, so partitions and buffers see ragged input.
    cuts = np.sort(rng.choice(np.arange(1, n), shards - 1, replace=False)) if shards > 1 else []
    bounds = [0, *cuts, n]
    for k, (a, b) in enumerate(itertools.pairwise(bounds)):
        ids = [f"s{store_no}-{j}" for j in range(a, b)]
        table = build_table(
            ids,
            split[a:b],
            lat[a:b],
            lon[a:b],
            emb[a:b],
            {"unique_country": country[a:b]},
            ["unique_country"],
            check=bad_row is None,
        )
        st.write_shard(table, f"t{k}")
    return st


def keys(cond: torch.Tensor) -> list[tuple[int, int]]:
    """(store number, row number) of each row of a batch."""
    c = cond.numpy()
    return list(
        zip(c[:, 2].astype(int).tolist(), (c[:, 0] * 1024 + c[:, 1]).astype(int).tolist(), strict=True)
    )


def take(loader, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    it = iter(loader)
    out = [next(it) for _ in range(n)]
    it.close()
    return out


def train_rows(n: int, store_no: int = 0) -> list[tuple[int, int]]:
    return [(store_no, i) for i in range(n) if i % 4 != 3]


@pytest.fixture(scope="module")
def stores(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("stores")
    write_store(root / "a", 1200, shards=5, store_no=0, seed=1)
    write_store(root / "b", 500, shards=3, store_no=1, seed=2)
    write_store(root / "c", 800, shards=4, store_no=2, seed=3)
    return {k: root / k for k in "abc"}


def test_store_spec_parse():
    assert StoreSpec.parse("data/osv") == StoreSpec(Path("data/osv"), 1.0)
    assert StoreSpec.parse("data/osv:2") == StoreSpec(Path("data/osv"), 2.0)
    assert StoreSpec.parse("/mnt/x:y/inat:0.5") == StoreSpec(Path("/mnt/x:y/inat"), 0.5)
    assert StoreSpec.parse("/mnt/x:y") == StoreSpec(Path("/mnt/x:y"), 1.0)
    assert str(StoreSpec.parse("s:2")) == "s:2"
    for bad in ("s:0", "s:-1", "s:nan", "s:inf"):
        with pytest.raises(ConfigError, match="weight"):
            StoreSpec.parse(bad)


def test_every_row_exactly_once_per_epoch_with_correct_coordinates(stores):
    loader = FeatureLoader([stores["a"]], 64, seed=3, drop_last=False, shuffle_buffer=256)
    assert loader.num_rows == 900 and loader.dim == DIM and loader.backbone_name == "test"
    assert loader.batches_per_epoch == 15  # ceil(900 / 64), last batch 4 rows
    batches = take(loader, 15)
    assert [len(c) for c, _ in batches] == [64] * 14 + [4]
    got = [k for c, _ in batches for k in keys(c)]
    assert sorted(got) == train_rows(1200)
    # xyz is the unit vector of the row's own stored coordinates.
    ref_cond, ref_xyz = read_tensors([stores["a"]], "train")
    by_key = dict(zip(keys(ref_cond), ref_xyz, strict=True))
    cond = torch.cat([c for c, _ in batches])
    xyz = torch.cat([x for _, x in batches])
    assert xyz.dtype == torch.float32 and cond.dtype == torch.float32
    expected = torch.stack([by_key[k] for k in keys(cond)])
    torch.testing.assert_close(xyz, expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(xyz.norm(dim=1), torch.ones(len(xyz)))
    # And the order is actually shuffled (not the store order) across shards.
    assert got != sorted(got)
    assert loader.state_dict()["epoch"] == 1 and loader.state_dict()["batch_in_epoch"] == 0


def test_shuffle_buffer_mixes_across_shards(stores):
    # A buffer larger than the data: the first batch is a uniform sample of all five shards' rows.
    loader = FeatureLoader([stores["a"]], 64, seed=0, shuffle_buffer=2048)
    rows = [i for _, i in keys(take(loader, 1)[0][0])]
    edges = np.cumsum([sh.rows for sh in loader._sel.shards])[:-1]
    train = np.array(train_rows(1200))[:, 1]
    shard_ids = np.searchsorted(edges, np.searchsorted(train, rows), side="right")
    assert (
        len(set(shard_ids.tolist())) == 5
    )  # the smallest shard has 68 of 900 rows: P(missed) ~ 1e-2, seeded


def test_every_row_once_with_uneven_partitions(stores):
    loader = FeatureLoader([stores["a"]], 60, partitions=3, seed=0, drop_last=False, shuffle_buffer=300)
    rows = loader.partition_rows()
    assert sum(rows) == 900 and len(rows) == 3
    steps = loader.batches_per_epoch
    assert steps == max(-(-r // 20) for r in rows)
    got = [k for c, _ in take(loader, steps) for k in keys(c)]
    assert sorted(got) == train_rows(1200)


def test_same_seed_same_order_epochs_and_seeds_differ(stores):
    def order(seed, n):
        return [keys(c) for c, _ in take(FeatureLoader([stores["a"]], 100, seed=seed, shuffle_buffer=200), n)]

    steps = 9  # 900 // 100 per epoch with drop_last
    a, b = order(7, 2 * steps), order(7, 2 * steps)
    assert a == b
    epoch0, epoch1 = a[:steps], a[steps:]
    assert epoch0 != epoch1
    assert sorted(k for b in epoch0 for k in b) == sorted(k for b in epoch1 for k in b) == train_rows(1200)
    assert order(8, steps) != epoch0


def test_weights_give_expected_passes_per_epoch(stores):
    specs = [StoreSpec(stores["a"], 2.0), f"{stores['b']}:1", StoreSpec(stores["c"], 0.5)]
    loader = FeatureLoader(specs, 50, seed=5, drop_last=False, shuffle_buffer=500)
    assert loader.num_rows == 900 + 375 + 600
    n_epoch = 2 * 900 + 375 + 300
    assert sum(loader.partition_rows()) == n_epoch
    steps = loader.batches_per_epoch
    assert steps == -(-n_epoch // 50)
    it = iter(loader)
    epochs = []
    for e in range(2):
        got = [k for _ in range(loader.batches_in_epoch(e)) for k in keys(next(it)[0])]
        epochs.append(Counter(got))
    it.close()
    for counts in epochs:
        assert sum(counts.values()) == n_epoch
        assert {k: v for k, v in counts.items() if k[0] == 0} == {k: 2 for k in train_rows(1200, 0)}
        assert {k: v for k, v in counts.items() if k[0] == 1} == {k: 1 for k in train_rows(500, 1)}
        half = {k for k in counts if k[0] == 2}
        assert len(half) == 300 and all(counts[k] == 1 for k in half) and half <= set(train_rows(800, 2))
    assert {k for k in epochs[0] if k[0] == 2} != {k for k in epochs[1] if k[0] == 2}  # another half


def take_across_passes(loader, n: int) -> list[list[tuple[int, int]]]:
    """n batches; with shuffle=False one iter() is one pass, so start another pass when one ends."""
    out: list[list[tuple[int, int]]] = []
    while len(out) < n:
        for cond, _ in loader:
            out.append(keys(cond))
            if len(out) == n:
                break
    return out


@pytest.mark.parametrize(
    ("specs", "kw"),
    [
        (["a", "b"], dict(partitions=2)),
        ([("a", 2.0), ("c", 0.5)], dict(partitions=1)),
        (["a", "b"], dict(partitions=2, shuffle=False, drop_last=False)),
    ],
    ids=["2-partitions", "weights", "unshuffled"],
)
def test_resume_mid_epoch_gives_exactly_the_remaining_batches(stores, specs, kw):
    def make():
        resolved = [
            StoreSpec(stores[s], 1.0) if isinstance(s, str) else StoreSpec(stores[s[0]], s[1]) for s in specs
        ]
        return FeatureLoader(resolved, 64, seed=11, shuffle_buffer=256, **kw)

    first = make()
    steps = first.batches_per_epoch
    total, cut = 2 * steps + 4, steps + 5  # stop in the middle of the second epoch, go on into the third
    full = take_across_passes(make(), total)
    it = iter(first)
    for _ in range(cut if kw.get("shuffle", True) else 5):
        next(it)
    if not kw.get("shuffle", True):  # one pass per iter(): finish pass 1, take 5 of pass 2
        for _ in it:
            pass
        it = iter(first)
        for _ in range(5):
            next(it)
    state = json.loads(json.dumps(first.state_dict()))
    it.close()
    # The position is what the consumer took, not what the prefetch thread produced ahead.
    assert (state["epoch"], state["batch_in_epoch"], state["batches_total"]) == (1, 5, cut)
    resumed = make()
    resumed.load_state_dict(state)
    assert take_across_passes(resumed, total - cut) == full[cut:]
    assert resumed.state_dict()["batches_total"] == total


def test_resume_refuses_other_settings_or_data(stores):
    state = FeatureLoader([stores["a"]], 64, seed=1).state_dict()
    with pytest.raises(ConfigError, match="seed"):
        FeatureLoader([stores["a"]], 64, seed=2).load_state_dict(state)
    with pytest.raises(StoreError, match="differ"):
        FeatureLoader([stores["a"]], 64, seed=1, where="unique_country <> 'FR'").load_state_dict(state)
    FeatureLoader([stores["a"]], 64, seed=2).load_state_dict(state, strict=False)


def test_where_and_split_filters(stores):
    loader = FeatureLoader([stores["a"]], 10, where="unique_country <> 'FR'", shuffle=False, drop_last=False)
    expected = [(0, i) for i in range(1200) if i % 4 != 3 and COUNTRIES[i % 4] != "FR"]
    assert loader.num_rows == len(expected)
    got = [k for c, _ in loader for k in keys(c)]
    assert got == expected  # shuffle=False: one pass in store order
    assert [k for c, _ in loader for k in keys(c)] == expected  # another pass, same order
    ids = [
        i
        for b in iter_eval_batches([stores["a"]], "train", 64, where="unique_country <> 'FR'")
        for i in b.ids
    ]
    assert ids == [f"s0-{i}" for _, i in expected]
    test = FeatureLoader([stores["a"]], 10, split="test", shuffle=False, drop_last=False)
    assert sorted(k for c, _ in test for k in keys(c)) == [(0, i) for i in range(3, 1200, 4)]
    everything = FeatureLoader([stores["a"]], 10, split=None, shuffle=False, drop_last=False)
    assert everything.num_rows == 1200


@pytest.mark.parametrize("weights", [(1.0, 1.0), (2.0, 0.5)])
def test_ddp_ranks_together_yield_the_single_process_batch(stores, weights):
    specs = [StoreSpec(stores["a"], weights[0]), StoreSpec(stores["c"], weights[1])]
    kw = dict(batch_size=48, partitions=4, seed=21, shuffle_buffer=160)
    single = FeatureLoader(specs, **kw)
    ranks = [FeatureLoader(specs, rank=r, world_size=2, **kw) for r in range(2)]
    steps = single.batches_per_epoch + 3  # cross an epoch boundary
    assert all(r.batches_per_epoch == single.batches_per_epoch for r in ranks)
    ref = take(single, steps)
    per_rank = [take(r, steps) for r in ranks]
    for k in range(steps):
        assert len(per_rank[0][k][0]) == len(per_rank[1][k][0]) == 24
        torch.testing.assert_close(
            torch.cat([per_rank[0][k][0], per_rank[1][k][0]]), ref[k][0], rtol=0, atol=0
        )
        torch.testing.assert_close(
            torch.cat([per_rank[0][k][1], per_rank[1][k][1]]), ref[k][1], rtol=0, atol=0
        )
    # Each rank reads a disjoint set of shards.
    files = [{sh.path for p in r.local_partitions for sh in r._groups[p]} for r in ranks]
    assert files[0].isdisjoint(files[1]) and len(files[0] | files[1]) == 9


def test_config_errors(stores):
    with pytest.raises(ConfigError, match="not divisible by partitions"):
        FeatureLoader([stores["a"]], 10, partitions=3)
    with pytest.raises(ConfigError, match="not divisible by world_size"):
        FeatureLoader([stores["a"]], 12, partitions=3, world_size=2)
    with pytest.raises(ConfigError, match="exceeds the 5 shard"):
        FeatureLoader([stores["a"]], 12, partitions=6)
    with pytest.raises(ConfigError, match="larger than the data"):
        FeatureLoader([stores["b"]], 1000)
    with pytest.raises(ConfigError, match="nonexistent_col"):
        FeatureLoader([stores["a"]], 10, where="nonexistent_col = 1")


def test_store_errors(stores, tmp_path):
    with pytest.raises(StoreError, match="no rows selected"):
        FeatureLoader([stores["a"]], 10, where="unique_country = 'XX'")
    with pytest.raises(StoreError, match="no rows selected"):
        FeatureLoader([stores["a"]], 10, split="val")
    FeatureStore.create(tmp_path / "empty", BackboneInfo("test", "r1", DIM))
    with pytest.raises(StoreError, match="no rows selected"):
        FeatureLoader([tmp_path / "empty"], 10)
    with pytest.raises(StoreError, match="not a feature store"):
        FeatureLoader([tmp_path / "missing"], 10)
    write_store(tmp_path / "other", 100, shards=1, backbone="other", dim=16)
    with pytest.raises(StoreError, match=r"'other' 16-d .* 'test' 8-d"):
        FeatureLoader([stores["a"], tmp_path / "other"], 10)
    with pytest.raises(StoreError, match=r"'test' 8-d embeddings but the model expects 'dinov2' 1024-d"):
        FeatureLoader([stores["a"]], 10, expected_dim=1024, expected_backbone="dinov2")
    with pytest.raises(StoreError, match="expects 16-d"):
        iter_eval_batches([stores["a"]], "test", 10, expected_dim=16)
    FeatureLoader([stores["a"]], 10, expected_dim=DIM, expected_backbone="test")


@pytest.mark.parametrize("prefetch", [0, 2])
def test_nan_coordinates_never_reach_the_model(tmp_path, prefetch):
    write_store(tmp_path / "bad", 400, shards=2, bad_row=201)  # row 201 is a train row
    loader = FeatureLoader([tmp_path / "bad"], 10, prefetch=prefetch, shuffle=False)
    with pytest.raises(
        StoreError, match=r"shard shards/part-t\d-000000\.parquet: row id 's0-201' \(lat=nan, lon="
    ):
        for _ in loader:
            pass
    with pytest.raises(StoreError, match="s0-201"):
        list(iter_eval_batches([tmp_path / "bad"], None, 50))


def _loader_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "geoloc-loader" and t.is_alive()]


def test_prefetch_thread_stops_on_close_and_on_garbage_collection(stores):
    loader = FeatureLoader([stores["a"]], 16, prefetch=2)
    it = iter(loader)
    next(it)
    assert len(_loader_threads()) == 1
    it.close()
    assert _loader_threads() == []
    for _ in iter(loader):  # break out of a for loop: the dropped iterator stops its thread
        break
    gc.collect()
    assert _loader_threads() == []
    with pytest.raises(StopIteration):
        next(it)


def test_eval_batches_keep_every_row_in_order_with_labels(stores):
    batches = list(
        iter_eval_batches([stores["a"], stores["b"]], "test", 64, label_columns=["unique_country"])
    )
    n = 300 + 125
    assert [len(b) for b in batches] == [64] * (n // 64) + [n % 64]
    ids = [i for b in batches for i in b.ids]
    assert ids == [f"s0-{i}" for i in range(3, 1200, 4)] + [f"s1-{i}" for i in range(3, 500, 4)]
    b0 = batches[0]
    assert b0.cond.dtype == torch.float32 and b0.cond.shape == (64, DIM)
    assert b0.latlon.dtype == np.float64 and b0.latlon.shape == (64, 2)
    assert list(b0.labels["unique_country"][:2]) == [COUNTRIES[3], COUNTRIES[7 % 4]]
    assert keys(b0.cond)[:2] == [(0, 3), (0, 7)]
    # Same coordinates as the training path sees.
    _, xyz = read_tensors([stores["a"]], "test")
    torch.testing.assert_close(latlon_to_xyz(torch.from_numpy(b0.latlon)).float(), xyz[:64])
    with pytest.raises(StoreError, match="no label column"):
        iter_eval_batches([stores["a"]], "test", 64, label_columns=["city"])


def test_works_on_a_store_from_the_shared_helper(tmp_path):
    make_store(tmp_path / "s", 600, 16, shards=3)
    loader = FeatureLoader([tmp_path / "s"], 32, where="unique_country IS NOT NULL", seed=0)
    cond, xyz = next(iter(loader))
    assert cond.shape == (32, 16) and xyz.shape == (32, 3) and torch.isfinite(cond).all()
    assert loader.describe()["rows"] == loader.num_rows < 480


def test_a_scrambled_shard_is_refused_by_train_and_eval_readers(tmp_path, monkeypatch):
    """5,000 bytes scrambled inside a shard: the train loader and the eval batches refuse the store with one
    line naming the shard and `geoloc store verify`; an unchanged store is hashed once, then cached."""
    import geoloc.pipeline.store as store_mod

    root = tmp_path / "s"
    st = write_store(root, 6000, shards=3, dim=64)
    hashed: list[Path] = []
    real = store_mod.sha256_file
    monkeypatch.setattr(store_mod, "sha256_file", lambda p: hashed.append(Path(p)) or real(p))
    store_mod._CHECKED.clear()
    assert len(next(iter(FeatureLoader([root], 64, seed=0)))[0]) == 64
    assert len(hashed) == 3  # every shard checked once ...
    store_mod._CHECKED.clear()  # ... and remembered on disk for the next run
    assert len(next(iter_eval_batches([root], "test", 32))) == 32
    assert len(hashed) == 3
    victim = st.shard_paths()[1]
    data = bytearray(victim.read_bytes())
    mid = len(data) // 2
    data[mid : mid + 5000] = np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes()
    victim.write_bytes(bytes(data))
    name = victim.relative_to(root).as_posix()
    for read in (lambda: FeatureLoader([root], 64, seed=0), lambda: iter_eval_batches([root], "test", 32)):
        with pytest.raises(StoreError) as e:
            read()
        msg = str(e.value)
        assert name in msg and f"geoloc store verify {root}" in msg and "\n" not in msg
