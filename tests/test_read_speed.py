"""The read side: batch reads equal per-range reads, the decoded-chunk cache never mixes chunks up, damage
still raises, batched dataset items equal single ones, block shuffling and length buckets visit every video
once per epoch, reproducibly, with the crop distribution of the plain sampler; same seed, same loss curve."""

from __future__ import annotations

import numpy as np
import pytest

from indexing.errors import ConfigError, StoreError
from indexing.stores import open_store
from indexing.stores.reading import ChunkCache, chunk_cache, chunks_touched, read_many
from skim.data import CropBatchSampler, LengthBatchSampler, SkimDataset, collate
from skim.synthetic import PlantedSpec, write_planted_store

SPEC = PlantedSpec(videos=24, classes=3, min_steps=5, max_steps=30, dim=16, chunk_rows=16, seed=4)


@pytest.fixture(scope="module", params=["zarr", "hdf5"])
def planted(request, tmp_path_factory):
    return write_planted_store(
        tmp_path_factory.mktemp(f"planted-{request.param}") / "store", SPEC, store_format=request.param
    )


def _ranges(rows: int, rng: np.random.Generator, n: int = 60) -> list[tuple[int, int]]:
    out = [(0, 0), (rows - 3, rows), (0, rows), (15, 17), (16, 16 + 16)]  # empty, tail, all, 2 chunks, 1
    for _ in range(n):
        a = int(rng.integers(0, rows))
        out.append((a, int(rng.integers(a, min(rows, a + 50) + 1))))
    return out


@pytest.mark.parametrize("name", ["image", "fused", "valid", "time_s"])
def test_read_many_equals_read_rows_cold_and_from_the_cache(planted, name):
    store = open_store(planted["store"])
    ranges = _ranges(store.rows, np.random.default_rng(0))
    want = [store.read_rows(name, a, b) for a, b in ranges]
    for _ in range(2):  # the second pass is served from the cache
        got = read_many(store, name, ranges)
        assert len(got) == len(want)
        for g, w, (a, b) in zip(got, want, ranges, strict=True):
            assert g.dtype == w.dtype and g.shape == w.shape, (a, b)
            np.testing.assert_array_equal(g, w)
    assert chunk_cache(store).hits > 0


def test_cache_never_returns_rows_of_another_chunk(planted):
    store = open_store(planted["store"])
    # A cache holding two chunks at most: every read of a chunk that was evicted decodes it again; every
    # read of a held one must be that chunk's rows, whichever order the chunks are asked in.
    one_chunk = store.read_rows("image", 0, store.chunk_rows).nbytes
    chunk_cache(store, 2 * one_chunk)
    rng = np.random.default_rng(1)
    chunks = -(-store.rows // store.chunk_rows)
    for c in rng.integers(0, chunks, size=60).tolist():
        a, b = c * store.chunk_rows, min((c + 1) * store.chunk_rows, store.rows)
        (got,) = read_many(store, "image", [(a, b)])
        np.testing.assert_array_equal(got, store.read_rows("image", a, b))
        assert len(chunk_cache(store)) <= 2
    # Keys are (array, chunk): the same chunk index of another array is another entry.
    (img,) = read_many(store, "image", [(0, 4)])
    (aud,) = read_many(store, "audio", [(0, 4)])
    assert not np.array_equal(img, aud)
    # Served arrays are read-only views: writing into one cannot change a later read.
    with pytest.raises(ValueError):
        img[0, 0] = 1


def test_recycled_buffers_never_change_rows_already_served(planted):
    """Evicted chunk buffers and the spanning-range arena are reused only once no served view of them is
    alive: rows a caller still holds keep their values while other chunks are decoded into recycled buffers;
    dropped ones are reused (so a warm read allocates nothing)."""
    store = open_store(planted["store"])
    size, rows = store.chunk_rows, store.rows
    chunk_cache(store, 2 * store.read_rows("image", 0, size).nbytes)
    truth = store.read_rows("image", 0, rows)
    held = read_many(store, "image", [(0, 5), (size - 3, size + 4)])  # one chunk's view, one arena range
    kept = [h.copy() for h in held]
    rng = np.random.default_rng(2)
    for _ in range(30):  # evicts chunk 0 many times over; each round's results are dropped at once
        ranges = [(a := int(rng.integers(0, rows - 20)), a + int(rng.integers(1, 20))) for _ in range(3)]
        for got, (a, b) in zip(read_many(store, "image", ranges), ranges, strict=True):
            np.testing.assert_array_equal(got, truth[a:b])
    for h, k in zip(held, kept, strict=True):
        np.testing.assert_array_equal(h, k)
    assert chunk_cache(store).reused > 0
    # A batch holds one array's rows while it reads the next (image, then audio): arenas are still reused.
    audio = store.read_rows("audio", 0, rows)
    before = chunk_cache(store).reused
    for _ in range(5):
        (img,) = read_many(store, "image", [(size - 3, size + 4)])
        (aud,) = read_many(store, "audio", [(size - 3, size + 4)])
        np.testing.assert_array_equal(img, truth[size - 3 : size + 4])
        np.testing.assert_array_equal(aud, audio[size - 3 : size + 4])
    assert chunk_cache(store).reused >= before + 8


def test_read_chunk_into_ignores_what_the_buffer_held(planted):
    """read_chunk_into writes every row of its chunk into a buffer full of garbage: equal to read_chunk."""
    store = open_store(planted["store"])
    size = store.chunk_rows
    for name in ("image", "valid", "time_s"):
        for c in range(-(-store.rows // size)):
            want = store.read_chunk(name, c)
            buf = np.empty((size, *want.shape[1:]), want.dtype)
            buf.view(np.uint8)[...] = 0xA5
            got = store.read_chunk_into(name, c, buf)
            np.testing.assert_array_equal(got, want)
            if store.name == "zarr":  # the file read_chunk_into opens is the one files_of names
                dec = store._decoder(name)
                assert (
                    f"{dec.key_prefix}{c}{dec.key_suffix}" == store.files_of(name, c * size, c * size + 1)[0]
                )


@pytest.mark.parametrize("fmt", ["zarr", "hdf5"])
def test_read_chunk_into_fills_unfinished_rows(fmt, tmp_path):
    """Rows of a task without a done marker read as zeros through read_chunk_into too, whatever the buffer
    held before (a recycled buffer holds another chunk's rows)."""
    from indexing.stores import FEATURES, VideoRecord, get_store

    rows, dim, size = 48, 8, 16
    tasks = [(0, 16), (16, 48)]
    index = [
        VideoRecord("v0", "/v0.mp4", 0, 16, status="ok"),
        VideoRecord("v1", "/v1.mp4", 16, 32, status="pending"),
    ]
    store = get_store(fmt).create(
        tmp_path / "s", index=index, rows=rows, chunk_rows=size, dim=dim, tasks=tasks
    )
    ones = {k: np.ones((rows, dim), np.float16) for k in FEATURES}
    ones |= {"valid": np.ones(rows, bool), "audio_valid": np.ones(rows, bool), "time_s": np.arange(rows) / 2}
    for a, b in tasks:
        store.write_rows(a, b, {k: v[a:b] for k, v in ones.items()})
    store.mark_done(0, 16)  # the second task wrote its rows but is not done
    store.close()
    store = open_store(tmp_path / "s")
    for c in range(3):
        buf = np.full((size, dim), 7, np.float16)
        got = store.read_chunk_into("image", c, buf)
        np.testing.assert_array_equal(got, np.full((size, dim), 1 if c == 0 else 0, np.float16))
    (got,) = read_many(store, "image", [(8, 40)])
    np.testing.assert_array_equal(got[:8], 1)
    np.testing.assert_array_equal(got[8:], 0)


def test_a_store_with_a_filled_cache_pickles_and_reads_the_same(planted):
    """A store pickled after batch reads (for a loader worker) arrives with an empty cache of the same size
    and reads the same rows."""
    import pickle

    store = open_store(planted["store"])
    want = read_many(store, "image", [(0, 5), (14, 20)])
    copy = pickle.loads(pickle.dumps(store))
    assert len(chunk_cache(copy)) == 0 and chunk_cache(copy).max_bytes == chunk_cache(store).max_bytes
    for got, w in zip(read_many(copy, "image", [(0, 5), (14, 20)]), want, strict=True):
        np.testing.assert_array_equal(got, w)
    # A forked child (a loader worker) gets a cache of its own, with a lock nobody holds.
    old = chunk_cache(store)
    old.pid = -1  # as seen from a child process
    assert chunk_cache(store) is not old and chunk_cache(store).max_bytes == old.max_bytes


def test_chunk_cache_is_a_byte_bounded_lru():
    cache = ChunkCache(max_bytes=3 * 80)
    for c in range(4):
        cache.put("image", c, np.full((10,), c, dtype=np.float64))  # 80 bytes each
    assert len(cache) == 3 and cache.get("image", 0) is None  # the oldest went
    assert cache.get("image", 1)[0] == 1  # touched: now the newest
    cache.put("image", 4, np.full((10,), 4.0))
    assert cache.get("image", 2) is None and cache.get("image", 1)[0] == 1 and cache.bytes == 240
    cache.put("image", 9, np.zeros(100))  # larger than the whole cache: not kept
    assert cache.get("image", 9) is None


def test_a_cleared_cache_refills_into_its_buffers_within_its_budget(planted):
    """After clear() (a new epoch, a changed done listing) the next reads decode into the buffers the cache
    held, never more of them than its byte budget, and every row read is still the right one."""
    store = open_store(planted["store"])
    size = store.chunk_rows
    one = store.read_rows("image", 0, size).nbytes
    chunks = -(-store.rows // size)
    full = [c for c in range(chunks) if (c + 1) * size <= store.rows]  # whole chunks decode into buffers
    cache = chunk_cache(store, 8 * one)
    truth = store.read_rows("image", 0, store.rows)
    fresh = []
    for _ in range(3):
        cache.clear()
        for c in full:
            (got,) = read_many(store, "image", [(c * size, (c + 1) * size)])
            np.testing.assert_array_equal(got, truth[c * size : (c + 1) * size])
            del got
            assert cache.bytes + cache._free_bytes <= (8 + 4) * one
            assert cache._free_bytes == sum(b.nbytes for b in cache._free)
        fresh.append(cache.fresh)
    assert 0 < fresh[0] <= 8 + 4 and fresh[2] == fresh[1] == fresh[0]  # no fresh buffer after a clear
    held, _ = read_many(store, "image", [(0, 2), (size, size + 2)])  # a view still served
    cache.clear()  # the held chunk's buffer is not put on the free list
    assert all(not np.shares_memory(held, b) for b in cache._free)
    chunk_cache(store, one)  # shrinking the budget trims the free list
    assert cache._free_bytes <= (1 + 4) * one


def test_damage_still_raises_through_batch_reads(planted, tmp_path):
    import shutil

    path = tmp_path / "copy"
    shutil.copytree(planted["store"], path)
    store = open_store(path)
    victim = store.files_of("image", 20, 21)[0]
    (path / victim).unlink()
    with pytest.raises(StoreError, match="missing"):
        read_many(store, "image", [(0, 5), (18, 25)])
    # A chunk cached before its task lost the done marker is not served afterwards.
    store = open_store(planted["store"].parent / planted["store"].name, "r+")
    read_many(store, "image", [(0, 5)])
    task = store.done_ranges()[0]
    store.unmark_done(*task)
    try:
        with pytest.raises(StoreError, match="no finished task"):
            read_many(store, "image", [(0, 5)])
    finally:
        store.mark_done(*task)
        store.close()


def test_batched_items_equal_single_items(planted):
    store = open_store(planted["store"])
    for in_memory in (False, True):
        ds = SkimDataset(store, ("image", "audio"), require_label=False, in_memory=in_memory)
        sampler = CropBatchSampler(ds.steps, batch_size=5, crop_min=4, crop_max=20, seed=2)
        for batch in sampler:
            single = collate([ds[i] for i in batch])
            many = collate(ds.__getitems__(batch))
            for key in ("image", "audio"):
                assert torch_equal(single["features"][key], many["features"][key])
            assert torch_equal(single["mask"], many["mask"]) and single["video_ids"] == many["video_ids"]
            np.testing.assert_array_equal(single["time_s"].numpy(), many["time_s"].numpy())
        whole = list(range(len(ds)))
        a, b = collate([ds[i] for i in whole]), collate(ds.__getitems__(whole))
        assert torch_equal(a["features"]["image"], b["features"]["image"])


def torch_equal(a, b) -> bool:
    import torch

    return bool(torch.equal(a, b))


def _epoch(sampler: CropBatchSampler, epoch: int) -> list[list[tuple[int, int, int]]]:
    sampler.set_epoch(epoch)
    return list(sampler)


STEPS = np.random.default_rng(7).integers(100, 501, size=203).tolist()
BLOCKS = (np.cumsum([0] + STEPS[:-1]) // 1024).tolist()


@pytest.mark.parametrize(
    "options", [{}, {"blocks": BLOCKS}, {"buckets": True}, {"blocks": BLOCKS, "buckets": True, "window": 2}]
)
def test_every_video_once_per_epoch_reproducibly(options):
    sampler = CropBatchSampler(STEPS, batch_size=16, crop_min=200, crop_max=500, seed=3, **options)
    e0 = _epoch(sampler, 0)
    assert len(e0) == len(sampler)
    assert sorted(i for batch in e0 for i, _, _ in batch) == list(range(len(STEPS)))
    assert all(len(b) <= 16 for b in e0)
    again = CropBatchSampler(STEPS, batch_size=16, crop_min=200, crop_max=500, seed=3, **options)
    assert _epoch(again, 0) == e0  # same seed, same batches
    assert _epoch(sampler, 1) != e0  # another epoch, another order
    for batch in e0:  # one crop length per batch, windows inside each video
        lengths = {b - a for i, a, b in batch if STEPS[i] > b - a}
        assert len(lengths) <= 1
        assert all(0 <= a < b <= STEPS[i] for i, a, b in batch)


def _decodes(batches, first, cap_chunks: int) -> int:
    """Chunk decodes of reading ``batches`` grouped by chunk through an LRU of ``cap_chunks`` chunks."""
    cache, decodes = ChunkCache(max_bytes=cap_chunks), 0
    for batch in batches:
        ids = set()
        for i, a, b in batch:
            ids.update(range((first[i] + a) // 1024, (first[i] + b - 1) // 1024 + 1))
        for c in sorted(ids):
            if cache.get("image", c) is None:
                decodes += 1
                cache.put("image", c, np.zeros(1, dtype=np.uint8))
    return decodes


def test_block_shuffling_decodes_fewer_chunks_and_buckets_cut_padding():
    first = np.cumsum([0] + STEPS[:-1])
    chunks = -(-sum(STEPS) // 1024)

    def stats(options):
        sampler = CropBatchSampler(STEPS, batch_size=32, crop_min=200, crop_max=500, seed=0, **options)
        batches = [b for epoch in range(5) for b in _epoch(sampler, epoch)]
        padded = sum(max(b - a for _, a, b in batch) * len(batch) for batch in batches)
        valid = sum(b - a for batch in batches for _, a, b in batch)
        # the cache a trainer sizes for two batches' chunks (32 videos of ~300 steps: ~10 chunks each)
        return _decodes(batches, first, 2 * 14), padded / valid

    plain_decodes, plain_pad = stats({})
    block_decodes, _ = stats({"blocks": BLOCKS, "window": 2})
    both_decodes, both_pad = stats({"blocks": BLOCKS, "window": 2, "buckets": True})
    _, bucket_pad = stats({"buckets": True})
    assert block_decodes < 0.6 * plain_decodes and both_decodes < 0.6 * plain_decodes
    # about once per chunk and epoch (videos running into the next chunk share it with another block)
    assert block_decodes <= 1.6 * 5 * chunks, (block_decodes, both_decodes, plain_decodes, 5 * chunks)
    assert bucket_pad < plain_pad - 0.05 and both_pad < plain_pad - 0.05 and bucket_pad >= 1.0


def test_two_chunk_blocks_decode_fewer_chunks_than_one_chunk_blocks(planted):
    """block_options groups consecutive chunks into blocks: a video running into the next chunk then shares
    it with its own block more often, so whole-video epochs decode fewer chunks (same videos, once each)."""
    from skim.data import block_options

    first = np.cumsum([0] + STEPS[:-1])
    chunks = -(-sum(STEPS) // 1024)

    def decodes(per_block):
        blocks = (first // (1024 * per_block)).tolist()
        sampler = CropBatchSampler(STEPS, batch_size=32, crop_min=600, crop_max=600, seed=0, blocks=blocks)
        batches = [b for epoch in range(5) for b in _epoch(sampler, epoch)]
        assert sorted(i for b in batches[: len(sampler)] for i, _, _ in b) == list(range(len(STEPS)))
        return _decodes(batches, first, 2 * 14)

    one, two = decodes(1), decodes(2)
    assert two < one and two <= 1.3 * 5 * chunks, (one, two, 5 * chunks)

    class Config:
        shuffle, length_buckets, batch_size = "block", False, 4

    ds = SkimDataset(open_store(planted["store"]), ("image",), require_label=False)
    size = ds.store.chunk_rows
    assert block_options(ds, Config)["blocks"] == [e.first_row // (2 * size) for e in ds.entries]
    assert block_options(ds, Config, chunks_per_block=1)["blocks"] == [
        e.first_row // size for e in ds.entries
    ]
    with pytest.raises(ConfigError):
        block_options(ds, Config, chunks_per_block=0)


def test_buckets_keep_the_crop_distribution():
    # Per video, the crop length is min(steps, L) with L uniform in [200, 500] drawn per batch, whatever
    # the batch's other videos: compare the bucketed sampler's crops of every video with the plain one's.
    kw = {"batch_size": 8, "crop_min": 200, "crop_max": 500}
    steps = STEPS[:64]
    plain = CropBatchSampler(steps, seed=11, **kw)
    bucketed = CropBatchSampler(steps, seed=11, buckets=True, blocks=BLOCKS[:64], **kw)
    epochs = 300
    crops = {"plain": [], "bucketed": []}
    for key, sampler in (("plain", plain), ("bucketed", bucketed)):
        per_video = np.zeros((len(steps), epochs))
        starts = np.zeros((len(steps), epochs))
        for e in range(epochs):
            for batch in _epoch(sampler, e):
                for i, a, b in batch:
                    per_video[i, e] = b - a
                    starts[i, e] = a / (steps[i] - (b - a)) if b - a < steps[i] else np.nan
        crops[key] = (per_video, starts)
    p, b = crops["plain"][0], crops["bucketed"][0]
    # Every video: crop never longer than the video, mean crop within sampling error of the plain one.
    assert (b <= np.asarray(steps)[:, None]).all()
    expected = np.array([np.mean(np.minimum(n, np.arange(200, 501))) for n in steps])
    sem = 301 / np.sqrt(12 * epochs)  # standard error of a uniform mean, an upper bound after min()
    assert np.all(np.abs(p.mean(1) - expected) < 4 * sem)
    assert np.all(np.abs(b.mean(1) - expected) < 4 * sem)
    # Crop lengths of long videos are uniform on [200, 500] under both (pooled quartiles).
    long = np.asarray(steps) >= 500
    if long.any():
        q = np.quantile(b[long].ravel(), [0.25, 0.5, 0.75])
        np.testing.assert_allclose(q, [275, 350, 425], atol=15)
    # Crop starts are uniform over the possible positions.
    s = crops["bucketed"][1]
    s = s[~np.isnan(s)]
    assert len(s) > 1000 and abs(s.mean() - 0.5) < 0.03


def test_windowed_length_batches_cover_every_video_once():
    first = np.cumsum([0] + STEPS[:-1])
    plain = LengthBatchSampler(STEPS, batch_size=16)
    windowed = LengthBatchSampler(STEPS, batch_size=16, first_rows=first, window=64)
    for sampler in (plain, windowed):
        assert sorted(i for b in sampler for i in b) == list(range(len(STEPS)))
    chunks = {
        name: sum(chunks_touched([(first[i], first[i] + STEPS[i]) for i in b], 1024) for b in s)
        for name, s in (("plain", plain), ("windowed", windowed))
    }
    assert chunks["windowed"] < chunks["plain"]


@pytest.mark.parametrize("order", [{}, {"shuffle": "block", "length_buckets": True}])
def test_same_seed_same_loss_curve_from_the_store_and_from_memory(planted, tmp_path, order):
    from skim.train import TrainConfig, train

    curves = []
    for in_memory in (False, True):
        config = TrainConfig(
            epochs=3, batch_size=6, crop_min=8, crop_max=20, milestones=(), lr=0.05, val_split="none",
            init="scratch", in_memory=in_memory, threads=1, **order,
        )  # fmt: skip
        summary = train(
            planted["store"], tmp_path / f"m{in_memory}.pt", labels=planted["labels"],
            model_options={"hidden": 24, "embed": 16}, config=config, progress=False, log=lambda _: None,
        )  # fmt: skip
        curves.append([h["train_loss"] for h in summary["history"]])
    np.testing.assert_allclose(curves[0], curves[1], rtol=1e-6)
    assert len(set(curves[0])) > 1


def test_read_ahead_yields_the_same_batches_and_raises_damage_at_its_batch(planted, tmp_path):
    import shutil

    from skim.data import eval_sampler, make_loader

    store = open_store(planted["store"])
    ds = SkimDataset(store, ("image", "audio"), require_label=False)
    sampler = eval_sampler(ds, batch_size=4)
    assert sorted(i for b in sampler for i in b) == list(range(len(ds)))
    inline = list(make_loader(ds, sampler, read_ahead=0))
    ahead = list(make_loader(ds, sampler, read_ahead=2))
    assert [b["video_ids"] for b in inline] == [b["video_ids"] for b in ahead]
    for a, b in zip(inline, ahead, strict=True):
        assert torch_equal(a["features"]["image"], b["features"]["image"])
    for _ in make_loader(ds, sampler, read_ahead=1):
        break  # leaving early stops the thread (the test would hang otherwise)
    path = tmp_path / "copy"
    shutil.copytree(planted["store"], path)
    damaged = open_store(path)
    (path / damaged.files_of("image", damaged.rows - 1, damaged.rows)[0]).unlink()
    ds = SkimDataset(damaged, ("image", "audio"), require_label=False)
    with pytest.raises(StoreError, match="missing"):
        for _ in make_loader(ds, eval_sampler(ds, batch_size=4), read_ahead=1):
            pass


def test_loader_batches_keep_the_stores_float16_and_to_device_casts_them_once(planted):
    import torch

    from skim.data import eval_sampler, make_loader, to_device

    store = open_store(planted["store"])
    ds = SkimDataset(store, ("image", "audio"), require_label=False)
    sampler = eval_sampler(ds, batch_size=4)
    for idx, batch in zip(sampler, make_loader(ds, sampler, read_ahead=1), strict=True):
        half = batch["features"]
        assert half["image"].dtype == torch.float16  # waits in the read-ahead at half the size
        ref = collate([ds[i] for i in idx])  # the float32 batch of before
        moved = to_device(batch, "cpu")
        for key in ("image", "audio"):
            assert moved["features"][key].dtype == torch.float32
            assert torch.equal(moved["features"][key], ref["features"][key])  # same values, padding zero
            # the loader's float16 copy is released: whoever holds ``batch`` now sees the float32 one
            assert batch["features"][key] is moved["features"][key]
        assert torch.equal(moved["mask"], ref["mask"])


def test_eval_sampler_sizes_the_cache_to_decode_each_chunk_once(planted):
    from skim.data import eval_sampler, make_loader

    store = open_store(planted["store"])
    ds = SkimDataset(store, ("image", "audio"), require_label=False)
    sampler = eval_sampler(ds, batch_size=4)  # windows of 8 videos of 5-30 steps, 16-row chunks
    cache = chunk_cache(store)
    cache.clear()
    cache.misses = 0
    for _ in make_loader(ds, sampler, read_ahead=0):
        pass
    chunks = chunks_touched([(e.first_row, e.first_row + e.steps) for e in ds.entries], store.chunk_rows)
    assert cache.misses == 4 * chunks  # image, audio, valid, time_s: each chunk decoded once an epoch


def test_read_ahead_holds_at_most_depth_batches_besides_the_callers():
    import time

    from skim.data import ReadAhead

    class Counting:  # a loader that records how far it ran ahead of its caller
        batch_sampler = dataset = None

        def __init__(self) -> None:
            self.made, self.taken, self.lead = 0, 0, []

        def __len__(self) -> int:
            return 12

        def __iter__(self):
            for i in range(12):
                self.made += 1
                self.lead.append(self.made - self.taken)  # batches alive beyond those the caller let go
                yield i

    for depth in (1, 2):
        loader = Counting()
        got = []
        for i in ReadAhead(loader, depth):
            time.sleep(0.01)  # the model computing: the thread reads ahead meanwhile
            got.append(i)
            loader.taken += 1
        assert got == list(range(12))
        # the caller's batch, and at most ``depth`` read ahead (the old queue let the thread hold one more)
        assert max(loader.lead) == depth + 1, (depth, loader.lead)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from skim.train import TrainConfig, train

    root = tmp_path_factory.mktemp("query")
    corpus = write_planted_store(root / "store", SPEC)
    config = TrainConfig(
        epochs=1, batch_size=6, crop_min=8, crop_max=20, milestones=(), val_split="none", init="scratch",
        threads=1,
    )  # fmt: skip
    train(
        corpus["store"], root / "skim.pt", labels=corpus["labels"], model_options={"hidden": 24, "embed": 16},
        config=config, progress=False, log=lambda _: None,
    )  # fmt: skip
    return {"store": corpus["store"], "model": root / "skim.pt"}


def test_query_all_streams_json_lines_and_resumes(model, tmp_path):
    import inspect
    import json

    from click.testing import CliRunner

    from cli import main
    from skim.query import iter_query, query, write_jsonl

    assert inspect.isgenerator(iter_query(model["store"], model["model"]))  # answers are not collected
    want = {a["video_id"]: a for a in query(model["store"], model["model"], None)}
    out = tmp_path / "answers.jsonl"
    done = write_jsonl(model["store"], model["model"], out)
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert done["written"] == len(lines) == len(want) and {a["video_id"]: a for a in lines} == want
    # A run killed after 5 answers, in the middle of the sixth line: resume drops the cut line, asks the rest.
    text = out.read_text().splitlines(keepends=True)
    out.write_text("".join(text[:5]) + text[5][:17])
    done = write_jsonl(model["store"], model["model"], out, resume=True)
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert done == {"out": str(out), "written": len(want) - 5, "skipped": 5}
    assert sorted(a["video_id"] for a in lines) == sorted(want) and {a["video_id"]: a for a in lines} == want
    # The command line: --out refuses to overwrite, --resume finds nothing left to do.
    base = ["query", str(model["store"]), "--all", "--model", str(model["model"]), "--json"]
    args = [*base, "--out", str(out)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code != 0 and "--resume" in result.output
    result = CliRunner().invoke(main, [*args, "--resume"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["written"] == 0
    bad = tmp_path / "other.jsonl"
    bad.write_text('{"not": "an answer"}\n')
    result = CliRunner().invoke(main, [*base, "--out", str(bad), "--resume"])
    assert result.exit_code != 0 and "not a query answer" in result.output
    # --overwrite replaces the file with every answer; with --resume too, it is refused.
    result = CliRunner().invoke(main, [*base, "--out", str(bad), "--overwrite"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["written"] == len(want) == len(bad.read_text().splitlines())
    result = CliRunner().invoke(main, [*base, "--out", str(bad), "--overwrite", "--resume"])
    assert result.exit_code == 2 and "give one of them" in result.output
    # Without --out, --all prints the same answers as they come (batch order, as the file holds them), so it
    # never holds every answer either; the stdout is one JSON array.
    result = CliRunner().invoke(main, [*base, "--no-progress"])
    assert result.exit_code == 0, result.output
    printed = json.loads(result.stdout)
    assert printed == [json.loads(line) for line in bad.read_text().splitlines()]
    assert [a["video_id"] for a in printed] != sorted(want)  # not re-sorted into store order in memory


def test_train_command_takes_block_shuffle_and_length_buckets(model, tmp_path):
    import json

    from click.testing import CliRunner

    from cli import main

    args = [
        "train", str(model["store"]), "--labels", str(model["store"].parent / "store.labels.csv"),
        "--out", str(tmp_path / "m.pt"), "--epochs", "1", "--hidden", "24", "--embed", "16",
        "--init", "scratch", "--batch-size", "6", "--crop-min", "8", "--crop-max", "20", "--milestones", "",
        "--val-split", "none",
        "--shuffle", "block", "--length-buckets", "--json",
    ]  # fmt: skip
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    from skim.checkpoint import load_checkpoint

    assert json.loads(result.stdout)["epochs"] == 1
    config = load_checkpoint(tmp_path / "m.pt").meta["train_config"]
    assert config["shuffle"] == "block" and config["length_buckets"] is True
    bad = CliRunner().invoke(main, [*args[:-4], "--shuffle", "chunks"])
    assert bad.exit_code != 0 and "chunks" in bad.output


@pytest.mark.parametrize("compression", ["blosc-lz4hc", "zstd", "blosc-lz4", "none"])
def test_direct_chunk_decoding_equals_zarr_and_checks_damage(compression, tmp_path):
    """The zarr store decodes chunk files itself (no zarr call per read): equal to plain zarr's read for every
    codec, every array and ragged ranges; a flipped byte still raises StoreError through every read path."""
    import zarr

    from indexing.stores import FEATURES, ROW_ARRAYS, VideoRecord, array_path, get_store

    rows, dim, size = 70, 8, 16  # the last chunk is short
    rng = np.random.default_rng(5)
    data = {k: np.maximum(rng.standard_normal((rows, dim)), 0).astype(np.float16) for k in FEATURES}
    data |= {
        "valid": rng.random(rows) < 0.8,
        "audio_valid": rng.random(rows) < 0.5,
        "time_s": np.arange(rows) / 3,
    }
    tasks = [(0, 32), (32, rows)]
    index = [VideoRecord(f"v{i}", f"/v{i}.mp4", a, b - a, status="ok") for i, (a, b) in enumerate(tasks)]
    store = get_store("zarr").create(
        tmp_path / "s", index=index, rows=rows, chunk_rows=size, dim=dim, tasks=tasks, compression=compression
    )
    for a, b in tasks:
        store.write_rows(a, b, {k: v[a:b] for k, v in data.items()})
        store.mark_done(a, b)
    store.close()
    default = compression == "none"
    store = open_store(tmp_path / "s")
    assert store.compression == compression and (store._decoder("image") is not None)
    assert store.checksums == ("zstd-xxh64" if compression == "zstd" else "crc32c")
    plain = zarr.open_group(str(tmp_path / "s"), mode="r")
    for name in FEATURES + ROW_ARRAYS:
        for a, b in [(0, rows), (3, 5), (15, 17), (60, rows), (16, 32), (7, 7)]:
            got = store.read_rows(name, a, b)
            want = plain[array_path(name)][a:b]
            assert got.dtype == want.dtype and got.shape == want.shape
            np.testing.assert_array_equal(got, want)
            np.testing.assert_array_equal(got, data[name][a:b])
        for c in range(-(-rows // size)):
            np.testing.assert_array_equal(
                store.read_chunk(name, c), want := plain[array_path(name)][c * size :][:size]
            )
            assert len(want) == min(size, rows - c * size)
    if default:
        s2 = get_store("zarr").create(
            tmp_path / "d", index=index, rows=rows, chunk_rows=size, dim=dim, tasks=tasks
        )
        assert s2.compression == "none"
        s2.close()
    # One flipped byte in a chunk of a done task: every read path refuses it.
    victim = tmp_path / "s" / store.files_of("image", 16, 17)[0]
    raw = bytearray(victim.read_bytes())
    raw[len(raw) // 2] ^= 0x10
    victim.write_bytes(bytes(raw))
    for read in (
        lambda s: s.read_rows("image", 16, 20),
        lambda s: s.read_chunk("image", 1),
        lambda s: read_many(s, "image", [(10, 20)]),
    ):
        with pytest.raises(StoreError, match="image"):
            read(open_store(tmp_path / "s"))
    # A store that has read (and checked) the file before, as a training process that read it last epoch,
    # takes the direct path of uncompressed chunks: a flipped byte, a cut or a longer file still raise.
    raw[len(raw) // 2] ^= 0x10
    good = bytes(raw)
    raw[len(raw) // 2] ^= 0x10
    victim.write_bytes(good)
    warm = open_store(tmp_path / "s")
    buf = np.empty((size, dim), np.float16)
    np.testing.assert_array_equal(warm.read_chunk_into("image", 1, buf), data["image"][16:32])
    for damaged in (bytes(raw), good[:-1], good + b"\0", good[:-4] + bytes(4)):
        victim.write_bytes(damaged)
        with pytest.raises(StoreError, match="image"):
            warm.read_chunk_into("image", 1, buf)
        with pytest.raises(StoreError, match="image"):
            read_many(warm, "image", [(10, 20)], cache=False)
    victim.write_bytes(good)
    np.testing.assert_array_equal(warm.read_chunk_into("image", 1, buf), data["image"][16:32])


def test_collate_casts_exactly_like_numpy_across_its_copy_blocks():
    """collate copies float16 rows in blocks under torch's parallel grain: every row lands, exactly cast,
    padding stays zero, read-only inputs are fine."""
    rng = np.random.default_rng(3)
    lengths = [1, 63, 64, 65, 130, 200]
    items = []
    for i, n in enumerate(lengths):
        x = rng.standard_normal((n, 512)).astype(np.float16)
        x.flags.writeable = False  # as the decoded chunks the cache serves
        items.append(
            {"features": {"image": x}, "valid": np.ones(n, bool), "time_s": np.arange(n) * 0.5,
             "label": 0, "offset": 0, "video_id": f"v{i}"}
        )  # fmt: skip
    got = collate(items)["features"]["image"].numpy()  # (B, N, D)
    want = np.zeros((len(lengths), max(lengths), 512), np.float32)
    for i, it in enumerate(items):
        want[i, : lengths[i]] = it["features"]["image"]
    np.testing.assert_array_equal(got, want)


def test_cli_makes_openmp_threads_sleep_before_torch_loads():
    """``l2l`` sets OMP_WAIT_POLICY=PASSIVE before anything imports torch (OpenMP reads it once, at load),
    and a user's own setting wins."""
    import os
    import subprocess
    import sys

    probe = "import cli, os, sys; print(os.environ.get('OMP_WAIT_POLICY'), 'torch' in sys.modules)"
    for given, want in ((None, "PASSIVE False"), ("ACTIVE", "ACTIVE False")):
        env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
        if given:
            env["OMP_WAIT_POLICY"] = given
        out = subprocess.run(
            [sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True
        )
        assert out.stdout.strip() == want
