"""Runs every benchmark (benchmarks/bench_*.py) on one device and collects the results.

Each benchmark writes <out>/<name>.json; this script also writes <out>/all.json
(every result in one file) and prints each markdown table. Pass --only to pick
benchmarks by name; other options are forwarded to every benchmark.

--plot DIR draws one picture per op family (DIR/<name>.png: every implementation's time
across the cases, and jakiro's speedup over each baseline) from the same rows as the
tables; with --from-json FILE... it draws saved results instead of running anything
(e.g. benchmarks/results/cpu_linear.json). Needs matplotlib: pip install 'jakiro[plots]'.
"""
import argparse
import importlib
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import check_plot_option, default_device  # noqa: E402


def available() -> list[str]:
    return sorted(p.stem.removeprefix("bench_") for p in HERE.glob("bench_*.py"))


def plot_saved(files: list[str], out: str) -> None:
    """One picture per benchmark held in ``files`` (saved results), under ``out``."""
    from jakiro.plots import kernel_payloads, kernel_plots
    for file in files:
        data = json.loads(Path(file).read_text())
        payloads = kernel_payloads(data, Path(file).stem)
        if not payloads:
            sys.exit(f"run_all: {file} holds no benchmark rows")
        # A file of one benchmark keeps the file's name (cpu_linear.png); a file of several adds theirs.
        if "rows" in data:
            payloads, prefix = {Path(file).stem: next(iter(payloads.values()))}, ""
        else:
            prefix = f"{Path(file).stem}_"
        for path in kernel_plots(payloads, out, prefix=prefix):
            print(f"plot: {path}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--only", nargs="+", choices=available(), help="benchmarks to run (default: all)")
    p.add_argument("--device", default=default_device(), help="cpu or cuda[:i]")
    p.add_argument("--out", default=None, help="result folder (default: bench-results/<device type>)")
    p.add_argument("--quick", action="store_true", help="fewer cases and calls (smoke run)")
    p.add_argument("--plot", default=None, metavar="DIR", help="also draw one picture per op family into DIR")
    p.add_argument("--from-json", nargs="+", default=None, metavar="FILE",
                   help="with --plot: draw these saved results (a benchmark's JSON or all.json) and run nothing")
    args, forwarded = p.parse_known_args(argv)
    if args.from_json and not args.plot:
        p.error("--from-json needs --plot DIR")
    if args.plot:
        check_plot_option()     # before anything runs
    if args.from_json:
        plot_saved(args.from_json, args.plot)
        return
    if args.plot:
        forwarded += ["--plot", args.plot]
    out = Path(args.out or f"bench-results/{args.device.split(':')[0]}")
    names = args.only or available()
    results, failures = {}, []
    for name in names:
        print(f"\n=== bench_{name} ({args.device}) ===", flush=True)
        started = time.perf_counter()
        module = importlib.import_module(f"bench_{name}")
        bench_argv = ["--device", args.device, "--out", str(out), *forwarded] + (["--quick"] if args.quick else [])
        try:
            module.main(bench_argv)
        except Exception as exc:  # keep going: one broken benchmark must not hide the others
            failures.append(name)
            print(f"bench_{name} FAILED: {type(exc).__name__}: {exc}", flush=True)
            continue
        print(f"(bench_{name}: {time.perf_counter() - started:.1f} s)")
        for path in out.glob("*.json"):
            if path.name != "all.json":
                results[path.stem] = json.loads(path.read_text())
    (out / "all.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nall results: {out / 'all.json'}")
    if failures:
        sys.exit(f"benchmarks that failed: {', '.join(failures)}")


if __name__ == "__main__":
    main()
