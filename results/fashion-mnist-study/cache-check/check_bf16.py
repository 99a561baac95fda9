"""Same-seed check of the teacher cache on the study's setting as it now runs (bf16
autocast, channels-last; 1000 of the 20000 training images, 2+1+2 epochs): live teacher,
a cache filled by this run, the filled cache read again, and FitNets' hint maps read
from disk (memory-mapped: cache_max_gib 0.1). Run from the repository root (it writes
/tmp/sameseed-bf16). Result: check_bf16.log."""

import json
import time
from pathlib import Path

from smskd import distill, load_config

root = Path("/tmp/sameseed-bf16")
common = ["data.train_subset=1000", "stages.0.epochs=2", "stages.1.epochs=1", "stages.2.epochs=2"]
cached = ["performance.cache_teacher=true", f"performance.cache_dir={root}/outputs"]
runs = {
    "live": ["performance.cache_teacher=false", "performance.cache_dir=null"],
    "cached": cached,
    "cached-again": cached,
    "mapped": [
        "performance.cache_teacher=true",
        f"performance.cache_dir={root}/outputs-mapped",
        "performance.cache_max_gib=0.1",
        "performance.cache_disk_gib=4",
    ],
}
for name, extra in runs.items():
    cfg = load_config("configs/study/fashion-mnist.yaml", common + extra)
    assert cfg.performance.precision == "bf16" and cfg.performance.channels_last
    t = time.perf_counter()
    distill(cfg, root / name, progress=False)
    print(name, f"{time.perf_counter() - t:.1f}s", flush=True)
rows = {
    n: [json.loads(line) for line in (root / n / "metrics.jsonl").read_text().splitlines()]
    for n in runs
}
for epoch in zip(*rows.values(), strict=True):
    first = epoch[0]
    keys = [k for k in first if not k.endswith("time")]
    differ = {k: [r[k] for r in epoch] for k in keys if any(r[k] != first[k] for r in epoch)}
    print(first.get("stage"), first.get("epoch"), differ or "identical in all four")
