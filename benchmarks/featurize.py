"""Featurization benchmark: images/s from JPEG files on disk to embeddings, per inference path.

Rows (same backbone, same resolution, no feature cache; median of --runs runs, ratio to row 1):
  1. plain loop     - what a user would write: for each file, PIL open, torchvision transforms, forward one image
  2. project torch  - embed_paths with the PyTorch engine (batched, thread-pool decode overlapped with the model)
  3. project onnx   - embed_paths with ONNX Runtime (float32; the default "auto" engine on CPU)
  4. project int8   - embed_paths with the statically quantised ONNX model

Then where the time goes (decode, resize+normalise, model per image, one thread, measured apart), and how
close the best path is to the machine's limit: model FLOPs (conv/linear multiply-adds counted with
forward hooks, x2) times images/s, against the CPU's fp32 peak (cores x GHz x FLOPs/cycle, the latter
from the lscpu flags) and against a measured large fp32 matmul.

    .venv/bin/python benchmarks/featurize.py                       # all 557 photos, 5 runs (~5 min on 2 quiet cores)
    .venv/bin/python benchmarks/featurize.py --limit 200 --runs 3  # quicker look
Other processes on the machine skew the numbers: the load average is printed before and after.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from lookalike.backbones import Preprocessor, create_backbone
from lookalike.features import create_engine, embed_paths
from lookalike.features.engines import cpu_threads
from lookalike.images import open_image

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "fashionTexture"


def plain_loop(backbone, paths: list[Path]) -> int:
    """The per-image PyTorch loop the project replaces."""
    from PIL import Image
    from torchvision import transforms

    size = backbone.config.input_size
    transform = transforms.Compose(
        [transforms.Resize(size), transforms.CenterCrop(size), transforms.ToTensor(), transforms.Normalize(backbone.config.mean, backbone.config.std)]
    )
    backbone.eval()
    n = 0
    with torch.no_grad():
        for p in paths:
            img = Image.open(p).convert("RGB")
            backbone(transform(img).unsqueeze(0))
            n += 1
    return n


def images_per_second(fn, runs: int) -> tuple[float, list[float], float]:
    """Median wall-clock images/s over `runs`, and images per CPU-second (all threads; less sensitive to other load)."""
    rates, per_cpu = [], []
    for _ in range(runs):
        start, cpu = time.perf_counter(), time.process_time()
        n = fn()
        rates.append(n / (time.perf_counter() - start))
        per_cpu.append(n / (time.process_time() - cpu))
    return statistics.median(rates), rates, statistics.median(per_cpu)


def count_flops(backbone) -> float:
    """Multiply-adds of every Conv2d and Linear for one image, x2 (pooling, BN, activations ignored: <1%)."""
    macs = 0

    def hook(module, inputs, output):
        nonlocal macs
        if isinstance(module, torch.nn.Conv2d):
            macs += output.numel() * (module.in_channels // module.groups) * module.kernel_size[0] * module.kernel_size[1]
        else:
            macs += output.numel() * module.in_features

    handles = [m.register_forward_hook(hook) for m in backbone.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    size = backbone.config.input_size
    with torch.inference_mode():
        backbone.eval()(torch.zeros(1, 3, size, size))
    for h in handles:
        h.remove()
    return 2.0 * macs


def cpu_peak_gflops(cores: int) -> tuple[float, str]:
    """Theoretical fp32 peak: cores x GHz x FLOPs/cycle (FMA width x 2 pipes, from the CPU flags)."""
    flags, mhz, vendor = set(), 0.0, ""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "flags" and not flags:
            flags = set(value.split())
        elif key == "cpu MHz" and not mhz:
            mhz = float(value)
        elif key == "vendor_id" and not vendor:
            vendor = value.strip()
    if "avx512f" in flags and vendor == "GenuineIntel":
        per_cycle, why = 64, "AVX-512: 2 FMA pipes x 16 fp32 x 2"
    elif "avx512f" in flags or ("avx2" in flags and "fma" in flags):
        per_cycle, why = 32, "2 x 256-bit FMA pipes x 8 fp32 x 2" + (" (AVX-512 runs as 2 x 256-bit on AMD Zen 4)" if "avx512f" in flags else "")
    else:
        per_cycle, why = 8, "SSE"
    return cores * mhz / 1000 * per_cycle, f"{cores} cores x {mhz / 1000:.2f} GHz x {per_cycle} FLOPs/cycle ({why})"


def measured_matmul_gflops(threads: int) -> float:
    torch.set_num_threads(threads)
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    a @ b
    best = 0.0
    for _ in range(3):
        start = time.perf_counter()
        a @ b
        best = max(best, 2 * 2048**3 / (time.perf_counter() - start) / 1e9)
    return best


def stage_times(backbone, engines: dict, paths: list[Path]) -> dict[str, float]:
    """Milliseconds per image of each stage, measured apart on one thread."""
    pre = Preprocessor(backbone.config)
    sample = paths[:48]
    start = time.perf_counter()
    images = [open_image(p, draft_size=pre.size) for p in sample]
    decode = time.perf_counter() - start
    start = time.perf_counter()
    batch = np.stack([pre.array(img) for img in images])
    resize = time.perf_counter() - start
    out = {"decode (Pillow, draft mode)": decode, "resize + crop + normalise": resize}
    for name, engine in engines.items():
        engine(batch[:16])
        start = time.perf_counter()
        for i in range(0, len(batch), 16):
            engine(batch[i : i + 16])
        out[f"model, {name}, batch 16"] = time.perf_counter() - start
    return {k: v / len(sample) * 1000 for k, v in out.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--backbone", default="efficientnet-lite0")
    parser.add_argument("--resolution", type=int, default=224)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--limit", type=int, default=0, help="use only the first N photos (0 = all)")
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()

    paths = sorted(p for p in args.data.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    if args.limit:
        paths = paths[:: max(1, len(paths) // args.limit)][: args.limit]
    threads = cpu_threads()
    torch.set_num_threads(threads)
    backbone = create_backbone(args.backbone, resolution=args.resolution)
    print(f"{len(paths)} photos from {args.data}; {args.backbone} at {args.resolution}px; {threads} CPU threads; "
          f"torch {torch.__version__}; {platform.processor() or platform.machine()}; load average before {os.getloadavg()}")

    with tempfile.TemporaryDirectory() as onnx_cache:
        start = time.perf_counter()
        engines = {"torch": create_engine(backbone, "torch"), "onnx": create_engine(backbone, "onnx", cache_dir=onnx_cache)}
        export_s = time.perf_counter() - start
        start = time.perf_counter()
        engines["int8"] = create_engine(backbone, "onnx", quantize=True, cache_dir=onnx_cache, calibration_paths=paths)
        quantize_s = time.perf_counter() - start
        print(f"one-off costs (cached on disk afterwards): ONNX export {export_s:.1f}s, INT8 calibration + quantisation {quantize_s:.1f}s\n")

        rows = [("1. plain per-image PyTorch loop", lambda: plain_loop(backbone, paths))]
        labels = {"torch": "2. project, PyTorch engine", "onnx": "3. project, ONNX Runtime (fp32)", "int8": "4. project, ONNX Runtime INT8"}
        for key, engine in engines.items():
            rows.append((labels[key], lambda e=engine: len(embed_paths(e, paths, batch_size=args.batch_size, progress=False).paths)))
        results = []
        for label, fn in rows:
            median, rates, per_cpu = images_per_second(fn, args.runs)
            results.append((label, median, per_cpu))
            print(f"  {label}: {median:.1f} img/s  (runs: {', '.join(f'{r:.1f}' for r in rates)}; {per_cpu:.1f} img per CPU-s)", flush=True)

        base, base_cpu = results[0][1], results[0][2]
        print(f"\n| path | images/s (median of {args.runs}) | × plain loop | images per CPU-second | × plain loop |\n|---|---:|---:|---:|---:|")
        for label, median, per_cpu in results:
            print(f"| {label} | {median:.1f} | {median / base:.2f}× | {per_cpu:.1f} | {per_cpu / base_cpu:.2f}× |")

        torch.set_num_threads(1)
        times = stage_times(backbone, {k: create_engine(backbone, "torch" if k == "torch" else "onnx", quantize=k == "int8", cache_dir=onnx_cache, threads=1) for k in engines}, paths)
        print("\n| stage (1 thread) | ms/image |\n|---|---:|")
        for stage, ms in times.items():
            print(f"| {stage} | {ms:.2f} |")

    flops = count_flops(backbone)
    peak, how = cpu_peak_gflops(threads)
    matmul = measured_matmul_gflops(threads)
    best_label, best, _ = max(results[1:3], key=lambda r: r[1])
    achieved = flops * best / 1e9
    print(f"\nmodel: {flops / 1e9:.3f} GFLOPs per image (conv + linear multiply-adds x 2, counted with forward hooks)")
    print(f"CPU fp32 peak: {peak:.0f} GFLOP/s = {how}; a 2048x2048 fp32 matmul reaches {matmul:.0f} GFLOP/s")
    print(f"best float path ({best_label}): {best:.1f} img/s x {flops / 1e9:.3f} GFLOPs = {achieved:.1f} GFLOP/s "
          f"= {achieved / peak:.1%} of peak, {achieved / matmul:.1%} of the matmul rate")
    int8 = results[3][1]
    print(f"INT8 path: {int8:.1f} img/s = {flops * int8 / 1e9:.1f} G(int)OP/s (its peak with AVX-512 VNNI is ~4x the fp32 one)")
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
