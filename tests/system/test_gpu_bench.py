"""``python -m bench.gpu``, the GPU worker's proof, run here in its CPU-only mode so that it cannot rot.

The GPU is hidden (``CUDA_VISIBLE_DEVICES=-1``, inherited by the workers), so the ``gpu``-queue
worker runs on the CPU: the bench must still drive the whole queue path (auth, uploads with
``device=gpu`` and ``device=cpu``, each batch analysed by its own worker only) and say plainly
that no GPU was used, and ``--require-gpu`` must turn that into exit status 1.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ser_shared.settings import REPO_ROOT
from tests.conftest import DATASETS

pytestmark = pytest.mark.slow

RECORDINGS = 8


def test_gpu_bench_cpu_only_drives_both_queues_and_refuses_without_gpu(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SER_")}
    env.update({"CUDA_VISIBLE_DEVICES": "-1", "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": str(REPO_ROOT)})
    env.pop("OUT", None)
    out = tmp_path / "out" / "gpu.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bench.gpu", "--recordings", str(RECORDINGS), "--chunk-size", "4", "--batch-size", "4",
         "--datasets", str(DATASETS), "--require-gpu", "--out", str(out), "--start-timeout", "240",
         "--timeout", "120"],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=420, check=False)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]  # --require-gpu, and none was used
    assert "no GPU visible: the gpu queue worker ran on CPU" in proc.stdout
    assert "FAILED: --require-gpu" in proc.stdout
    report = json.loads(out.read_text())
    assert report["error"] is None, report["error"]
    assert report["ok"] is True and report["gpu_used"] is False
    # The worker's own report of where TensorFlow put the models, and its warning about the queue.
    assert report["gpu_worker_placement"] == {"encoder": "CPU:0", "lstm": "CPU:0"}
    assert report["gpu_worker_warned_no_gpu"] is True
    for device, mine, other in (("gpu", "gpu-worker", "cpu-worker"), ("cpu", "cpu-worker", "gpu-worker")):
        phase = report["phases"][device]
        assert phase["queue"] == device
        assert phase["counts"] == {"succeeded": RECORDINGS}
        assert phase["api_counts"]["succeeded"] == RECORDINGS
        assert phase["analysed_by"] == {mine: RECORDINGS, other: 0}
        assert phase["per_s"] > 0 and phase["worker_cpu_ms_per_recording"] > 0
        assert {"decode", "inference"} <= set(phase["mean_timings_ms"])
    # Same recordings on the same kind of device: the same predictions.
    assert report["agreement"]["files"] == RECORDINGS
    assert report["agreement"]["max_abs_prob_diff"] <= 1e-5
    assert report["ratio_gpu_to_cpu"] == pytest.approx(
        report["phases"]["gpu"]["per_s"] / report["phases"]["cpu"]["per_s"], abs=0.01)
    log = (out.parent / "gpu-worker.log").read_text()
    assert "encoder_device=CPU:0 lstm_device=CPU:0" in log and "queue=gpu consumed without a GPU" in log
