"""Peak memory of the dataset check and tokenizing: examples kept in memory against streamed to Arrow.

    .venv/bin/python bench/prepare_memory.py [--records 50000] [--words 150] [--out bench/results/prepare_memory.json]

The prepare pod (`kubetune prepare`) tokenizes every record of the dataset. It reads the records one at a time
from disk and writes each tokenized example to an Arrow file as it comes (trainer/data.py `Examples` with a
folder), so its memory should not grow with the dataset; a training pod without a prepare step keeps its
examples in memory (the lists TRL gets). This benchmark generates a JSONL dataset of `--records` prompt/response
records of about `--words` words each, builds the tests' tiny Qwen2 tokenizer, and runs `trainer.data.prepare`
in a fresh process per mode: `memory` (lists) and `arrow` (into a folder). It prints and records each run's peak
resident memory (ru_maxrss), seconds, and the tokens it counted; the same report in both modes is checked.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = """
import json, resource, sys, threading, time
from pathlib import Path
anon = [0]
def sample():  # peak anonymous memory: mapped Arrow pages count in ru_maxrss but are page cache, reclaimable
    while True:
        for line in open("/proc/self/status"):
            if line.startswith("RssAnon:"):
                anon[0] = max(anon[0], int(line.split()[1]))
        time.sleep(0.05)
threading.Thread(target=sample, daemon=True).start()
from kubetune.api.v1alpha1 import DatasetFormat, Method
from kubetune.trainer.data import load_tokenizer, prepare
model, data, into = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
tokenizer = load_tokenizer(Path(model))
time.sleep(0.2)
before, anon_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, anon[0]
start = time.monotonic()
prepared = prepare(tokenizer, data, Method.SFT, DatasetFormat.AUTO, 512, 0.01, 42, None, Path(into) if into else None)
seconds = time.monotonic() - start
report = prepared.report.to_dict()
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
time.sleep(0.2)
print(json.dumps({"seconds": round(seconds, 1), "peak_rss_mib": round(peak / 1024), "before_mib": round(before / 1024),
                  "peak_anon_mib": round(anon[0] / 1024), "anon_before_mib": round(anon_before / 1024),
                  "report": report}))
"""

WORDS = [
    "the",
    "of",
    "and",
    "to",
    "in",
    "is",
    "was",
    "for",
    "on",
    "that",
    "with",
    "as",
    "by",
    "at",
    "from",
    "his",
    "an",
    "were",
    "are",
    "which",
    "this",
    "be",
    "has",
    "or",
]


def write_dataset(path: Path, records: int, words: int, seed: int = 7) -> int:
    rng = random.Random(seed)
    with path.open("w") as out:
        for i in range(records):
            prompt = " ".join(rng.choice(WORDS) for _ in range(words // 3))
            response = " ".join(rng.choice(WORDS) for _ in range(words - words // 3))
            out.write(json.dumps({"prompt": f"{i} {prompt}", "response": response}) + "\n")
    return path.stat().st_size


def run(mode: str, model: Path, data: Path, scratch: Path) -> dict[str, object]:
    into = str(scratch / mode) if mode == "arrow" else ""
    out = subprocess.run([sys.executable, "-c", CHILD, str(model), str(data), into], check=True, capture_output=True)
    return dict(json.loads(out.stdout.decode().strip().splitlines()[-1]))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=50_000)
    parser.add_argument("--words", type=int, default=150)
    parser.add_argument("--out", type=Path, default=Path("bench/results/prepare_memory.json"))
    args = parser.parse_args()
    from kubetune.trainer.tiny import build_tiny_model

    with tempfile.TemporaryDirectory(prefix="kubetune-bench-") as tmp:
        scratch = Path(tmp)
        data = scratch / "train.jsonl"
        size = write_dataset(data, args.records, args.words)
        model = build_tiny_model(scratch / "model", [" ".join(WORDS)])
        runs = {mode: run(mode, model, data, scratch) for mode in ("memory", "arrow")}
    reports = [r.pop("report") for r in runs.values()]
    assert reports[0] == reports[1], reports
    result = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}",
        "records": args.records,
        "dataset_mib": round(size / 2**20, 1),
        "tokens": reports[0]["tokens"],
        "runs": runs,
        "self_peak_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    print(f"{args.records:,} records, {result['dataset_mib']} MiB of JSONL, {reports[0]['tokens']['total']:,} tokens")
    for mode, figures in runs.items():
        grew = int(figures["peak_anon_mib"]) - int(figures["anon_before_mib"])
        print(
            f"  {mode:7} anonymous memory +{grew} MiB over the loaded tokenizer's {figures['anon_before_mib']} MiB "
            f"(peak RSS with mapped files {figures['peak_rss_mib']} MiB), {figures['seconds']} s"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
