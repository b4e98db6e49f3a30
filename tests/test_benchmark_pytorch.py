"""experiments/benchmark_pytorch.py, the side-by-side harness (the PyTorch rows need the
optional torch extra; the genjax row and the peak table do not)."""

import json
import os

import pytest

from experiments import benchmark_pytorch as bench
from genjax.train.host import tune_host_allocator


def test_peak_flops_follow_the_device_kind():
    assert bench.peak_flops("NVIDIA H100 80GB HBM3", "gpu", 8) == (989e12 * 8,
                                                                   "H100 dense bf16 peak x 8")
    assert bench.peak_flops("NVIDIA A100-SXM4-40GB", "gpu", 1)[0] == 312e12
    assert bench.peak_flops("TPU v5 lite", "tpu", 4)[0] == 197e12 * 4
    assert bench.peak_flops("TPU v5p", "tpu", 1)[0] == 459e12
    assert bench.peak_flops("TPU v6 lite", "tpu", 1)[0] == 918e12
    with pytest.raises(ValueError, match="no peak FLOP/s known for device kind 'Mystery X'"):
        bench.peak_flops("Mystery X", "gpu", 1)
    rate, source = bench.peak_flops("cpu", "cpu", 8)  # measured, whatever the device split
    assert rate > 1e9 and source.startswith("measured")


@pytest.mark.parametrize("cpuinfo, expected", [
    ("processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu sse4_2 avx avx2 avx512f\n"
     "processor\t: 1\nmodel name\t: AMD EPYC\nflags\t\t: fpu\n",
     "AMD EPYC, {n} cores, AVX-512"),  # the first processor's lines
    ("model name\t: Intel(R) Xeon(R)\nflags\t\t: fpu sse4_2 avx avx2\n",
     "Intel(R) Xeon(R), {n} cores, AVX2"),
    ("processor\t: 0\nFeatures\t: fp asimd sve\nCPU implementer\t: 0x41\n",
     "{machine}, {n} cores, SVE"),  # Arm: no model name, "Features"
    ("processor\t: 0\n", "{machine}, {n} cores"),
    (None, "{machine}, {n} cores"),  # no such file
])
def test_cpu_description_reads_model_cores_and_vector_extension(tmp_path, monkeypatch, cpuinfo,
                                                                expected):
    monkeypatch.setattr(bench.platform, "processor", lambda: "")  # (Linux gives "" too)
    monkeypatch.setattr(bench.platform, "machine", lambda: "aarch64")
    path = tmp_path / "cpuinfo"
    if cpuinfo is not None:
        path.write_text(cpuinfo)
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert bench.cpu_description(str(path)) == expected.format(n=n, machine="aarch64")


def test_genjax_row_times_the_fit_step(tmp_path):
    out = tmp_path / "r.json"
    result = bench.main(["--model", "vae", "--steps", "1", "--warmup", "1", "--repeats", "2",
                         "--variants", "genjax", "--json", str(out)])
    assert json.loads(out.read_text()) == result
    (row,) = result["rows"]
    assert row["variant"] == "genjax" and row["vs_genjax"] == 1.0
    assert row["images_per_s"] == pytest.approx(64 / (row["step_ms"] / 1e3))
    assert row["step_ms_min"] <= row["step_ms"] <= row["step_ms_max"]
    assert len(row["step_ms_rounds"]) == 2 and row["vs_genjax_rounds"] == [1.0, 1.0]
    assert "fastest PyTorch" not in bench.markdown(result)  # (no PyTorch row)
    assert 0 < row["mfu"] < 1 and result["model_gflop_per_step"] > 0.1
    assert "pmap over 8 cpu device(s)" in bench.markdown(result)
    assert result["device"] == f"cpu ({bench.cpu_description()})"
    assert result["torch_cpu_kernels"] is None
    assert "PyTorch's CPU kernels" not in bench.markdown(result)
    with pytest.raises(ValueError, match="--variants \\['jax'\\]: choose among"):
        bench.Args(variants=("jax",))


def test_pytorch_rows_share_the_batches():
    pytest.importorskip("torch")
    result = bench.main(["--model", "gan", "--steps", "1", "--warmup", "1", "--repeats", "1",
                         "--variants", "genjax", "torch-reference", "torch-fast"])
    assert [r["variant"] for r in result["rows"]] == ["genjax", "torch-reference", "torch-fast"]
    assert all(r["step_ms"] > 0 and r["vs_genjax"] > 0 for r in result["rows"])
    genjax, *torch_rows = result["rows"]
    for row in torch_rows:  # one round: the paired ratio is the ratio of the two times
        assert row["vs_genjax_rounds"] == [pytest.approx(row["step_ms"] / genjax["step_ms"])]
    fastest = min(torch_rows, key=lambda r: r["step_ms"])
    ratio = genjax["step_ms"] / fastest["step_ms"]
    assert (f"genjax / fastest PyTorch ({fastest['variant']}): {ratio:.2f}x (medians); per "
            f"round {ratio:.2f}x, quartiles {ratio:.2f}-{ratio:.2f}x over 1 rounds"
            ) in bench.markdown(result)
    assert result["versions"]["torch"].startswith("2.13")
    import torch

    kernels = torch.backends.cpu.get_cpu_capability()  # e.g. AVX2, AVX512
    assert result["torch_cpu_kernels"] == kernels
    assert f"PyTorch's CPU kernels {kernels}" in bench.markdown(result)
    # genjax's process tunes its malloc (genjax.train.host); PyTorch's keeps glibc's defaults
    assert result["malloc_tuned"] == {"genjax": tune_host_allocator(), "torch": False}


def test_mixed_precision_rows(monkeypatch):
    with pytest.raises(ValueError, match="--dtype bfloat16: mixed precision is the GPT's"):
        bench.Args(model="vae", dtype="bfloat16")
    pytest.importorskip("torch")
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=2")  # batch 12
    result = bench.main(["--model", "gpt", "--dtype", "bfloat16", "--steps", "1", "--warmup",
                         "1", "--repeats", "1", "--variants", "genjax", "torch-fast",
                         "--torch-malloc", "genjax"])
    assert result["dtype"] == "bfloat16" and "bfloat16" in bench.markdown(result)
    tuned = tune_host_allocator()  # where glibc is, both processes take genjax's settings
    assert result["malloc_tuned"] == {"genjax": tuned, "torch": tuned}
    assert all(r["step_ms"] > 0 for r in result["rows"])


def test_pytorch_alone_names_the_cpu_too():
    pytest.importorskip("torch")
    result = bench.main(["--model", "vae", "--steps", "1", "--warmup", "1", "--repeats", "1",
                         "--variants", "torch-fast"])
    assert [r["variant"] for r in result["rows"]] == ["torch-fast"]
    assert result["device"] == f"cpu ({bench.cpu_description()})"
    assert result["rows"][0]["vs_genjax"] is None and result["model_gflop_per_step"] is None
