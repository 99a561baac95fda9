"""The same-seed check (check.py), its FitNets stage's hint maps (1.2 GB over the 0.5 GiB
memory limit) read from disk, memory-mapped; compared with check.py's live run (run it
first). Result (check_mapped.log): every logged number identical, epoch by epoch."""

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
extra = [
    "performance.cache_teacher=true",
    f"performance.cache_dir={root}/outputs-mapped",
    "performance.cache_max_gib=0.5",
    "performance.cache_disk_gib=4",
]
cfg = load_config("configs/study/fashion-mnist.yaml", common + extra)
t = time.perf_counter()
distill(cfg, root / "mapped", progress=False)
print("mapped", f"{time.perf_counter() - t:.1f}s", flush=True)
rows = {
    n: [json.loads(x) for x in (root / n / "metrics.jsonl").read_text().splitlines()]
    for n in ("live", "mapped")
}
for a, b in zip(*rows.values(), strict=True):
    keys = [k for k in a if not k.endswith("time")]
    same = all(a[k] == b[k] for k in keys)
    print(
        a.get("stage"),
        a.get("epoch"),
        "identical" if same else {k: (a[k], b[k]) for k in keys if a[k] != b[k]},
    )
