"""What an ONNX Runtime session holds for compiled artifacts: the bytes at rest against the memory a
fresh process adds by starting a session (initializers folded and repacked, nothing run).

    python benchmarks/session_memory.py build/a build/b --threads 2 --json benchmarks/results/session_memory.json

For each artifact folder (or `model.onnx` path), in its own fresh process: the file's weight bytes
(`model.onnx` plus its external data), the RSS the session adds, split into its anonymous part (what
the session allocated) and its file-backed part (pages of mapped external data still mapped), and
the process's peak RSS while the session starts. The same model with graph optimizations off (`--unoptimized`) shows what
constant folding adds. Prints a table, writes JSON.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import common

MIB = 2**20


def model_path(arg: str) -> Path:
    path = Path(arg)
    return path / "model.onnx" if path.is_dir() else path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("artifacts", nargs="+", help="artifact folders or model.onnx paths")
    parser.add_argument("--threads", type=int, default=common.THREADS)
    parser.add_argument("--unoptimized", action="store_true", help="also measure each with graph optimizations off")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    rows = []
    for arg in args.artifacts:
        path = model_path(arg)
        row = {"artifact": str(path.parent), "bytes_at_rest_mib": round(common.files_size(common.onnx_files(path)) / MIB, 1),
               "session_mib": common.session_memory(path, args.threads)}
        if args.unoptimized:
            row["session_unoptimized_mib"] = common.session_memory(path, args.threads, optimize=False)
        row["added_over_at_rest"] = round(row["session_mib"]["added"] / row["bytes_at_rest_mib"], 3)
        rows.append(row)
        common.log(f"{path.parent}: done")
    headers = ["artifact", "MiB at rest", "session adds MiB", "x at rest", "anonymous MiB", "peak RSS MiB"]
    if args.unoptimized:
        headers.append("unoptimized adds MiB")
    lines = [[r["artifact"], r["bytes_at_rest_mib"], r["session_mib"]["added"], r["added_over_at_rest"],
              r["session_mib"]["anon_added"], r["session_mib"]["peak"],
              *([r["session_unoptimized_mib"]["added"]] if args.unoptimized else [])] for r in rows]
    text = common.table(headers, lines)
    if args.json:
        common.finish_run(args.json, args.threads, rows, text)
    else:
        print(text)


if __name__ == "__main__":
    main()
