"""Same-seed check of performance.cache_teacher with augmentation on the study's setting
(1000 of the 20000 training images, 2+1+2 epochs): live teacher, a cache filled by this
run, and the filled cache read again. Run from the repository root (it writes /tmp/sameseed).
Result (check.log): every logged number identical in all three, epoch by epoch. (When it
ran, the base config had the cache off; "live" now turns it off.)"""

import json
import time
from pathlib import Path

from smskd import distill, load_config

# As it ran: the study was fp32 then (check_bf16.py checks its bf16 setting).
FP32 = ["performance.precision=fp32", "performance.channels_last=false"]

root = Path("/tmp/sameseed")
common = [
    *FP32,
    "data.train_subset=1000",
    "stages.0.epochs=2",
    "stages.1.epochs=1",
    "stages.2.epochs=2",
]
for name, extra in [
    ("live", ["performance.cache_teacher=false", "performance.cache_dir=null"]),
    ("cached", ["performance.cache_teacher=true", f"performance.cache_dir={root}/outputs"]),
    ("cached-again", ["performance.cache_teacher=true", f"performance.cache_dir={root}/outputs"]),
]:
    cfg = load_config("configs/study/fashion-mnist.yaml", common + extra)
    t = time.perf_counter()
    distill(cfg, root / name, progress=False)
    print(name, f"{time.perf_counter() - t:.1f}s", flush=True)
rows = {
    n: [json.loads(line) for line in (root / n / "metrics.jsonl").read_text().splitlines()]
    for n in ("live", "cached", "cached-again")
}
for a, b, c in zip(*rows.values(), strict=True):
    keys = [k for k in a if k not in ("epoch_time", "time", "wall_time") and not k.endswith("time")]
    same = all(a[k] == b[k] == c[k] for k in keys)
    print(
        a.get("stage"),
        a.get("epoch"),
        "identical" if same else {k: (a[k], b[k], c[k]) for k in keys if not a[k] == b[k] == c[k]},
    )
