"""Predicted against measured step memory, on the device in hand (run it on a card).

For each workload and micro-batch: the peak of one real step (forward, backward, optimizer;
``torch.cuda.max_memory_allocated`` on a card, as ``trainguard autoconfig`` measures), the
forecast that ``autoconfig --profile`` makes for a card that is absent (fake tensors, the
profile's fixed costs included), and their ratio. docs/memory.md holds the table.

    python scripts/memory_accuracy.py [--profile h100-80gb] [--only quickstart]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# name: (config, overrides, micro-batches)
WORKLOADS = {
    "quickstart": ("configs/quickstart.yaml", [], [32, 256, 1024]),
    "captioning": ("examples/captioning/config_h100.yaml", ["data.train.n=512"], [16, 64, 256]),
    "ctc_swipe": ("examples/ctc_swipe/config_h100.yaml", ["data.train.n=512"], [16, 64, 256]),
    "image_size": ("examples/image_size/config_h100.yaml", ["data.train.n=256"], [16, 64, 256]),
    "video_deblur": ("examples/video_deblur/config_h100.yaml", ["train.compile=false", "data.train.n=64"], [4, 16, 64]),
    "charlm-85M": ("configs/quickstart.yaml", ["model.block_size=512", "model.dim=768", "model.layers=12",
                                               "model.heads=12", "data.train.block_size=512", "data.val.block_size=512"],
                   [8, 32]),
}


def fixed_costs_here() -> None:
    """What the card spends beside the tensors, read directly: the CUDA context (device memory in
    use that the caching allocator did not reserve) and the cuBLAS workspaces, which are allocated
    through the caching allocator the first time a thread multiplies matrices (the forward's thread,
    then the autograd engine's own thread for the backward)."""
    import torch

    from trainguard.memory.sizes import fmt_bytes

    dev = torch.device("cuda")
    props = torch.cuda.get_device_properties(dev)
    x = torch.randn(512, 512, device=dev)
    w = torch.randn(512, 512, device=dev, requires_grad=True)
    torch.cuda.synchronize()
    free, total = torch.cuda.mem_get_info(dev)
    print(f"total_memory {props.total_memory} B = {fmt_bytes(props.total_memory)}; mem_get_info total {total} B")
    print(f"CUDA context (used - reserved, after init): {fmt_bytes(total - free - torch.cuda.memory_reserved(dev))}")
    steps = {}
    base = torch.cuda.memory_allocated(dev)
    y = x @ w
    steps["fp32 matmul, forward thread"] = torch.cuda.memory_allocated(dev) - base - y.nbytes
    base = torch.cuda.memory_allocated(dev)
    with torch.autocast("cuda", torch.bfloat16):
        z = torch.nn.functional.linear(x, w, torch.zeros(512, device=dev))
    steps["bf16 linear with bias (cublasLt), forward thread"] = torch.cuda.memory_allocated(dev) - base - z.nbytes - 512 * 512 * 2
    base = torch.cuda.memory_allocated(dev)
    (y.sum() + z.float().sum()).backward()
    steps["backward, autograd thread"] = torch.cuda.memory_allocated(dev) - base - w.grad.nbytes
    for k, v in steps.items():
        print(f"  {k}: +{fmt_bytes(v)} beside the tensors")
    print(f"memory_allocated now {fmt_bytes(torch.cuda.memory_allocated(dev))} for {fmt_bytes(3 * 512 * 512 * 4)} of tensors")


def main() -> None:
    import torch

    from trainguard.config.load import resolve_config
    from trainguard.hardware.probe import probe
    from trainguard.memory import trial
    from trainguard.memory.autoconfig import forecast
    from trainguard.memory.meter import open_memory
    from trainguard.memory.sizes import fmt_bytes
    from trainguard.build import build_core, device_of as _device, resolve_runtime as _resolve_runtime

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profile", default="h100-80gb", help="the profile whose forecast is compared")
    ap.add_argument("--only", action="append", choices=sorted(WORKLOADS))
    ap.add_argument("--precision", default="bf16")
    ap.add_argument("--fixed", action="store_true", help="only read the card's fixed costs (context, cuBLAS workspaces)")
    args = ap.parse_args()
    if args.fixed:
        return fixed_costs_here()
    info = probe()
    print(f"torch {torch.__version__}, {info.name}; forecast for profile {args.profile}, precision {args.precision}")
    print("| workload | micro-batch | measured peak | forecast | forecast / measured | phases measured (f/b/o) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, (path, sets, ms) in WORKLOADS.items():
        if args.only and name not in args.only:
            continue
        overrides = [*sets, f"train.precision={args.precision}", "train.micro_batch_size=1", "data.num_workers=0"]
        try:
            t0 = time.perf_counter()
            cfg, prof, _ = resolve_config(REPO / path, profile=args.profile, overrides=overrides)
            fc = forecast(cfg, prof)
            cfg, _ = _resolve_runtime(cfg, prof, info)
            device = _device(info)
            memory = open_memory(device, None)
            if memory is None:
                from trainguard.memory.meter import SimulatedMemory

                memory = SimulatedMemory(int(info.free_memory_gb * 2**30), name="free RAM")
            memory.start()
            try:
                trainer = build_core(cfg, device, memory)
                item = trainer.data.scan().worst_item
                with trial.preserved(trainer):
                    for m in ms:
                        got = trial.measure(trainer, item, m, enforce=False, accumulate=m < cfg.train.batch_size,
                                            batch_size=max(m, cfg.train.batch_size))
                        want = fc.step(m)
                        ratio = f"{want.peak / got.peak:.3f}" if got.peak and want.peak else "-"
                        phases = "/".join(fmt_bytes(v) for v in got.phases.values()) if not got.oom else "OOM"
                        print(f"| {name} | {m} | {fmt_bytes(got.peak) if got.peak else 'OOM'} | "
                              f"{fmt_bytes(want.peak) if want.peak else 'OOM'} | {ratio} | {phases} |", flush=True)
            finally:
                memory.stop()
            del trainer
            torch.cuda.empty_cache() if torch.cuda.is_available() else None
            print(f"<!-- {name}: {time.perf_counter() - t0:.1f} s -->", flush=True)
        except Exception as e:  # noqa: BLE001 - one workload's failure must not hide the others
            print(f"| {name} | - | failed: {type(e).__name__}: {str(e).splitlines()[0][:160]} | | | |", flush=True)


if __name__ == "__main__":
    main()
