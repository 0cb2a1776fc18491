"""Stages a model file for a machine that is reached only by copying the working tree, in calls
that each carry a limited number of bytes (the lent GPU: 64 MiB a call, the repository's
tracked files included; docs/gpu-runbook.md).

The file is compressed (gzip, reproducibly) and cut into parts small enough to travel one per
call; a manifest records the size and SHA-256 of every part, of the compressed stream and of the
file. On the far side the parts are collected into a folder that outlives the call, checked, and
joined back into the byte-exact file, which is checked again.

    python scripts/stage_model.py prepare               # the default target's GGUF -> .stage/ (here)
    python scripts/stage_model.py budget --carry .stage/common .stage/parts/part-1
    python scripts/stage_model.py install --stage .stage --stash build/stage   # there, every call
    python scripts/stage_model.py split FILE DIR [--parts N | --max-part-bytes N]
    python scripts/stage_model.py join DIR OUT_FILE
    python scripts/stage_model.py collect SRC_DIR STASH_DIR
    python scripts/stage_model.py status STASH_DIR

``prepare`` needs jakiro (it finds the GGUF, the prompt sets and the ``gguf`` package of this
environment); everything else is standard library only. Exit status: 0 done, 1 an error (a
damaged or missing file, named in one line), 3 (``install``/``status``) parts still missing.
"""
from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

FORMAT = "jakiro-stage"
VERSION = 1
MANIFEST = "manifest.json"
LIMIT = 64 * 1024 * 1024          # bytes one device call carries: the working tree plus carried paths
RESERVE = 1024 * 1024             # kept free of parts, for files added to the tree after prepare
BLOCK = 1 << 22
INCOMPLETE = 3
REPO = Path(__file__).resolve().parents[1]


class StageError(Exception):
    """A damaged, missing or inconsistent file; the message names it and what to do."""


def _digest(path: Path) -> tuple[int, str]:
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(BLOCK), b""):
            digest.update(block)
            size += len(block)
    return size, digest.hexdigest()


def _mb(size: int) -> str:
    return f"{size / 1e6:.1f} MB"


# ----------------------------------------------------------------------------------- split
def split(source: Path, out_dir: Path, *, parts: int | None = None, max_part_bytes: int | None = None,
          compress: str = "gzip", install: dict | None = None) -> dict:
    """Writes ``out_dir/part-1..N`` and ``out_dir/manifest.json`` for ``source``; returns the manifest.

    The stream (``source`` gzipped, or as is with ``compress="none"``) is cut into ``parts``
    parts of equal size, or into as few as keep each part within ``max_part_bytes``.
    """
    if (parts is None) == (max_part_bytes is None):
        raise ValueError("split: give parts or max_part_bytes")
    if compress not in ("gzip", "none"):
        raise ValueError(f"split: compress must be gzip or none, got {compress!r}")
    source = Path(source)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in out_dir.glob("part-*"):
        old.unlink()
    (out_dir / MANIFEST).unlink(missing_ok=True)
    size, sha = _digest(source)
    with tempfile.NamedTemporaryFile(dir=out_dir, prefix=".stream.", delete=False) as tmp:
        stream_path = Path(tmp.name)
    try:
        if compress == "gzip":
            # mtime=0 and no file name in the header: the same file gives the same stream. Level 3
            # was the smallest of 1, 3, 6 and 9 for the Q4 GGUF (quantized weights barely compress).
            with open(source, "rb") as src, open(stream_path, "wb") as raw, \
                    gzip.GzipFile(filename="", mode="wb", compresslevel=3, fileobj=raw, mtime=0) as dst:
                shutil.copyfileobj(src, dst, BLOCK)
        else:
            shutil.copyfile(source, stream_path)
        stream_size, stream_sha = _digest(stream_path)
        if parts is None:
            if max_part_bytes < 1:
                raise ValueError(f"split: max_part_bytes must be >= 1, got {max_part_bytes}")
            parts = max(1, math.ceil(stream_size / max_part_bytes))
        if parts < 1:
            raise ValueError(f"split: parts must be >= 1, got {parts}")
        chunk = max(1, math.ceil(stream_size / parts))
        entries = []
        with open(stream_path, "rb") as stream:
            for number in range(1, parts + 1):
                name = f"part-{number}"
                digest, written = hashlib.sha256(), 0
                with open(out_dir / name, "wb") as part:
                    while written < chunk:
                        block = stream.read(min(BLOCK, chunk - written))
                        if not block:
                            break
                        part.write(block)
                        digest.update(block)
                        written += len(block)
                entries.append({"file": name, "size": written, "sha256": digest.hexdigest()})
    finally:
        stream_path.unlink(missing_ok=True)
    manifest = {"format": FORMAT, "version": VERSION, "name": source.name, "size": size, "sha256": sha,
                "compress": compress, "stream_size": stream_size, "stream_sha256": stream_sha, "parts": entries}
    if install:
        manifest["install"] = install
    (out_dir / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


# ------------------------------------------------------------------------------ manifests
def read_manifest(folder: Path) -> dict:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise StageError(f"stage: {path} is missing (run `scripts/stage_model.py prepare` here, and carry the "
                         f"folder that holds it)")
    try:
        manifest = json.loads(path.read_text())
        if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
            raise ValueError(f"format {manifest.get('format')!r} version {manifest.get('version')!r}")
        for key in ("name", "size", "sha256", "compress", "stream_size", "stream_sha256", "parts"):
            if key not in manifest:
                raise ValueError(f"no {key!r}")
    except (OSError, ValueError, AttributeError) as error:
        raise StageError(f"stage: {path} is not a {FORMAT} manifest ({error})") from None
    return manifest


def check_part(folder: Path, entry: dict, count: int) -> Path:
    """The part's path after checking its size and SHA-256; StageError when it is missing or damaged."""
    path = Path(folder) / entry["file"]
    number = entry["file"].rsplit("-", 1)[-1]
    if not path.is_file():
        raise StageError(f"stage: {entry['file']} (part {number} of {count}) is missing from {folder}")
    size, sha = _digest(path)
    if size != entry["size"] or sha != entry["sha256"]:
        raise StageError(f"stage: {path} (part {number} of {count}) is damaged: {size} bytes with sha256 {sha}, "
                         f"expected {entry['size']} bytes with sha256 {entry['sha256']}; carry it again")
    return path


def missing_parts(folder: Path, manifest: dict) -> list[str]:
    return [e["file"] for e in manifest["parts"] if not (Path(folder) / e["file"]).is_file()]


# ------------------------------------------------------------------------------------ join
def join(folder: Path, out: Path, manifest: dict | None = None) -> Path:
    """Checks every part in ``folder``, joins them (decompressing) into ``out`` and checks the
    result against the manifest; the bytes go to ``out.partial`` first, renamed only once they
    check out."""
    folder, out = Path(folder), Path(out)
    manifest = manifest or read_manifest(folder)
    count = len(manifest["parts"])
    missing = missing_parts(folder, manifest)
    if missing:
        raise StageError(f"stage: {len(missing)} of {count} parts missing from {folder}: {', '.join(missing)}")
    paths = [check_part(folder, entry, count) for entry in manifest["parts"]]
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")
    stream_digest, digest, size = hashlib.sha256(), hashlib.sha256(), 0

    class _Joined:
        """The parts as one readable stream, hashed as it is read."""

        def __init__(self):
            self.files = iter(paths)
            self.current = None

        def read(self, n=-1):
            while True:
                if self.current is None:
                    path = next(self.files, None)
                    if path is None:
                        return b""
                    self.current = open(path, "rb")
                block = self.current.read(n if n and n > 0 else BLOCK)
                if block:
                    stream_digest.update(block)
                    return block
                self.current.close()
                self.current = None

    try:
        joined = _Joined()
        reader = gzip.GzipFile(fileobj=joined, mode="rb") if manifest["compress"] == "gzip" else joined
        with open(partial, "wb") as dst:
            try:
                for block in iter(lambda: reader.read(BLOCK), b""):
                    digest.update(block)
                    dst.write(block)
                    size += len(block)
            except (OSError, EOFError) as error:     # a broken gzip stream
                raise StageError(f"stage: the parts in {folder} do not form a valid {manifest['compress']} "
                                 f"stream ({error})") from None
        if stream_digest.hexdigest() != manifest["stream_sha256"]:
            raise StageError(f"stage: the joined parts in {folder} have sha256 {stream_digest.hexdigest()}, "
                             f"expected {manifest['stream_sha256']}")
        if size != manifest["size"] or digest.hexdigest() != manifest["sha256"]:
            raise StageError(f"stage: {out} joined from {folder} has {size} bytes with sha256 {digest.hexdigest()}, "
                             f"expected {manifest['size']} bytes with sha256 {manifest['sha256']}")
        os.replace(partial, out)
    finally:
        partial.unlink(missing_ok=True)
    return out


# ------------------------------------------------------------------------ collect / status
def collect(source: Path, stash: Path, only: set[int] | None = None) -> tuple[dict, list[str], list[str]]:
    """Copies the manifest and every part present in ``source`` that checks out into ``stash``
    (a folder that outlives the call); ``only``: part numbers to take (a rehearsal of a call that
    carries those). Returns ``(manifest, parts taken now, parts still missing from the stash)``.
    A damaged part is a StageError (nothing of it is kept)."""
    source, stash = Path(source), Path(stash)
    manifest = read_manifest(source)
    stash.mkdir(parents=True, exist_ok=True)
    if (stash / MANIFEST).is_file():
        known = read_manifest(stash)
        if known["stream_sha256"] != manifest["stream_sha256"]:
            # Parts of another staging: start over.
            for entry in known["parts"]:
                (stash / entry["file"]).unlink(missing_ok=True)
    shutil.copyfile(source / MANIFEST, stash / MANIFEST)
    count, taken = len(manifest["parts"]), []
    for number, entry in enumerate(manifest["parts"], 1):
        if only is not None and number not in only:
            continue
        if not (source / entry["file"]).is_file():
            continue
        path = check_part(source, entry, count)
        target = stash / entry["file"]
        if target.is_file() and _digest(target) == (entry["size"], entry["sha256"]):
            continue
        shutil.copyfile(path, target.with_name(target.name + ".partial"))
        os.replace(target.with_name(target.name + ".partial"), target)
        taken.append(entry["file"])
    return manifest, taken, missing_parts(stash, manifest)


def _copy_tree(source: Path, target: Path):
    for path in sorted(source.rglob("*")):
        if "__pycache__" in path.parts or path.is_dir():
            continue
        destination = target / path.relative_to(source)
        destination.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, destination)


def install(stage: Path, stash: Path, only: set[int] | None = None) -> Path | None:
    """Collects ``stage/parts`` into ``stash``; once every part is there, joins the file into
    ``stash/site/<module>/<path>`` (the manifest's ``install``; skipped when a checked copy is
    already there) and copies ``stage/common/site`` beside it. Returns the site folder (for
    PYTHONPATH), or None while parts are missing."""
    stage, stash = Path(stage), Path(stash)
    manifest, taken, missing = collect(stage / "parts", stash / "parts", only)
    count = len(manifest["parts"])
    print(f"stage: {manifest['name']}: {count - len(missing)} of {count} parts in {stash / 'parts'}"
          f"{' (this call brought ' + ', '.join(taken) + ')' if taken else ''}")
    if missing:
        print(f"stage: still missing {', '.join(missing)}: carry "
              f"{' '.join(str(stage / 'parts' / m) for m in missing)} in the next call")
        return None
    site = stash / "site"
    place = manifest.get("install") or {"module": "", "path": manifest["name"]}
    out = site / place["module"] / place["path"]
    if out.is_file() and _digest(out) == (manifest["size"], manifest["sha256"]):
        print(f"stage: {out} already joined and checked")
    else:
        join(stash / "parts", out, manifest)
        print(f"stage: joined {out} ({_mb(manifest['size'])}, sha256 {manifest['sha256'][:12]}... checked)")
    common = stage / "common" / "site"
    if common.is_dir():
        _copy_tree(common, site)
    return site


# ----------------------------------------------------------------------------------- budget
def _git_files(repo: Path) -> list[Path]:
    out = subprocess.run(["git", "-C", str(repo), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                         check=True, capture_output=True).stdout
    return [repo / name for name in out.decode().split("\0") if name]


def _size(path: Path) -> int:
    if path.is_symlink() or path.is_file():
        return path.lstat().st_size
    if path.is_dir():
        return sum(_size(child) for child in path.iterdir())
    return 0


def tree_bytes(repo: Path = REPO) -> tuple[int, dict[str, int]]:
    """Bytes of what every call carries (tracked and untracked-not-ignored files, and shared/),
    and the untracked-not-ignored ones grouped by their top folder."""
    tracked = set(subprocess.run(["git", "-C", str(repo), "ls-files", "-z"], check=True,
                                 capture_output=True).stdout.decode().split("\0"))
    total, untracked = 0, {}
    for path in _git_files(repo):
        if not (path.is_file() or path.is_symlink()):
            continue      # deleted in the tree, still in the index
        size = path.lstat().st_size
        total += size
        relative = path.relative_to(repo).as_posix()
        if relative not in tracked:
            top = relative.split("/", 1)[0]
            untracked[top] = untracked.get(top, 0) + size
    shared = repo / "shared"
    if shared.is_dir():
        total += _size(shared)
    return total, untracked


def _is_ignored(repo: Path, relative: str) -> bool:
    return subprocess.run(["git", "-C", str(repo), "check-ignore", "-q", relative]).returncode == 0


def ensure_ignored(repo: Path, relative: str):
    """Adds ``/relative/`` to the repository's local exclude file unless git already ignores it."""
    if _is_ignored(repo, relative):
        return
    exclude = Path(subprocess.run(["git", "-C", str(repo), "rev-parse", "--git-path", "info/exclude"], check=True,
                                  capture_output=True, text=True).stdout.strip())
    exclude = exclude if exclude.is_absolute() else repo / exclude
    exclude.parent.mkdir(parents=True, exist_ok=True)
    with open(exclude, "a") as f:
        f.write(f"/{relative}/\n")
    print(f"stage: added /{relative}/ to {exclude} (so it travels only when carried)")


def budget(carry: list[str], repo: Path = REPO, limit: int = LIMIT, quiet: bool = False) -> int:
    """Prints what one call with ``carry`` would send and returns the bytes left (negative: over)."""
    tree, untracked = tree_bytes(repo)
    carried = 0
    for relative in carry:
        path = repo / relative
        if not path.exists():
            raise StageError(f"stage: carry path {relative} does not exist here (run prepare first)")
        if not _is_ignored(repo, relative):
            raise StageError(f"stage: carry path {relative} is not ignored by git, so it travels in every call "
                             f"anyway; ignore it (scripts/stage_model.py prepare does for .stage)")
        carried += _size(path)
    left = limit - tree - carried
    if not quiet:
        print(f"budget: working tree {_mb(tree)} + carried {_mb(carried)} = {_mb(tree + carried)} of "
              f"{_mb(limit)} ({_mb(abs(left))} {'left' if left >= 0 else 'OVER'})")
        for top, size in sorted(untracked.items(), key=lambda item: -item[1]):
            if size >= 100_000:
                print(f"budget: untracked, not ignored, travels in every call: {top} ({_mb(size)})"
                      f"{'  <- ignore it (.git/info/exclude) or remove it' if size >= 1_000_000 else ''}")
    return left


# ---------------------------------------------------------------------------------- prepare
def prepare(stage: Path, target: str = "smollm2", gguf: Path | None = None, reserve: int = RESERVE,
            parts: int | None = None, compress: str = "gzip", repo: Path = REPO) -> dict:
    """Fills ``stage`` (``common/``: the manifest, the ``gguf`` package and the prompt sets; ``parts/``:
    the named target's GGUF, split to fit one part per call beside the working tree)."""
    sys.path.insert(0, str(repo))
    from jakiro.pretrained import TARGETS, gguf_parts, package_dir
    stage = Path(stage)
    relative = stage.resolve().relative_to(repo.resolve()).as_posix()
    ensure_ignored(repo, relative)
    entry = TARGETS[target]
    if len(entry.parts) != 1:
        raise StageError(f"stage: target {target} comes in {len(entry.parts)} GGUF parts inside its packages; "
                         f"only single-file targets are staged")
    module, path = entry.parts[0]          # where jakiro.pretrained looks for the GGUF
    gguf = gguf_parts(target)[0] if gguf is None else gguf
    shutil.rmtree(stage / "common", ignore_errors=True)
    site = stage / "common" / "site"
    # The prompt sets bench-e2e reads, at their places inside their packages (which are not imported).
    try:
        from jakiro.commands.prompts import SOURCES
    except ImportError:
        SOURCES = {}
    for name in ("mtbench", "humaneval"):
        if name not in SOURCES:
            print(f"stage: no prompt set {name} known to jakiro.commands.prompts; not staged")
            continue
        data_module, data_path, _ = SOURCES[name]
        folder = package_dir(data_module)
        if folder is None or not (folder / data_path).is_file():
            raise StageError(f"stage: the {name} prompts are not installed here ({data_module}/{data_path})")
        (site / data_module / data_path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(folder / data_path, site / data_module / data_path)
    # The gguf reader transformers needs to load a GGUF (pure Python; not in the GPU image).
    # With its dist-info: transformers checks the package's version through importlib.metadata.
    import importlib.metadata

    import gguf as gguf_package
    _copy_tree(Path(gguf_package.__file__).parent, site / "gguf")
    distribution = importlib.metadata.distribution("gguf")
    metadata = Path(distribution._path) if hasattr(distribution, "_path") else None     # its dist-info folder
    if metadata is None or not metadata.is_dir():
        raise StageError("stage: cannot find the gguf package's dist-info folder to stage")
    _copy_tree(metadata, site / metadata.name)
    # An empty __init__.py makes each staged folder a regular package, found before an installed
    # one of the same name (a namespace folder would lose to it).
    for top in site.iterdir():
        if top.is_dir() and not top.name.endswith(".dist-info"):
            (top / "__init__.py").touch()
    (site / module).mkdir(parents=True, exist_ok=True)
    (site / module / "__init__.py").touch()
    # The commit staged (the GPU machine gets the working tree without .git).
    described = subprocess.run(["git", "-C", str(repo), "describe", "--always", "--dirty"], capture_output=True, text=True)
    (stage / "common" / "commit").write_text((described.stdout.strip() or "unknown") + "\n")
    common_bytes = _size(stage / "common")
    tree, _ = tree_bytes(repo)
    room = LIMIT - tree - common_bytes - reserve
    if parts is None and room < 1_000_000:
        raise StageError(f"stage: the working tree ({_mb(tree)}) leaves no room for a part in a call "
                         f"({_mb(LIMIT)}); ignore large untracked folders (`{Path(sys.argv[0]).name} budget`)")
    manifest = split(gguf, stage / "parts", parts=parts, max_part_bytes=None if parts else room, compress=compress,
                     install={"module": module, "path": path, "target": target})
    shutil.copyfile(stage / "parts" / MANIFEST, stage / "common" / MANIFEST)
    count = len(manifest["parts"])
    print(f"stage: {gguf} ({_mb(manifest['size'])}) -> {count} parts of {_mb(manifest['parts'][0]['size'])} "
          f"({manifest['compress']}, {_mb(manifest['stream_size'])} in all) in {stage / 'parts'}")
    print(f"stage: common files {_mb(common_bytes)} in {stage / 'common'}; working tree {_mb(tree)}")
    for number in range(1, count + 1):
        carry = [f"{relative}/common", f"{relative}/parts/part-{number}"]
        left = budget(carry, repo, quiet=True)
        print(f"stage: call {number} carries {json.dumps(carry)}: {_mb(LIMIT - left)} of {_mb(LIMIT)}")
    return manifest


# -------------------------------------------------------------------------------------- CLI
def _numbers(text: str) -> set[int]:
    return {int(n) for n in text.split(",") if n.strip()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    commands = p.add_subparsers(dest="command", required=True)
    c = commands.add_parser("prepare", help="split the default target's GGUF and stage what the GPU run reads")
    c.add_argument("--stage", default=str(REPO / ".stage"))
    c.add_argument("--target", default="smollm2")
    c.add_argument("--gguf", default=None, help="the GGUF file (default: the target's, from its package)")
    c.add_argument("--parts", type=int, default=None, help="number of parts (default: as few as fit a call each)")
    c.add_argument("--reserve", type=int, default=RESERVE, help="bytes of each call kept free of parts")
    c.add_argument("--compress", choices=("gzip", "none"), default="gzip")
    c = commands.add_parser("split", help="FILE -> DIR/part-1..N + manifest.json")
    c.add_argument("file")
    c.add_argument("dir")
    group = c.add_mutually_exclusive_group(required=True)
    group.add_argument("--parts", type=int)
    group.add_argument("--max-part-bytes", type=int)
    c.add_argument("--compress", choices=("gzip", "none"), default="gzip")
    c = commands.add_parser("join", help="DIR (parts + manifest.json) -> OUT, every byte checked")
    c.add_argument("dir")
    c.add_argument("out")
    c = commands.add_parser("collect", help="copy the parts present in SRC_DIR into STASH_DIR, checked")
    c.add_argument("src")
    c.add_argument("stash")
    c.add_argument("--only", type=_numbers, default=None, help="part numbers to take, e.g. 1 (a rehearsal)")
    c = commands.add_parser("status", help="which parts STASH_DIR holds (exit 3 while some are missing)")
    c.add_argument("stash")
    c = commands.add_parser("install", help="collect, then join into STASH/site once complete (exit 3 until then)")
    c.add_argument("--stage", default=".stage")
    c.add_argument("--stash", default="build/stage")
    c.add_argument("--only", type=_numbers, default=None, help="part numbers to take, e.g. 1 (a rehearsal)")
    c = commands.add_parser("budget", help="bytes one call sends: the working tree plus the carried paths")
    c.add_argument("--carry", nargs="*", default=[])
    c.add_argument("--limit", type=int, default=LIMIT)
    args = p.parse_args(argv)
    try:
        if args.command == "prepare":
            prepare(Path(args.stage), args.target, Path(args.gguf) if args.gguf else None, args.reserve, args.parts,
                    args.compress)
        elif args.command == "split":
            m = split(Path(args.file), Path(args.dir), parts=args.parts, max_part_bytes=args.max_part_bytes,
                      compress=args.compress)
            print(f"split: {args.file} -> {len(m['parts'])} parts in {args.dir}")
        elif args.command == "join":
            join(Path(args.dir), Path(args.out))
            print(f"join: {args.out} checked")
        elif args.command == "collect":
            manifest, taken, missing = collect(Path(args.src), Path(args.stash), args.only)
            print(f"collect: took {', '.join(taken) or 'nothing new'}; missing {', '.join(missing) or 'nothing'}")
        elif args.command == "status":
            manifest = read_manifest(Path(args.stash))
            missing = missing_parts(Path(args.stash), manifest)
            count = len(manifest["parts"])
            print(f"status: {count - len(missing)} of {count} parts{'; missing ' + ', '.join(missing) if missing else ''}")
            return INCOMPLETE if missing else 0
        elif args.command == "install":
            site = install(Path(args.stage), Path(args.stash), args.only)
            if site is None:
                return INCOMPLETE
            print(f"site: {site.resolve()}")
        elif args.command == "budget":
            return 0 if budget(args.carry, limit=args.limit) >= 0 else 1
    except (StageError, ValueError, OSError) as error:
        print(f"{error}" if str(error).startswith("stage:") else f"stage: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
