"""``torch.distributed.checkpoint`` storage over a ckptstore store.

    import torch.distributed.checkpoint as dcp
    import ckptstore.dcp
    dcp.save(state, storage_writer=ckptstore.dcp.StoreWriter("ckpts", step=100))
    dcp.load(state, storage_reader=ckptstore.dcp.StoreReader("ckpts"))     # newest; or step=

How a save maps onto the store (docs/DECISIONS.md, "Multi-process checkpoints"): the
coordinator rank opens the store as its writer in ``prepare_global_plan`` (taking the lock
for the whole save) and reserves a disjoint range of segment ids per rank, handed out in the
plans' ``storage_data``. Each rank writes its tensors into new segment files of its range
(same format, chunking and BLAKE3 as any save; fdatasync'ed, directory fsync'ed) and returns
what it wrote in its ``WriteResult``s. The coordinator's ``finish`` commits everything, DCP's
``Metadata`` included, as ONE checkpoint through the ordinary commit record. A rank that fails
means ``finish`` is never called: nothing is committed, and what the ranks wrote is removed
when the writer is reset, closed or collected (or, if the process dies, by the next open's
recovery).

Into a bucket store (``StoreWriter("s3://bucket/prefix")``) no shared mount is needed: the
coordinator's store is the bucket store (a local cache, docs/PYTHON.md); each rank writes its
shard into a scratch directory of its own host's cache, uploads its segments as objects under
a random token of its own (two ranks never write one name) and reports the object names in
its ``WriteResult``; ``finish`` commits everything with ONE commit object, created if absent
(a writer that got there first fails the save with a ``StoreError`` naming the conflict,
nothing overwritten). A save that never commits leaves objects no commit names: readers
ignore them and a writer's open removes them after the orphan grace. Loading from a bucket
store, each rank reads the newest commit object into a view in its own cache and downloads
only the segments holding the items its plan reads.

Names in the store: a tensor item is stored under its fully qualified name (``fqn``) when it
is the whole tensor, else as ``fqn@o0,o1,..`` (its chunk's offsets); bytes items (pickled
objects DCP writes itself) as blobs ``dcp/bytes/<fqn>``; DCP's ``Metadata`` as the blob
``dcp/metadata``, encoded as JSON, not pickled (see ``_encode_metadata``).

Bytes items never run code on load (docs/DECISIONS.md, "No load path runs code"): DCP's
default planner would ``torch.load(..., weights_only=False)`` them, which runs whatever a pickle
says, and which keys are bytes is decided by the stored metadata. So ``StoreReader`` first
decodes each with ``torch.load(..., weights_only=True)`` (tensors, containers, numbers,
strings: what DCP saves for a plain state dict); a pickle that needs anything else is refused
with ``UnsafePickleError`` naming the key, unless the caller passed ``allow_pickle=True`` for a
store it trusts. What the planner receives is the decoded object saved again by ``torch.save``,
so its own unpickling only ever sees what ``weights_only`` accepted.

Reads serve each ``ReadItem`` from the stored tensor by its offsets and lengths: a view over
the segment's memory map (verified by BLAKE3 unless ``verify=False``), narrowed, then copied
once into the target DCP resolves — which is how DCP reshards (e.g. a 4-rank save loaded by
2 ranks).
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import re
import uuid
import warnings
from typing import Any, cast

import numpy as np

from . import _native, _tensors
from ._optional import require_torch

require_torch("ckptstore.dcp")  # a clear ImportError naming the extra
import torch  # noqa: E402

from torch.distributed.checkpoint.metadata import (  # noqa: E402
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import (  # noqa: E402
    LoadItemType,
    LoadPlan,
    LoadPlanner,
    SavePlan,
    SavePlanner,
    WriteItemType,
)
from torch.distributed.checkpoint.storage import (  # noqa: E402
    StorageReader,
    StorageWriter,
    WriteResult,
)
from torch.futures import Future  # noqa: E402

__all__ = ["StoreReader", "StoreWriter", "UnsafePickleError"]

METADATA_BLOB = "dcp/metadata"
BYTES_PREFIX = "dcp/bytes/"
METADATA_FORMAT = "ckptstore.dcp-metadata/1"
# Segment ids reserved per rank and save: a rank writes at most this many segment files (at
# the smallest segment size, 1 MiB, that is 1 TiB per rank). Unused ids are never reused.
IDS_PER_RANK = 1 << 20


class UnsafePickleError(ValueError):
    """A stored DCP bytes item is a pickle that ``torch.load(weights_only=True)`` refuses: it
    would import or call something beyond tensors and plain containers. Nothing of it ran."""


@dataclasses.dataclass(frozen=True)
class _RankTarget:
    """What the coordinator hands each rank in its plan's ``storage_data``."""

    path: str
    start: int
    end: int
    chunk_size: int
    segment_max_bytes: int


@dataclasses.dataclass(frozen=True)
class StoredItem:
    """Where one DCP item lives in the checkpoint (the ``storage_data`` of ``Metadata``)."""

    name: str
    blob: bool = False
    # A dtype the engine lacks (uint16/32/64, complex): stored as its bytes (u8); the torch
    # dtype name and the shape to reinterpret them.
    raw_dtype: str | None = None
    raw_shape: tuple[int, ...] | None = None


@dataclasses.dataclass(frozen=True)
class _RankResult(StoredItem):
    """A rank's first WriteResult also carries its shard fragment (engine bytes)."""

    fragment: bytes | None = None
    # Bucket stores: the (segment id, object key, length) of the segments the rank uploaded.
    uploaded: tuple[tuple[int, str, int], ...] | None = None


def _is_url(path: Any) -> bool:
    return isinstance(path, str) and path.startswith(("s3://", "file://"))


def _is_store(path: Any) -> bool:
    if _is_url(path):
        return True  # a bucket store (an empty one is a store with no checkpoint)
    try:
        p = os.fspath(path)
    except TypeError:
        return False
    return os.path.isfile(os.path.join(p, "CURRENT")) and os.path.isdir(
        os.path.join(p, "segments"))


def _tensor_name(index: MetadataIndex) -> str:
    off = list(index.offset) if index.offset is not None else []
    if not any(off):
        return index.fqn
    return f"{index.fqn}@{','.join(str(o) for o in off)}"


class StoreWriter(StorageWriter):
    """A DCP ``StorageWriter`` that commits each save as one checkpoint of the store in
    ``path`` (created if needed), at training step ``step`` (default: the newest step + 1, or
    0 in an empty store), with ``epoch`` and ``metadata`` (str -> int/float/str/bytes) as for
    ``ckptstore.save``. ``chunk_size``/``segment_max_bytes`` as for ``ckptstore.Store``.

    Picklable (``dcp.async_save`` may run the save in another process). While a save is
    running, the coordinator rank holds the store's writer lock; after a failed save it keeps
    it until the writer is reset (its next save), closed (``close()``) or collected.

    A rank resolves all its items, then writes them in one engine call with the GIL released:
    CPU tensors cross without a copy (non-contiguous ones are made contiguous); CUDA tensors
    are staged to host memory by torch, all of the rank's at once (DCP's ``async_save``
    stages them to CPU before the writer sees them anyway). Chunks are not deduplicated
    against earlier checkpoints (ranks do not see the store's index).
    """

    def __init__(self, path: str | os.PathLike, step: int | None = None, *, epoch: int = 0,
                 metadata: dict[str, Any] | None = None, chunk_size: int | None = None,
                 segment_max_bytes: int | None = None) -> None:
        super().__init__()
        self.path = os.fspath(path)
        self.step = step
        self.epoch = epoch
        self.metadata = dict(metadata or {})
        self._opts = {k: v for k, v in (("chunk_size", chunk_size),
                                        ("segment_max_bytes", segment_max_bytes))
                      if v is not None}
        self._coord: Any = None
        self._step_now: int | None = None
        self._is_coordinator = False
        self._rank = 0
        self.save_id = str(uuid.uuid4())
        self.last_commit: int | None = None

    # -- lifecycle -------------------------------------------------------------------------
    def reset(self, checkpoint_id: str | os.PathLike | None = None) -> None:
        self.close()
        if checkpoint_id is not None:
            self.path = os.fspath(checkpoint_id)
        self.save_id = str(uuid.uuid4())

    def close(self) -> None:
        """Ends an unfinished save: removes what the ranks wrote (nothing was committed) and
        releases the store's writer lock. Called by ``reset``; safe to call any time."""
        coord, self._coord = self._coord, None
        if coord is not None:
            coord.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # pragma: no cover - interpreter shutdown
            pass

    def __getstate__(self) -> dict[str, Any]:
        d = self.__dict__.copy()
        d["_coord"] = None  # an open store does not cross processes
        return d

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike) -> bool:
        """True for the path of an existing ckptstore store."""
        return _is_store(checkpoint_id)

    def storage_meta(self) -> StorageMeta | None:
        return StorageMeta(checkpoint_id=self.path, save_id=self.save_id)

    # -- planning --------------------------------------------------------------------------
    def set_up_storage_writer(self, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        self._is_coordinator = is_coordinator
        self._rank = int(kwargs.get("rank", 0) or 0)
        if is_coordinator:
            self.close()  # a previous save of this writer that failed

    def prepare_local_plan(self, plan: SavePlan) -> SavePlan:
        return plan

    def prepare_global_plan(self, plans: list[SavePlan]) -> list[SavePlan]:
        self.close()
        coord = _native.DcpCoordinator(self.path, **self._opts)
        self._coord = coord
        latest = coord.latest_step()
        self._step_now = self.step if self.step is not None else (
            0 if latest is None else latest + 1)
        chunk_size, segment_max = coord.options()
        ranges = coord.reserve(len(plans), IDS_PER_RANK)
        return [dataclasses.replace(p, storage_data=_RankTarget(
                    self.path, start, end, chunk_size, segment_max))
                for p, (start, end) in zip(plans, ranges)]

    # -- writing ---------------------------------------------------------------------------
    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future[list[WriteResult]]:
        target = plan.storage_data
        if not isinstance(target, _RankTarget):
            raise RuntimeError("StoreWriter.write_data: the plan carries no segment id range "
                               "(prepare_global_plan of a StoreWriter did not run)")
        tensors: list[tuple[str, str, list[int], Any]] = []
        blobs: list[tuple[str, bytes]] = []
        placed: list[tuple[Any, StoredItem, int]] = []
        for item in plan.items:
            data = planner.resolve_data(item)
            if item.type == WriteItemType.BYTE_IO:
                name = BYTES_PREFIX + item.index.fqn
                raw = data.getvalue() if isinstance(data, io.BytesIO) else bytes(data)
                blobs.append((name, raw))
                placed.append((item.index, StoredItem(name, blob=True), len(raw)))
            else:
                name = _tensor_name(item.index)
                tensor = cast(torch.Tensor, data)
                dt, shape, src, raw_info = _tensors.to_source(name, tensor)
                tensors.append((name, dt, shape, src))
                nbytes = tensor.numel() * tensor.element_size()
                where = StoredItem(name) if raw_info is None else StoredItem(
                    name, raw_dtype=str(tensor.dtype).removeprefix("torch."),
                    raw_shape=tuple(tensor.shape))
                placed.append((item.index, where, nbytes))
        fut: Future[list[WriteResult]] = Future()
        if not placed:
            fut.set_result([])
            return fut
        uploaded: tuple[tuple[int, str, int], ...] | None = None
        if _is_url(target.path):
            fragment, objs = _native.write_shard_remote(
                target.path, target.start, target.end, target.chunk_size,
                target.segment_max_bytes, tensors, blobs)
            uploaded = tuple((int(i), str(k), int(n)) for i, k, n in objs)
        else:
            fragment = _native.write_shard(target.path, target.start, target.end,
                                           target.chunk_size, target.segment_max_bytes,
                                           tensors, blobs)
        results = []
        for k, (index, where, nbytes) in enumerate(placed):
            sd = dataclasses.replace(_RankResult(**vars(where)), fragment=fragment,
                                     uploaded=uploaded) if k == 0 else where
            results.append(WriteResult(index=index, size_in_bytes=nbytes, storage_data=sd))
        fut.set_result(results)
        return fut

    def finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        coord = self._coord
        if coord is None:
            raise RuntimeError("StoreWriter.finish on a writer that did not plan this save")
        fragments = []
        uploaded: list[tuple[int, str, int]] = []
        storage_md: dict[MetadataIndex, StoredItem] = {}
        for wrs in results:
            for wr in wrs:
                sd = wr.storage_data
                if isinstance(sd, _RankResult) and sd.fragment is not None:
                    fragments.append(sd.fragment)
                    uploaded.extend(sd.uploaded or ())
                storage_md[wr.index] = StoredItem(sd.name, sd.blob, sd.raw_dtype, sd.raw_shape)
        metadata.storage_data = storage_md
        encoded = _encode_metadata(metadata)
        meta = dict(self.metadata)
        meta["dcp.format"] = METADATA_FORMAT
        try:
            self.last_commit = coord.commit(self._step_now, fragments,
                                            [(METADATA_BLOB, encoded)], epoch=self.epoch,
                                            metadata=meta, uploaded=uploaded)
        finally:
            self.close()


class StoreReader(StorageReader):
    """A DCP ``StorageReader`` over the store in ``path``: the checkpoint at ``step`` (or
    ``id``), by default the newest one. Opens the store read-only (no lock; it may be read
    while a writer works). Chunks are verified by BLAKE3 unless ``verify=False``. Picklable.

    Give ``step`` when saves may commit while ranks load: every rank picks its checkpoint when
    it reads the metadata, and a rank that picked another one than the coordinator raises.

    Bytes items (non-tensor values DCP pickled) are decoded with ``weights_only=True``; one
    that needs more raises ``UnsafePickleError``. ``allow_pickle=True`` hands them to the
    planner as stored, whose ``torch.load(weights_only=False)`` runs any code the pickle holds:
    only for a store whose every writer you trust.
    """

    def __init__(self, path: str | os.PathLike, step: int | None = None, *,
                 id: int | None = None, verify: bool = True,
                 allow_pickle: bool = False) -> None:
        super().__init__()
        self.path = os.fspath(path)
        self.step = step
        self.id = id
        self.verify = verify
        self.allow_pickle = allow_pickle
        self.load_id = str(uuid.uuid4())
        self._store: Any = None
        self._view: Any = None  # a bucket store: this rank's partial view (DcpRemoteView)
        self._ck_id: int | None = None
        self.storage_data: dict[MetadataIndex, StoredItem] = {}

    def __getstate__(self) -> dict[str, Any]:
        d = self.__dict__.copy()
        d["_store"] = None
        d["_view"] = None
        return d

    def reset(self, checkpoint_id: str | os.PathLike | None = None) -> None:
        self._close()
        if checkpoint_id is not None:
            self.path = os.fspath(checkpoint_id)
        self.load_id = str(uuid.uuid4())

    def _close(self) -> None:
        s, self._store = self._store, None
        if s is not None:
            s.close()
        v, self._view = self._view, None
        if v is not None:
            v.close()

    def _fetch(self, ck_id: int | None, names: list[str]) -> None:
        """A bucket store: downloads the segments of ``names`` into this rank's view, then
        opens the view again (an open sees the segments that are there)."""
        if self._view is None or ck_id is None:
            raise RuntimeError("StoreReader: read_metadata did not run on this rank")
        self._view.fetch(ck_id, sorted(set(names)))
        s, self._store = self._store, None
        if s is not None:
            s.close()

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike) -> bool:
        return _is_store(checkpoint_id)

    def _open(self) -> Any:
        if self._store is None:
            from ._store import Store
            if _is_url(self.path):
                if self._view is None:
                    self._view = _native.DcpRemoteView(self.path)
                self._store = Store(self._view.dir, read_only=True)
                return self._store
            if not _is_store(self.path):
                raise FileNotFoundError(f"{self.path} is not a ckptstore store")
            self._store = Store(self.path, read_only=True)
        return self._store

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        if _is_url(self.path):
            self._close()  # a fresh view of the newest commit object
        s = self._open()
        info = s.info(self.step, id=self.id)  # NotFoundError names what is missing
        if _is_url(self.path):
            self._fetch(info["id"], [METADATA_BLOB])
            s = self._open()
        ck = s.open(id=info["id"], framework="numpy", verify=self.verify)
        if METADATA_BLOB not in ck.blob_names():
            raise ValueError(f"checkpoint {info['id']} (step {info['step']}) in {self.path} "
                             f"was not written by torch.distributed.checkpoint (no "
                             f"{METADATA_BLOB!r}); load it with ckptstore.load")
        self._ck_id = info["id"]
        md = _decode_metadata(ck.get_blob(METADATA_BLOB))
        if md.storage_meta is None:
            md.storage_meta = StorageMeta()
        md.storage_meta.load_id = self.load_id
        return md

    def set_up_storage_reader(self, metadata: Metadata, is_coordinator: bool, *args: Any,
                              **kwargs: Any) -> None:
        self.storage_data = metadata.storage_data

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        return plan

    def prepare_global_plan(self, plans: list[LoadPlan]) -> list[LoadPlan]:
        return [dataclasses.replace(p, storage_data=self._ck_id) for p in plans]

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        want = plan.storage_data
        if want is not None and self._ck_id is not None and want != self._ck_id:
            raise RuntimeError(
                f"this rank read checkpoint {self._ck_id}, the coordinator {want}: a save "
                f"committed in between; pass step= to StoreReader")
        ck_id = self._ck_id if want is None else want
        if _is_url(self.path):
            self._fetch(ck_id, [self.storage_data[r.storage_index].name for r in plan.items])
        s = self._open()
        ck = s.open(id=ck_id, framework="numpy", verify=self.verify)
        stored: dict[str, tuple[np.ndarray, str]] = {}
        for req in plan.items:
            where = self.storage_data[req.storage_index]
            if req.type == LoadItemType.BYTE_IO:
                raw = ck.get_blob(where.name)
                planner.load_bytes(req, io.BytesIO(raw) if self.allow_pickle
                                   else _weights_only(req.storage_index.fqn, raw))
                continue
            if where.name not in stored:
                mb = s._native.tensor(ck.id, where.name, verify=self.verify)
                arr = _tensors.storage_array(mb)
                if where.raw_dtype is not None and where.raw_shape is not None:
                    arr = _raw_view(arr, where.raw_dtype, where.raw_shape)
                stored[where.name] = (arr, mb.dtype if where.raw_dtype is None else "")
            arr, dtype = stored[where.name]
            # The leading Ellipsis keeps a 0-d tensor an array (arr[()] would be a scalar).
            index: tuple[Any, ...] = (Ellipsis, *(
                slice(o, o + n) for o, n in zip(req.storage_offsets, req.lengths)))
            part = arr[index]
            target = planner.resolve_tensor(req).detach()
            if tuple(target.shape) != part.shape:
                raise ValueError(f"{req.storage_index.fqn}: DCP asks for {tuple(target.shape)} "
                                 f"elements, the stored range holds {part.shape}")
            _copy_into(target, part, dtype)
            planner.commit_tensor(req, target)
        fut: Future[None] = Future()
        fut.set_result(None)
        return fut


def _weights_only(fqn: str, raw: bytes) -> io.BytesIO:
    """A stored bytes item, decoded without running code (``weights_only=True``) and saved
    again, for the planner's own ``torch.load``; ``UnsafePickleError`` if it cannot be."""
    try:
        obj = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    except Exception as e:  # UnpicklingError, or a corrupt/foreign byte string
        # torch's message spans lines (with terminal escapes): its first sentence is enough.
        why = re.sub(r"\x1b\[[0-9;]*m", "", str(e)).split(". ")[0].splitlines()[0] \
            if str(e) else ""
        raise UnsafePickleError(
            f"DCP bytes item {fqn!r}: refused to unpickle it, it needs more than tensors and "
            f"plain containers ({type(e).__name__}: {why}); nothing of it ran. Pass "
            f"StoreReader(..., allow_pickle=True) only if you trust every writer of this "
            f"store") from None
    out = io.BytesIO()
    torch.save(obj, out)
    out.seek(0)
    return out


def _raw_view(u8: np.ndarray, torch_dtype: str, shape: tuple[int, ...]) -> Any:
    """Stored bytes of a dtype the engine lacks, as a (read-only) torch tensor of it."""
    dtype = _tensors.torch_attr("dtype", torch_dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # read-only array; only read from
        t = torch.from_numpy(u8)
    return t.view(dtype).reshape(shape)


def _copy_into(target: Any, part: Any, dtype: str) -> None:
    """Copies stored elements (a possibly strided view of the read-only map) into ``target``,
    converting to its dtype the way DCP's own reader does (``copy_``)."""
    if isinstance(part, torch.Tensor):  # a raw-stored dtype, already viewed (see _raw_view)
        with torch.no_grad():
            target.copy_(part)
        return
    if part.size == 0:
        return
    # (not np.ascontiguousarray: it turns a 0-d array into a 1-d one)
    src_np = part if part.flags.c_contiguous else part.copy(order="C")
    with warnings.catch_warnings():
        # torch warns that the array is read-only; the tensor over it is only read from.
        warnings.simplefilter("ignore", UserWarning)
        src = torch.from_numpy(src_np)
    src = src.view(getattr(torch, _tensors._ENGINE_TO_TORCH[dtype]))
    with torch.no_grad():
        target.copy_(src)


# -- DCP's Metadata without pickle ---------------------------------------------------------
# Loading a checkpoint must not run code, so the Metadata object is stored as JSON. Supported:
# what DCP's default planners put there (tensor and bytes entries, the default planner's
# planner_data: a dict of key paths, StorageMeta). A custom planner whose planner_data is
# something else gets a TypeError naming it, before anything is committed.

def _is_key_path(v: Any) -> bool:
    return isinstance(v, (tuple, list)) and all(
        isinstance(p, (str, int)) and not isinstance(p, bool) for p in v)


def _encode_planner_data(pd: Any) -> Any:
    if pd is None:
        return None
    if isinstance(pd, dict) and all(isinstance(k, str) and _is_key_path(v)
                                    for k, v in pd.items()):
        return {"paths": [[k, list(v)] for k, v in pd.items()]}
    raise TypeError(f"ckptstore.dcp stores DCP metadata without pickle and cannot encode the "
                    f"planner's planner_data ({type(pd).__name__}); the default planners' "
                    f"(a dict of key paths of str/int) is supported")


def _encode_metadata(md: Metadata) -> bytes:
    sdm: dict[str, Any] = {}
    for fqn, m in md.state_dict_metadata.items():
        if isinstance(m, BytesStorageMetadata):
            sdm[fqn] = {"bytes": True}
            continue
        p = m.properties
        strides = getattr(p, "strides", None)
        sdm[fqn] = {
            "dtype": str(p.dtype).removeprefix("torch."),
            "layout": str(p.layout).removeprefix("torch."),
            "requires_grad": bool(p.requires_grad),
            "memory_format": str(p.memory_format).removeprefix("torch."),
            "pin_memory": bool(p.pin_memory),
            "strides": None if strides is None else list(strides),
            "size": list(m.size),
            "chunks": [[list(c.offsets), list(c.sizes)] for c in m.chunks],
        }
    sm = md.storage_meta
    doc = {
        "format": METADATA_FORMAT,
        "version": md.version,
        "state_dict_metadata": sdm,
        "planner_data": _encode_planner_data(md.planner_data),
        "storage_data": [
            [i.fqn, None if i.offset is None else list(i.offset), i.index, s.name, s.blob,
             s.raw_dtype, None if s.raw_shape is None else list(s.raw_shape)]
            for i, s in (md.storage_data or {}).items()],
        "storage_meta": None if sm is None else {
            "checkpoint_id": None if sm.checkpoint_id is None else os.fspath(sm.checkpoint_id),
            "save_id": sm.save_id, "load_id": sm.load_id, "modules": list(sm.modules)},
    }
    return json.dumps(doc, separators=(",", ":")).encode()


def _decode_metadata(raw: bytes) -> Metadata:
    doc = json.loads(raw)
    if doc.get("format") != METADATA_FORMAT:
        raise ValueError(f"DCP metadata of format {doc.get('format')!r}; this build reads "
                         f"{METADATA_FORMAT!r}")
    sdm: dict[str, Any] = {}
    for fqn, m in doc["state_dict_metadata"].items():
        if m.get("bytes"):
            sdm[fqn] = BytesStorageMetadata()
            continue
        props = TensorProperties(
            dtype=_tensors.torch_attr("dtype", m["dtype"]),
            layout=_tensors.torch_attr("layout", m["layout"]),
            requires_grad=m["requires_grad"],
            memory_format=_tensors.torch_attr("memory_format", m["memory_format"]),
            pin_memory=m["pin_memory"])
        if m.get("strides") is not None and hasattr(props, "strides"):
            props.strides = tuple(m["strides"])
        sdm[fqn] = TensorStorageMetadata(
            properties=props, size=torch.Size(m["size"]),
            chunks=[ChunkStorageMetadata(offsets=torch.Size(o), sizes=torch.Size(s))
                    for o, s in m["chunks"]])
    pd = doc["planner_data"]
    planner_data = None if pd is None else {k: tuple(v) for k, v in pd["paths"]}
    storage_data = {
        MetadataIndex(fqn, None if off is None else torch.Size(off), index):
            StoredItem(name, blob, raw, None if shape is None else tuple(shape))
        for fqn, off, index, name, blob, raw, shape in doc["storage_data"]}
    sm = doc["storage_meta"]
    storage_meta = None if sm is None else StorageMeta(
        checkpoint_id=sm["checkpoint_id"], save_id=sm["save_id"], load_id=sm["load_id"],
        modules=list(sm["modules"]))
    return Metadata(state_dict_metadata=sdm, planner_data=planner_data,
                    storage_data=storage_data, storage_meta=storage_meta,
                    version=doc["version"])
