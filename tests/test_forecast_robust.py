"""The memory forecast on model code fake tensors cannot run: it measures instead, or says why not.

A model that reads a tensor's value (a CTC head's ``labels.max()``, a router's ``nonzero``) is
forecast from real steps of the worst-case batch on the CPU under the card's usable memory; the
experts' grouped matmul (a bf16-only shape kernel) is forecast on fake tensors as what it
allocates; a model whose forward fails gets no forecast and no torch traceback.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

CTC = {"model": {"_target_": "tests.forecast_toys:CTCHead"},
       "data": {"train": {"_target_": "tests.forecast_toys:Frames"}, "val": None}}
ROUTED = {"model": {"_target_": "tests.forecast_toys:RoutedMoE"}}
GROUPED = {"model": {"_target_": "tests.forecast_toys:GroupedMoE"}}
MISMATCH = {"model": {"_target_": "tests.forecast_toys:Mismatch"}}


def _json(output: str) -> dict:
    return json.loads(output[output.index("{"):])


def _check(report: dict, name: str) -> dict | None:
    return next((c for c in report["checks"] if c["name"] == name), None)


@pytest.mark.parametrize("toy, raised", [(CTC, "DataDependentOutputException"), (ROUTED, "nonzero")])
def test_value_reading_model_is_measured_for_an_absent_card(cli, write_config, toy, raised):
    path = write_config("toy", **toy)
    code, out = cli("autoconfig", "--config", path, "--profile", "gtx1650", "--json")
    assert code == 0, out
    t = _json(out)
    assert t["method"] == "predicted" and t["forecast"] == "measured"
    assert t["micro_batch_size"] == 16 and t["grad_accum"] == 1  # a toy: the whole batch fits the card
    assert 0 < t["predicted_peak_bytes"] <= t["usable_bytes"]
    why = next(n for n in t["notes"] if n.startswith("fake tensors cannot run this model"))
    assert raised in why and "tests/forecast_toys.py:" in why  # the reason, and the model's own line that raised

    code, out = cli("diagnose", "--config", path, "--profile", "gtx1650", "--json")
    assert code == 0, out
    fit = _check(_json(out), "memory.fit")
    assert fit["status"] == "pass", fit
    assert "predicted from real steps on this CPU" in fit["message"] and raised in fit["message"]


def test_grouped_matmul_experts_forecast_on_fake_tensors(cli, write_config):
    # F.grouped_mm's shape-only kernel takes bf16 only; the card's step here is fp16 with fp32 experts
    code, out = cli("autoconfig", "--config", write_config("toy", **GROUPED), "--profile", "gtx1650", "--json")
    assert code == 0, out
    t = _json(out)
    assert t["forecast"] == "fake" and t["micro_batch_size"] == 16
    assert t["max_micro_batch_size"] > 16  # fake steps look past the batch size


def test_measured_fallback_counts_what_the_fake_forecast_counts(write_config):
    """On a model both can run, the real CPU steps and the fake ones count the same bytes, phase by phase."""
    from trainguard.config.load import resolve_config
    from trainguard.memory.autoconfig import forecast

    cfg, prof, _ = resolve_config(write_config("toy", **GROUPED), profile="gtx1650")
    cfg.train.precision = prof.precision
    fc = forecast(cfg, prof)
    fake = [fc.step(m) for m in (1, 4, 12)]
    assert fc.measured is None
    fc.measured = "forced by the test"  # every later step runs for real, on weights built for real
    real = [fc.step(m) for m in (1, 4, 12)]
    assert not any(p.is_meta for p in fc.model.parameters())
    assert [t.phases for t in real] == [t.phases for t in fake]
    assert fake[2].peak > fake[0].peak  # the counts grow with the batch: the comparison is not of constants


def test_measured_step_stops_at_the_budget_and_leaves_the_model_as_it_was():
    import torch

    from trainguard.memory.predict import measured_step
    from tests.forecast_toys import CTCHead, Frames

    torch.manual_seed(0)
    model, item = CTCHead(), Frames(n=4)[0]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    adamw = lambda ps: torch.optim.AdamW(ps, lr=1.0)  # noqa: E731 - a large step, were it applied to the model
    rng = torch.get_rng_state()
    free = measured_step(model, None, {}, adamw, item, 8, "fp16", cuda=True)
    assert not free.oom and free.peak > 0
    capped = measured_step(model, None, {}, adamw, item, 8, "fp16", cuda=True, limit=free.peak - 512)  # a block short
    assert capped.oom and capped.peak is None  # stopped where a card of that size would have failed
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert torch.equal(torch.get_rng_state(), rng) and all(p.grad is None for p in model.parameters())


def test_shape_mismatch_gets_no_forecast_and_no_torch_traceback(cli, write_config):
    path = write_config("toy", **MISMATCH)
    # on this CPU (the RAM forecast runs before the forward): a real process, so torch's own log handler
    # (bound to the process's stderr) would show what it prints
    proc = subprocess.run([sys.executable, "-m", "trainguard", "diagnose", "--config", str(path), "--json"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr and "fake_tensor" not in proc.stderr, proc.stderr
    report = _json(proc.stdout)
    assert "mat1 and mat2 shapes cannot be multiplied" in _check(report, "model.forward")["message"]
    assert _check(report, "memory.fit") is None

    code, out = cli("diagnose", "--config", path, "--profile", "gtx1650", "--json")
    assert code == 1, out
    report = _json(out)
    assert _check(report, "model.forward")["status"] == "fail"
    assert _check(report, "memory.fit") is None  # the forward failed: no forecast

    # autoconfig has no forward of its own: the forecast's real step names the model's error, without a traceback
    code, out = cli("autoconfig", "--config", path, "--profile", "gtx1650")
    assert code == 1, out
    assert "error: no memory forecast" in out and "mat1 and mat2 shapes cannot be multiplied" in out
    assert "hint: run `trainguard diagnose`" in out and "Traceback" not in out


EXAMPLES = {  # config, overrides: small data, fp32 (a CPU's counter), no compile
    "quickstart": ("configs/quickstart.yaml", []),
    "captioning": ("examples/captioning/config_gtx1650.yaml", ["data.train.n=32"]),
    "ctc_swipe": ("examples/ctc_swipe/config_gtx1650.yaml", ["data.train.n=32"]),
    "image_size": ("examples/image_size/config_gtx1650.yaml", ["data.train.n=32"]),
    "video_deblur": ("examples/video_deblur/config_gtx1650.yaml", ["data.train.n=8", "data.train.size=64"]),
}
FAKE_ZOO = ["bert", "gpt2", "llama", "opt", "t5", "bart", "vit", "convnext", "segformer", "nanogpt", "clip"]  # the
# rest read tensor values (wav2vec2's labels.max(), mixtral's nonzero) or take bf16 only (olmoe): measured, not faked


def _counted_and_forecast(cfg, sizes=(1, 3)) -> list[tuple[int, dict, dict]]:
    """For each micro-batch: the simulated counter's phases on a real CPU step of the worst-case
    batch (``trial.measure``, as autoconfig under ``--memory-budget`` measures) and the fake-tensor
    forecast's for the same built trainer (``predict_trainer``)."""
    import torch

    from trainguard.build import build_core
    from trainguard.memory import trial
    from trainguard.memory.meter import host_side, open_memory
    from trainguard.memory.predict import predict_trainer

    cfg.train.precision, cfg.train.compile, cfg.train.batch_size = "fp32", False, max(sizes)
    cfg.train.micro_batch_size, cfg.data.num_workers, cfg.data.pin_memory = max(sizes), 0, False
    mem = open_memory(torch.device("cpu"), 1 << 40)
    mem.start()
    try:
        trainer = build_core(cfg, torch.device("cpu"), mem)
        with host_side(mem):
            item = trainer.data.scan().worst_item
        out = []
        for m in sizes:
            with trial.preserved(trainer):
                counted = trial.measure(trainer, item, m, enforce=False, batch_size=m)
            with mem.paused():  # the fake step's own counter only
                forecast = predict_trainer(trainer, item, m)
            out.append((m, counted.phases, forecast.phases))
        return out
    finally:
        mem.stop()


def _within(counted: dict, forecast: dict, tolerance: float) -> bool:
    """Forward and backward (the step's peak is one of them) within ``tolerance`` of the counter;
    the forecast's optimizer phase may be higher (it keeps the fake batch alive), never lower."""
    return (all(abs(forecast[p] / counted[p] - 1) <= tolerance for p in ("forward", "backward"))
            and forecast["optimizer"] >= counted["optimizer"])


@pytest.mark.parametrize("name", list(EXAMPLES))
def test_the_forecast_counts_what_the_simulated_counter_counts_for_the_examples(name, tmp_path, monkeypatch):
    """Issue 24 asks for 2% on the CPU; the examples agree to the byte in the forward and backward
    (torch 2.13), so any drift fails here: a BatchNorm model's copies of its statistics (the engine's
    KeptBuffers, 27 KB for image_size) were the last bytes the fake step missed."""
    from pathlib import Path

    from trainguard.config.load import resolve_config

    repo = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(tmp_path)  # the examples make their data under ./data
    path, overrides = EXAMPLES[name]
    cfg, _, _ = resolve_config(repo / path, overrides=overrides + ["train.device=cpu"])
    for m, counted, forecast in _counted_and_forecast(cfg):
        assert _within(counted, forecast, 0.0), (name, m, counted, forecast)


@pytest.mark.parametrize("name", FAKE_ZOO)
def test_the_forecast_counts_what_the_simulated_counter_counts_for_the_zoo(name):
    """Issue 24: within 2% on the CPU for the zoo's models that fake tensors can run (BART is the
    furthest today, 0.5-1.1% high; ConvNeXt and Segformer, 7-8% low before 2026-12-02, are exact)."""
    from tests.zoo import zoo_config
    from trainguard.config.load import resolve_config

    cfg, _, _ = resolve_config(raw=zoo_config(name))
    for m, counted, forecast in _counted_and_forecast(cfg):
        assert _within(counted, forecast, 0.02), (name, m, counted, forecast)
