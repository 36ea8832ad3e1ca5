"""Zarr v3 directory store: the default backend.

Layout of a store directory (plain ``zarr.open_group(path)`` reads all of it)::

    zarr.json                 root group: attrs (format, format_version, step_s, audio, models, config)
                              and the consolidated metadata of every array (one file read to open)
    features/{image,audio,fused}   (rows, dim) float16|float32, chunks of (chunk_rows, dim)
    valid, audio_valid        (rows,) bool, fill False (unwritten rows read as not valid)
    time_s                    (rows,) float64, step start in seconds
    index/<column>            (videos,) one array per VideoRecord field; strings are variable-length
                              UTF-8, chunks of 131072 videos (a 10^6-video index is ~8 chunks per column)

Compression: the default is ``none`` (float16 bytes, then ``crc32c``): whole-video reads are bound by
memory traffic, and trained students' float16 features hardly compress. Measured on the demo's trained
students (11,439 valid rows, 1,024-row chunks, float16): blosc LZ4HC keeps 1.00 of the image and fused
bytes and 0.91 of the audio bytes (repeated rows of silent steps), zstd level 1-3 0.92 / 0.84 / 0.92;
bench/store.py measured 0.98 (LZ4HC) and 0.85 (zstd) on the paper students. An uncompressed chunk is read
straight into the reader's buffer and its crc32c checked there (one copy, ~0.23 ms a 1 MB chunk on this
host); an LZ4HC chunk costs a second pass (~0.33 ms, same run), zstd 1-2 ms. Block-shuffled epochs of the
bench's 1,000 videos (interleaved in one process, load ~8): ``none`` 1.39x the per-video float32 .npy
layout per CPU-second, ``blosc-lz4hc`` (the default from issue 14 until this change) 0.96x. Either is half
the .npy bytes. ``blosc-lz4hc`` (level 5, no shuffle), ``zstd`` (level 3, frame checksum: ~10% less disk,
4x the decode) and ``blosc-lz4`` (with shuffle) are still written on request and read everywhere (the codec
is in each array's metadata; ``l2l store info`` names it). Feature-set arrays added to a ``none`` or
``blosc-lz4hc`` store (:meth:`ZarrStore.add_arrays`) use zstd: they are read a row at a time from ~256 kB
inner chunks, where the decode is small and the disk (students' inputs) large.

Reading (issue 14): :meth:`ZarrStore.read_chunk_into` and ``_read`` decode an unsharded array's chunk
files straight from disk (one file read into a reused per-thread buffer, the checks of
:meth:`FeatureStore.read_rows` on the bytes read, then crc32c / the zstd frame checksum and the codec
writing into the caller's buffer: no allocation), equal to zarr's read (tested); zarr-python's async
pipeline costs about a millisecond per call on top of the decode. An uncompressed (``none``) chunk whose
file this open store has checked against its task's record once is read straight into the caller's
buffer and its crc32c checked there: one copy of the bytes instead of two. Sharded arrays and other
codecs read through zarr.

With ``inner_chunk_rows`` the feature arrays are sharded: one shard file per ``chunk_rows`` rows (the
write unit, tasks align to shards) holding chunks of ``inner_chunk_rows``, which keeps the file count low
while a one-video read decompresses little.

Integrity (format 2): every chunk of every array carries a checksum verified on every read. zstd chunks
(always the row and index arrays) use zstd's own frame checksum (xxh64 of the chunk; a flipped or cut
byte fails the frame or the checksum); ``none`` (the default) and blosc chunks get the ``crc32c`` codec
after the compressor (google-crc32c, hardware crc32c: ~0.04 ms a 1 MB chunk in cache). Measured on
float16 rows (bench/store.py, ``store_integrity``), the zstd frame checksum cost less than zstd + crc32c
(read 1,034 vs 989 MB/s, write 115 vs 102 MB/s; 1,074 / 137 with no checksum); through zarr-python's own
read, crc32c on uncompressed chunks was expensive (read 811 vs 2,236 MB/s), not on the direct read.
Chunks are written even when they hold only fill values (``write_empty_chunks``), so every chunk of a
finished task exists and a missing file is always damage, never "all zeros". ``layout/tasks`` holds the
planned task ranges; each done marker records the chunk files its task wrote (see :class:`FeatureStore`).
zarr writes each chunk to a temporary file and renames it, so a killed writer leaves the old chunk or the
new one.

Writes are chunk-aligned (see :meth:`ZarrStore.write_rows`); the index and attrs are written only by
``create`` and ``set_index``, which also re-consolidate the metadata.
"""

from __future__ import annotations

import json
import os
import re
import threading
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from indexing.errors import ConfigError, StoreError

from . import (
    FEATURES,
    FORMAT_NAME,
    INDEX_COLUMNS,
    ROW_ARRAYS,
    FeatureStore,
    VideoRecord,
    array_dtype,
    array_path,
    check_attrs,
    check_block,
    check_feature_dtype,
    check_index,
    check_row_range,
    check_tasks,
    columns_to_records,
    normalize_columns,
    prepare_store_dir,
    register_store,
    row_shape,
)

INDEX_CHUNK = 1 << 17  # videos per index chunk
COMPRESSIONS = ("none", "blosc-lz4hc", "zstd", "blosc-lz4")
DEFAULT_COMPRESSION = "none"


WRITE_CONFIG = {"write_empty_chunks": True}  # every written chunk exists on disk, fill or not
_TEMP_RE = re.compile(r"(\.[0-9a-f]{32}\.partial$)|(\.tmp-)")  # zarr's and our atomic-write temporaries


def _compressors(compression: str, checksums: bool = True) -> list[Any]:
    from zarr.codecs import BloscCodec, Crc32cCodec, ZstdCodec

    if compression == "default":
        compression = DEFAULT_COMPRESSION
    if compression == "zstd":
        return [ZstdCodec(level=3, checksum=checksums)]  # the frame checksum: cheaper than crc32c (measured)
    if compression == "blosc-lz4hc":
        codecs: list[Any] = [BloscCodec(cname="lz4hc", clevel=5, shuffle="noshuffle")]
    elif compression == "blosc-lz4":
        codecs = [BloscCodec(cname="lz4", clevel=5, shuffle="shuffle")]
    elif compression == "none":
        codecs = []
    else:
        raise ConfigError(f"unknown zarr compression {compression!r}; use one of {', '.join(COMPRESSIONS)}")
    return codecs + [Crc32cCodec()] if checksums else codecs


def _checksum_name(compression: str) -> str:
    if compression == "default":
        compression = DEFAULT_COMPRESSION
    return "zstd-xxh64" if compression == "zstd" else "crc32c"


def _consolidate(path: Path) -> None:
    import zarr

    with warnings.catch_warnings():
        # zarr warns that consolidated metadata is not in the v3 spec yet; zarr-python reads it fine.
        warnings.simplefilter("ignore", category=UserWarning)
        zarr.consolidate_metadata(str(path))


def _array_path(name: str) -> str:
    return array_path(name)


@register_store
class ZarrStore(FeatureStore):
    """Feature store in a Zarr v3 directory (see the module docstring for the layout)."""

    name = "zarr"

    def __init__(self, path: Path, group: Any, mode: str) -> None:
        self.path = path
        self.mode = mode
        self._group = group
        self._arrays: dict[str, Any] = {}
        self._columns: dict[str, np.ndarray] | None = None
        fused = self._array("fused")
        self._rows, self._dim = int(fused.shape[0]), int(fused.shape[1])
        self._dtype = str(fused.dtype)
        shards = fused.shards
        self._chunk_rows = int(shards[0] if shards else fused.chunks[0])

    # ---- creation and writing ---------------------------------------------------------------------
    @classmethod
    def create(
        cls,
        path: str | Path,
        *,
        index: Sequence[VideoRecord],
        rows: int,
        chunk_rows: int,
        dim: int = 512,
        dtype: str = "float16",
        attrs: Mapping[str, Any] | None = None,
        tasks: Sequence[tuple[int, int]] | None = None,
        compression: str = "default",
        overwrite: bool = False,
        inner_chunk_rows: int | None = None,
        checksums: bool = True,
    ) -> ZarrStore:
        """Create an empty Zarr store; see :meth:`FeatureStore.create`.

        Args:
            inner_chunk_rows: Shard the feature arrays: each ``chunk_rows`` shard holds chunks of this many
                rows (must divide ``chunk_rows``). ``None`` writes one file per chunk.
            checksums: Checksum every chunk (``False`` only to measure what it costs).
        """
        import zarr

        path = Path(path)
        cls._check_sizes(rows, chunk_rows, dim)
        dtype = check_feature_dtype(dtype)
        root_attrs = check_attrs(attrs)
        columns = check_index(index, rows)
        planned = check_tasks(tasks or [], rows=rows, chunk_rows=chunk_rows)
        compressors = _compressors(compression, checksums)
        root_attrs["checksums"] = _checksum_name(compression) if checksums else "none"
        if inner_chunk_rows is not None and (inner_chunk_rows <= 0 or chunk_rows % inner_chunk_rows):
            raise ConfigError(
                f"inner_chunk_rows={inner_chunk_rows} must be positive and divide chunk_rows={chunk_rows}"
            )
        prepare_store_dir(path, overwrite=overwrite)

        group = zarr.open_group(str(path), mode="w", attributes=root_attrs)
        for name in FEATURES:
            shard_kw: dict[str, Any] = {"chunks": (chunk_rows, dim)}
            if inner_chunk_rows is not None and inner_chunk_rows < chunk_rows:
                shard_kw = {"chunks": (inner_chunk_rows, dim), "shards": (chunk_rows, dim)}
            group.create_array(
                f"features/{name}",
                shape=(rows, dim),
                dtype=dtype,
                fill_value=0,
                compressors=compressors,
                dimension_names=("row", "feature"),
                config=WRITE_CONFIG,
                **shard_kw,
            )
        for name in ROW_ARRAYS:
            group.create_array(
                name,
                shape=(rows,),
                chunks=(chunk_rows,),
                dtype=array_dtype(name, dtype),
                fill_value=False if name != "time_s" else 0.0,
                compressors=_compressors("zstd", checksums),
                dimension_names=("row",),
                config=WRITE_CONFIG,
            )
        layout = group.create_array(
            "layout/tasks",
            shape=(len(planned), 2),
            chunks=(max(1, len(planned)), 2),
            dtype="int64",
            compressors=_compressors("zstd", checksums),
            config=WRITE_CONFIG,
        )
        if planned:
            layout[:] = np.asarray(planned, dtype=np.int64)
        _write_index(group, columns, checksums)
        _consolidate(path)
        store = cls.open(path, "r+")
        store._save_planned_index(columns)
        return store

    def write_rows(self, start: int, stop: int, arrays: Mapping[str, np.ndarray]) -> None:
        """Write rows ``[start, stop)``; see :meth:`FeatureStore.write_rows`. Rewriting is idempotent."""
        self._check_writable()
        check_row_range(start, stop, rows=self._rows, chunk_rows=self._chunk_rows)
        blocks = {
            name: check_block(name, data, n=stop - start, dim=self._dim, feature_dtype=self._dtype)
            for name, data in arrays.items()
        }
        if stop == start:
            return
        for name, block in blocks.items():
            self._array(name)[start:stop] = block

    def set_index(self, records: Sequence[VideoRecord]) -> None:
        """Replace the per-video index arrays and re-consolidate the metadata."""
        import zarr

        self._check_writable()
        columns = check_index(records, self._rows)
        _write_index(self._group, columns, self.checksums != "none")
        _consolidate(self.path)
        # The open group holds the old consolidated metadata (old index shapes): reopen it.
        self._group = zarr.open_group(str(self.path), mode=self.mode)
        self._arrays.clear()
        self.__dict__.pop("_decoders", None)  # decoders follow the arrays they were made from
        self._columns = None

    # ---- reading -----------------------------------------------------------------------------------
    @classmethod
    def open(cls, path: str | Path, mode: str = "r") -> ZarrStore:
        """Open a Zarr store read-only (``"r"``) or for writing rows and the index (``"r+"``)."""
        import zarr

        path = Path(path)
        cls._check_mode(mode)
        if not cls.is_store(path):
            raise ConfigError(
                f"{path} is not a zarr feature store (no zarr.json with format {FORMAT_NAME!r})"
            )
        group = zarr.open_group(str(path), mode=mode)
        cls._check_version(path, group.attrs)
        return cls(path, group, mode)

    @classmethod
    def is_store(cls, path: Path) -> bool:
        meta = Path(path) / "zarr.json"
        if not meta.is_file():
            return False
        try:
            doc = json.loads(meta.read_text())
        except (OSError, ValueError):
            return False
        return doc.get("node_type") == "group" and doc.get("attributes", {}).get("format") == FORMAT_NAME

    @property
    def attrs(self) -> dict[str, Any]:
        return dict(self._group.attrs)

    @property
    def rows(self) -> int:
        return self._rows

    @property
    def dim(self) -> int:
        return self._dim

    @property
    def chunk_rows(self) -> int:
        return self._chunk_rows

    @property
    def dtype(self) -> str:
        return self._dtype

    @property
    def compression(self) -> str:
        codecs = self._array("fused").compressors
        for codec in codecs:
            if type(codec).__name__ == "ZstdCodec":
                return "zstd"
            if type(codec).__name__ == "BloscCodec":
                cname = getattr(codec.cname, "value", codec.cname)
                return "blosc-lz4hc" if cname == "lz4hc" else "blosc-lz4"
        return "none"

    @property
    def checksums(self) -> str:
        return str(self._group.attrs.get("checksums", "none"))

    def index_columns(self) -> dict[str, np.ndarray]:
        if self._columns is None:
            raw = {}
            for name in INDEX_COLUMNS:
                arr = self._group[f"index/{name}"]
                if self.verified:
                    for i in range(-(-arr.shape[0] // arr.chunks[0])):
                        key = f"index/{name}/c/{i}"
                        if not (self.path / key).is_file():
                            raise StoreError(
                                f"store {self.path}: index chunk {key} is missing; run `l2l store repair "
                                f"{self.path}` to rebuild the index"
                            )
                try:
                    raw[name] = arr[:]
                except Exception as exc:  # noqa: BLE001 - the codecs raise many types for damaged bytes
                    raise StoreError(
                        f"store {self.path}: index column index/{name} is damaged ({type(exc).__name__}: "
                        f"{exc}); run `l2l store repair {self.path}` to rebuild the index"
                    ) from exc
            self._columns = normalize_columns(raw)
        return self._columns

    def videos(self) -> list[VideoRecord]:
        return columns_to_records(self.index_columns())

    def _read(self, name: str, start: int, stop: int) -> np.ndarray:
        dec = self._decoder(name)
        if dec is None:
            return self._array(name)[start:stop]
        size = dec.chunk_rows
        out = np.empty((stop - start, *dec.row_shape), dec.dtype)
        for c in range(start // size, (stop - 1) // size + 1) if stop > start else ():
            a, b = max(start, c * size), min(stop, (c + 1) * size)
            rel = self.files_of(name, c * size, c * size + 1)[0]
            try:
                data = _read_file(self.path / rel)
            except FileNotFoundError:
                out[a - start : b - start] = dec.fill_value  # as zarr reads a chunk never written
                continue
            if a == c * size and b == (c + 1) * size:
                dec.decode_into(data, out[a - start : b - start])  # a whole chunk: no temporary
            else:
                out[a - start : b - start] = dec.decode_into(data, _scratch("chunk", dec.nbytes, dec))[
                    a - c * size : b - c * size
                ]
        return out

    def read_chunk(self, name: str, chunk: int) -> np.ndarray:
        """Rows of one chunk, decoded straight from its file when every row is a finished task's (one file
        read: the size and digest checks of :meth:`FeatureStore.read_rows` run on the bytes read, then the
        codecs with their checksums); otherwise :meth:`FeatureStore.read_rows`. Returns a read-only array."""
        dec = self._decoder(name) if self.verified else None
        if dec is None:
            return super().read_chunk(name, chunk)
        rows = self.read_chunk_into(name, chunk, np.empty((dec.chunk_rows, *dec.row_shape), dec.dtype))
        rows.flags.writeable = False
        return rows

    def read_chunk_into(self, name: str, chunk: int, out: np.ndarray) -> np.ndarray:
        """:meth:`read_chunk` decoded straight into ``out`` (see :meth:`FeatureStore.read_chunk_into`): the
        file is read into a reused per-thread buffer and decoded into ``out``, so a warm read allocates
        nothing (fresh megabyte buffers cost more in page faults than the decode itself, measured)."""
        size = self._chunk_rows
        a, b = chunk * size, min((chunk + 1) * size, self._rows)
        verified = self.__dict__.get("_format_verified")
        if verified is None:  # the format version of an open store does not change
            verified = self.__dict__["_format_verified"] = self.verified
        dec = self._decoder(name) if verified else None
        if dec is None or b <= a or sum(y - x for x, y in self._done_segments(a, b)) < b - a:
            return super().read_chunk_into(name, chunk, out)
        rel = f"{dec.key_prefix}{chunk}{dec.key_suffix}"  # as files_of (tested equal)
        if (
            dec.raw_crc
            and rel in self.__dict__.get("_verified_files", ())
            and _read_raw_into(f"{self.path}/{rel}", out, dec)
        ):
            # An uncompressed chunk whose file was checked against its task's record (size and sha256)
            # in this open store: the file read straight into ``out`` and its crc32c checked there, one
            # copy instead of two. Anything unexpected (size, checksum) reads again below, which names it.
            return out[: b - a]
        try:
            data = _read_file(f"{self.path}/{rel}")
        except FileNotFoundError:
            raise self.damage_error(name, a, b, f"{rel} is missing") from None
        self._check_file(name, rel, a, b, data)
        try:
            dec.decode_into(data, out)
        except Exception as exc:  # noqa: BLE001 - codecs raise many types; all mean damaged bytes
            raise self.damage_error(name, a, b, f"{type(exc).__name__}: {exc}") from exc
        return out[: b - a]

    def _decoder(self, name: str) -> _ChunkDecoder | None:
        """A direct decoder of ``name``'s chunk files, or ``None`` where zarr must read (sharded arrays, other
        codecs or key encodings): zarr-python's async pipeline costs more than the decode of a 1 MB chunk."""
        cache = self.__dict__.setdefault("_decoders", {})
        if name not in cache:
            dec = cache[name] = _ChunkDecoder.of(self._array(name), self._chunk_rows)
            if dec is not None:
                dec.key_prefix = f"{_array_path(name)}/c/"
                dec.key_suffix = "/0" * len(row_shape(name, self._dim))
        return cache[name]

    def files_of(self, name: str, start: int, stop: int) -> list[str]:
        if stop <= start:
            return []
        base = _array_path(name)
        tail = "/0" * len(row_shape(name, self._dim))  # one chunk across every non-row axis
        first, last = start // self._chunk_rows, (stop - 1) // self._chunk_rows
        return [f"{base}/c/{i}{tail}" for i in range(first, last + 1)]

    def tasks(self) -> list[tuple[int, int]]:
        if "layout" not in self._group or "tasks" not in self._group["layout"]:
            return []  # format 1: tasks were only validated
        return [(int(a), int(b)) for a, b in self._group["layout/tasks"][:].tolist()]

    def extra_files(self) -> list[tuple[str, str]]:
        out = []
        chunks = -(-self._rows // self._chunk_rows)
        for name in self.array_names():
            base = _array_path(name)
            want = re.compile(rf"^c/(\d+){'/0' * len(row_shape(name, self._dim))}$")
            root = self.path / base
            for dirpath, _, files in os.walk(root / "c"):
                for file in files:
                    rel = os.path.relpath(os.path.join(dirpath, file), root).replace(os.sep, "/")
                    if _TEMP_RE.search(file):
                        continue
                    m = want.match(rel)
                    if not m or int(m.group(1)) >= chunks:
                        out.append(
                            (
                                f"{base}/{rel}",
                                f"not a chunk of {base} ({chunks} chunks of {self._chunk_rows} rows)",
                            )
                        )
        return out

    def file_problems(self) -> list[str]:
        problems = []
        for name in self.array_names():
            try:
                arr = self._array(name)
            except (KeyError, FileNotFoundError) as exc:
                problems.append(f"array {_array_path(name)} is missing: {exc}")
                continue
            want = (self._rows, *row_shape(name, self._dim))
            if tuple(arr.shape) != want:
                problems.append(f"array {_array_path(name)} has shape {tuple(arr.shape)}, expected {want}")
        return problems

    def add_arrays(self, names: Sequence[str], attrs: Mapping[str, Any]) -> None:
        """Create arrays ``names`` (registered feature-set arrays) over all rows, one shard file per
        ``chunk_rows`` rows like the features (fill 0, the features' codec and checksum) holding inner chunks
        of about 256 kB (8 rows of ``inputs_frame``), so a training read of one step decodes little, and
        merge ``attrs`` into the root attrs. Existing arrays of the same shape are kept, so a
        rerun (resume) changes nothing."""
        import zarr

        self._check_writable()
        merged = check_attrs({**self.attrs, **attrs})
        fused = self._array("fused")
        codecs = list(fused.compressors)
        if self.compression in ("none", "blosc-lz4hc"):  # row reads of big inputs: zstd (module docstring)
            codecs = _compressors("zstd", self.checksums != "none")
        for name in names:
            shape = (self._rows, *row_shape(name, self._dim))
            key = _array_path(name)
            if key in self._group and tuple(self._group[key].shape) == shape:
                continue
            inner = _inner_rows(
                self._chunk_rows, int(np.prod(shape[1:])) * array_dtype(name, self._dtype).itemsize
            )
            layout: dict[str, Any] = {"chunks": (self._chunk_rows, *shape[1:])}
            if inner < self._chunk_rows:  # one shard file per chunk_rows rows; a step read decodes ~256 kB
                layout = {"chunks": (inner, *shape[1:]), "shards": (self._chunk_rows, *shape[1:])}
            self._group.create_array(
                key,
                shape=shape,
                **layout,
                dtype=array_dtype(name, self._dtype),
                fill_value=0,
                compressors=codecs,
                dimension_names=("row",) + tuple(f"axis{i}" for i in range(1, len(shape))),
                config=WRITE_CONFIG,
                overwrite=True,
            )
        self._group.attrs.update(merged)
        _consolidate(self.path)
        self._group = zarr.open_group(str(self.path), mode=self.mode)
        self._arrays.clear()
        self.__dict__.pop("_decoders", None)  # decoders follow the arrays they were made from

    # ---- helpers -----------------------------------------------------------------------------------
    def _array(self, name: str) -> Any:
        if name not in self._arrays:
            self._arrays[name] = self._group[_array_path(name)].with_config(WRITE_CONFIG)
        return self._arrays[name]


class _ChunkDecoder:
    """Decodes one chunk file of an unsharded zarr v3 array with codecs ``bytes`` (little endian), at most one
    of ``zstd`` / ``blosc``, then optionally ``crc32c``: the checksum checked, the frame decoded (zstd checks
    its own frame checksum), the size checked. Equal to zarr's read of the chunk (tested)."""

    def __init__(
        self, compressor: Any, crc32c: bool, chunk_rows: int, row_shape: tuple, dtype: Any, fill: Any
    ) -> None:
        self.compressor, self.crc32c = compressor, crc32c
        self.blosc = type(compressor).__name__ == "Blosc"
        self.key_prefix, self.key_suffix = "", ""  # chunk file key: prefix + chunk index + suffix
        self.chunk_rows, self.row_shape, self.dtype = chunk_rows, row_shape, np.dtype(dtype)
        self.fill_value = fill
        self.nbytes = chunk_rows * int(np.prod(row_shape, dtype=np.int64)) * self.dtype.itemsize
        self.raw_crc = compressor is None and crc32c  # a file is the chunk's bytes, then their crc32c

    @classmethod
    def of(cls, arr: Any, chunk_rows: int) -> _ChunkDecoder | None:
        from numcodecs import Blosc, Zstd
        from zarr.codecs import BloscCodec, BytesCodec, Crc32cCodec, ZstdCodec
        from zarr.core.chunk_key_encodings import DefaultChunkKeyEncoding

        meta = arr.metadata
        enc = getattr(meta, "chunk_key_encoding", None)
        if arr.shards is not None or not isinstance(enc, DefaultChunkKeyEncoding) or enc.separator != "/":
            return None
        if tuple(arr.chunks) != (chunk_rows, *arr.shape[1:]):
            return None
        codecs = list(meta.codecs)
        if not codecs or type(codecs[0]) is not BytesCodec:
            return None
        dtype = np.dtype(arr.dtype)
        endian = getattr(codecs[0].endian, "value", codecs[0].endian)
        if dtype.itemsize > 1 and endian != "little":
            return None
        crc = bool(codecs) and type(codecs[-1]) is Crc32cCodec
        rest = codecs[1 : len(codecs) - crc]
        compressor: Any = None
        if len(rest) == 1 and type(rest[0]) is ZstdCodec:
            compressor = Zstd()
        elif len(rest) == 1 and type(rest[0]) is BloscCodec:
            compressor = Blosc()
        elif rest:
            return None
        return cls(compressor, crc, chunk_rows, tuple(arr.shape[1:]), dtype, arr.fill_value)

    def decode(self, data: bytes) -> np.ndarray:
        """The chunk's rows ``(chunk_rows, *row_shape)``, read-only. Raises ValueError / RuntimeError on
        damaged bytes."""
        rows = self.decode_into(data, np.empty((self.chunk_rows, *self.row_shape), self.dtype))
        rows.flags.writeable = False
        return rows

    def decode_into(self, data: Any, out: np.ndarray) -> np.ndarray:
        """Decode a chunk file's bytes ``data`` into ``out`` (C-contiguous, ``(chunk_rows, *row_shape)`` of
        the dtype) and return it: the crc32c checked first, then the decoded size (from the blosc header,
        or zstd's frame), then the codec writes straight into ``out``. Raises ValueError / RuntimeError on
        damaged bytes; ``out`` is then undefined."""
        import google_crc32c

        view = np.frombuffer(data, np.uint8)  # no copy (google_crc32c takes no memoryview)
        if self.crc32c:
            if len(view) < 4 or google_crc32c.value(view[:-4]) != int.from_bytes(
                view[-4:].tobytes(), "little"
            ):
                raise ValueError("stored and computed crc32c checksums do not match")
            view = view[:-4]
        if out.dtype != self.dtype or out.nbytes != self.nbytes or not out.flags.c_contiguous:
            raise ValueError(f"decode_into needs a C-contiguous {self.dtype} buffer of {self.nbytes} bytes")
        dest = out.reshape(-1).view(np.uint8)
        if self.compressor is None:
            if len(view) != self.nbytes:
                raise ValueError(f"chunk holds {len(view)} bytes, not {self.nbytes}")
            dest[:] = view
        elif self.blosc:
            from numcodecs import blosc

            # header: version, versionlz, flags, typesize, then nbytes, blocksize, cbytes (uint32 LE)
            if len(view) < 16:
                raise ValueError(f"blosc chunk of {len(view)} bytes is shorter than its header")
            head = view[:16].view("<u4")
            if int(head[1]) != self.nbytes or int(head[3]) != len(view):
                raise ValueError(
                    f"blosc header says {int(head[1])} bytes from {int(head[3])}, chunk is {self.nbytes} "
                    f"bytes from {len(view)}"
                )
            blosc.decompress(view, dest)
        else:
            raw = self.compressor.decode(view, out=dest)
            if len(memoryview(raw).cast("B")) != self.nbytes:
                raise ValueError(f"chunk decodes to {len(raw)} bytes, not {self.nbytes}")
        return out


_THREAD = threading.local()  # per-thread reused buffers (a read-ahead thread reads beside the main one)


def _scratch(key: str, nbytes: int, dec: _ChunkDecoder | None = None) -> Any:
    """This thread's reused buffer ``key`` of at least ``nbytes`` (a ``bytearray``, or with ``dec`` an array
    of one chunk of ``dec``'s shape and dtype)."""
    bufs = _THREAD.__dict__.setdefault("bufs", {})
    if dec is not None:
        arr = bufs.get((key, dec.row_shape, dec.dtype.str, dec.chunk_rows))
        if arr is None:
            arr = bufs[(key, dec.row_shape, dec.dtype.str, dec.chunk_rows)] = np.empty(
                (dec.chunk_rows, *dec.row_shape), dec.dtype
            )
        return arr
    buf = bufs.get(key)
    if buf is None or len(buf) < nbytes:
        buf = bufs[key] = bytearray(max(nbytes, 1 << 16))
    return buf


def _read_file(path: str | Path) -> memoryview:
    """A file's bytes in this thread's reused buffer (valid until the thread's next read): no allocation,
    so no page faults on a warm read. Raises FileNotFoundError / OSError."""
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        buf = memoryview(_scratch("file", size + 1))
        got = 0
        while True:  # to the end of the file, even if it grew since fstat (the size checks then refuse it)
            n = os.readv(fd, [buf[got:]])
            if n == 0:
                break
            got += n
            if got == len(buf):
                bigger = _scratch("file", 2 * len(buf))
                bigger[:got] = buf
                buf = memoryview(bigger)
        return buf[:got]
    finally:
        os.close(fd)


def _read_raw_into(path: str, out: np.ndarray, dec: _ChunkDecoder) -> bool:
    """Read an uncompressed crc32c chunk file straight into ``out`` and check it: ``True`` when the file
    is exactly the chunk's bytes plus their 4-byte crc32c and the checksum matches (``out`` then holds the
    chunk), ``False`` for anything else (``out`` is then undefined; the caller reads again and reports)."""
    import google_crc32c

    if out.dtype != dec.dtype or out.nbytes != dec.nbytes or not out.flags.c_contiguous:
        return False
    dest = out.reshape(-1).view(np.uint8)
    tail = _scratch("crc", 8)  # 4 bytes of crc32c, and room to see a longer file
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        views = [memoryview(dest), memoryview(tail)[:8]]
        got = 0
        while views:
            n = os.readv(fd, views)
            if n == 0:
                break
            got += n
            while views and n >= len(views[0]):
                n -= len(views.pop(0))
            if views and n:
                views[0] = views[0][n:]
    except OSError:
        return False
    finally:
        os.close(fd)
    if got != dec.nbytes + 4:
        return False
    return google_crc32c.value(dest) == int.from_bytes(tail[:4], "little")


def _inner_rows(chunk_rows: int, row_bytes: int, target_bytes: int = 1 << 18) -> int:
    """Rows per inner chunk of a sharded feature-set array: the largest divisor of ``chunk_rows`` whose chunk
    stays within ``target_bytes`` (at least 1), so training reads of single steps decode little."""
    best = 1
    for rows in range(1, chunk_rows + 1):
        if chunk_rows % rows == 0 and rows * row_bytes <= target_bytes:
            best = rows
    return best


def _write_index(group: Any, columns: Mapping[str, np.ndarray], checksums: bool) -> None:
    n = len(columns["video_id"])
    for name, kind in INDEX_COLUMNS.items():
        old = group.get(f"index/{name}")
        if old is not None:
            old = old.with_config(WRITE_CONFIG)
        if old is not None and tuple(old.shape) == (n,):
            # Rewrite in place: each chunk is replaced atomically, so a full disk or a kill while the index
            # is finalised leaves the old or the new column, never a deleted one.
            if n:
                old[:] = columns[name]
            continue
        arr = group.create_array(
            f"index/{name}",
            shape=(n,),
            chunks=(max(1, min(n, INDEX_CHUNK)),),
            dtype=str if kind == "str" else kind,
            compressors=_compressors("zstd", checksums),
            overwrite=True,
            dimension_names=("video",),
            config=WRITE_CONFIG,
        )
        if n:
            arr[:] = columns[name]
