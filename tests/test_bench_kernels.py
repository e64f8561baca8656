"""bench/sdpa_kernels.py on a CPU: the math kernel at tiny shapes, the JSON a GPU call writes (issue #18)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

HARNESS = Path(__file__).resolve().parent.parent / "bench" / "sdpa_kernels.py"


def test_smoke_writes_per_shape_times_and_the_weighted_totals(tmp_path: Path) -> None:
    out = tmp_path / "sdpa.json"
    done = subprocess.run([sys.executable, str(HARNESS), "--smoke", "--out", str(out)], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(out.read_text(encoding="utf-8"))
    assert report["benchmark"] == "sdpa_kernels" and report["gpu"] == "cpu"
    for part, backward in (("training", True), ("generation", False)):
        suite = report[part]
        assert suite["forward_and_backward"] is backward and suite["fastest"] == "auto"
        rows = suite["shapes"]
        assert rows and all(row["auto"]["ms"] > 0 and row["auto"]["max_rel_error_vs_math"] < 1e-5 for row in rows.values())
        total = sum(row["auto"]["ms"] * row["per_unet"] for row in rows.values())
        assert abs(suite["attention_ms_per_unet_call"]["auto"] - total) < 1e-2
    for part in ("conv_training", "conv_generation"):
        convs = report[part]
        assert set(convs["conv_ms_per_unet_call"]) == {"heuristic", "benchmark"}
        assert all(row["heuristic"] > 0 and row["benchmark"] > 0 for row in convs["shapes"].values())


def test_the_committed_h200_result_compares_every_kernel() -> None:
    report = json.loads((HARNESS.parent / "results" / "sdpa-kernels-h200.json").read_text(encoding="utf-8"))
    assert report["device"] == "NVIDIA H200" and report["dtype"] == "float16"
    per_unet = report["training"]["attention_ms_per_unet_call"]
    assert set(per_unet) == {"auto", "flash", "efficient", "cudnn", "cudnn-first"}
    assert report["training"]["cudnn_first_vs_auto"] == round(per_unet["auto"] / per_unet["cudnn-first"], 3)
