"""Where the time goes at KITTI-360 size: torch.profiler over render_view (B2) and over the shared extraction of a
segment seen for the first time, kernel maps included (B1). One train view's forward + backward, and each stage of a
view timed apart: ``benchmarks/profile_view_stages.py``.

Usage (GPU machine): ``python benchmarks/profile_render.py [CHECKPOINT]`` (a trained evolsplat-ff checkpoint with 3
source views: profile what trained weights pay; default untrained)
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_model import build_model, render_one, views  # noqa: E402
from bench_sparse_unet import street_points  # noqa: E402

from evolsplat_ns.data.batch import SegmentBatch  # noqa: E402


def main():
    device = torch.device("cuda")
    pts = street_points(420_000, 0.1, 0, "cpu").float()[:1_050_000].to(device)
    batch = SegmentBatch(0, 0, views([1.0, 3.0, 5.0], 376, 1408, device, 1), views([2.0], 376, 1408, device, 2), True)
    model = build_model(device, pts, weights=Path(sys.argv[1]) if len(sys.argv) > 1 else None).eval()
    with torch.no_grad():
        shared = model.extract_shared(batch)
        for _ in range(5):
            render_one(model, shared, batch.target, 0)
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(10):
                with torch.profiler.record_function("render_view"):
                    render_one(model, shared, batch.target, 0)
            torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25))
    print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=15))
    with torch.no_grad():
        for _ in range(2):
            model.segments.clear_caches()
            model.extract_shared(batch)
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                model.segments.clear_caches()
                with torch.profiler.record_function("extract_shared_first_time"):
                    model.extract_shared(batch)
            torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25))
    print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=25))


if __name__ == "__main__":
    main()
