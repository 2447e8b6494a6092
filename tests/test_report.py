"""kernelforge report: charts from pytest-benchmark JSON.

The input is real pytest-benchmark output: a tiny benchmark file written here
records the fields the benches record (bench/conftest.py's record_case,
bench/test_runtime_bench.py, bench/test_serving_bench.py) with known values,
and pytest runs it with --benchmark-json. The checks read the SVG's text (the
labels) and the widths and points the report says it drew."""
import copy
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")
pytest.importorskip("pytest_benchmark")

from kernelforge import cli, report  # noqa: E402

REPO = Path(__file__).resolve().parents[1]

# % of the copy bandwidth each op case records (extra_info["fraction_of_copy_bw"] * 100)
OPS = {("rms_norm 4096x4096 bf16", "kf_cpp"): 41.23,
       ("rms_norm 4096x4096 bf16", "kf_inductor"): 35.5,
       ("rms_norm 4096x4096 bf16", "torch_F_rms_norm"): 12.0,
       ("rotary T=4096 bf16", "kf_inductor"): 63.0,
       ("rotary T=4096 bf16", "hf_eager"): 7.25}
# tok/s of the runtime cases; None: a peer that is not installed
RUNTIME = {("kf", "float32", 1): 80.5, ("kf", "bfloat16", 32): 410.0,
           ("hf", "float32", 1): 25.0, ("llama.cpp", "q4_1", 1): None,
           ("vllm-cpu", "bf16", 32): 340.0}

BENCH = textwrap.dedent('''
    import pytest

    OPS = {ops!r}
    RUNTIME = {runtime!r}

    def test_copy_bandwidth(benchmark):
        benchmark.group = "copy 256 MiB fp32"
        benchmark.pedantic(lambda: None, rounds=2, iterations=1)
        benchmark.extra_info.update(bytes=2 ** 29, gbps=19.5, fraction_of_copy_bw=1.0)

    @pytest.mark.parametrize("group,impl", list(OPS))
    def test_rmsnorm(benchmark, group, impl):
        benchmark.group = group
        benchmark.pedantic(lambda: None, rounds=2, iterations=1)
        frac = OPS[(group, impl)] / 100
        benchmark.extra_info.update(bytes=1000, gbps=round(19.5 * frac, 3), copy_gbps=19.5,
                                    fraction_of_copy_bw=frac)

    class Case:                      # bench/test_ops_bench.py parametrizes with objects
        pass

    @pytest.mark.parametrize("case", [Case(), Case()], ids=["small-silu_and_mul-4x11008-kf_cpp",
                                                            "small-silu_and_mul-4x11008-peer"])
    def test_op(benchmark, case):
        benchmark.group = "silu_and_mul 4x11008 bfloat16"
        benchmark.pedantic(lambda: None, rounds=2, iterations=1)
        frac = 0.5 if benchmark.name.endswith("kf_cpp]") else 0.25
        benchmark.extra_info.update(fraction_of_copy_bw=frac, copy_gbps=19.5, gflops=3.5)

    @pytest.mark.parametrize("impl,dtype,batch", list(RUNTIME))
    def test_runtime_throughput(benchmark, impl, dtype, batch):
        benchmark.group = "runtime SmolLM2-135M greedy 128 new tokens"
        benchmark.extra_info["tokens_per_s"] = None
        benchmark.pedantic(lambda: None, rounds=2, iterations=1)
        if RUNTIME[(impl, dtype, batch)] is not None:
            benchmark.extra_info["tokens_per_s"] = RUNTIME[(impl, dtype, batch)]

    def test_paired_vllm_32(benchmark):
        benchmark.group = "runtime SmolLM2-135M greedy 128 new tokens, paired"
        benchmark.pedantic(lambda: None, rounds=2, iterations=1)
        benchmark.extra_info.update(vllm_cores="all", kf_tok_s=[400.0, 420.0, 500.0],
                                    vllm_tok_s=[300.0, 330.0, 310.0, 320.0])

    @pytest.mark.parametrize("concurrency", [1, 8])
    def test_serving(benchmark, concurrency):
        benchmark.group = f"serving float32, {{concurrency}} clients"
        benchmark.pedantic(lambda: None, rounds=2, iterations=1)
        for name, scale in (("kernelforge", 1.0), ("vllm", 2.0)):
            benchmark.extra_info[f"{{name}}_output_tok_s"] = 10.0 * concurrency / scale
            benchmark.extra_info[f"{{name}}_ttft_p99_ms"] = 300.0 * scale
            benchmark.extra_info[f"{{name}}_itl_p50_ms"] = 50.0 * concurrency * scale
            benchmark.extra_info[f"{{name}}_itl_p99_ms"] = 90.0 * concurrency * scale
''')


@pytest.fixture(scope="module")
def real(tmp_path_factory) -> dict:
    """pytest-benchmark's own JSON of the tiny benchmark file, and files cut from it:
    {"all", "ops", "runtime", "serving_bench", "copy_only"} -> path."""
    d = tmp_path_factory.mktemp("report")
    (d / "test_tiny_bench.py").write_text(BENCH.format(ops=OPS, runtime=RUNTIME))
    # under make test's xdist workers pytest-benchmark would disable itself (as in
    # tests/test_bench_flow.py): the child gets no xdist variables
    env = {k: v for k, v in os.environ.items()
           if k != "PYTEST_ADDOPTS" and not k.startswith("PYTEST_XDIST")}
    out = subprocess.run([sys.executable, "-m", "pytest", "test_tiny_bench.py", "-q",
                          "--benchmark-only", "--benchmark-json", "all.json",
                          "-p", "no:cacheprovider", "-p", "no:xdist"],
                         cwd=d, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    data = json.loads((d / "all.json").read_text())
    paths = {"all": d / "all.json"}
    for name, prefix in (("ops", ("test_copy", "test_rmsnorm", "test_op[")),
                         ("runtime", ("test_runtime", "test_paired")),
                         ("serving_bench", ("test_serving",)), ("copy_only", ("test_copy",))):
        part = copy.deepcopy(data)
        part["benchmarks"] = [b for b in data["benchmarks"] if b["name"].startswith(prefix)]
        paths[name] = d / f"{name}.json"
        paths[name].write_text(json.dumps(part))
    paths["machine"] = report.machine({"kind": "pytest-benchmark", "data": data})
    paths["date"] = data["datetime"][:10]
    return paths


def _svg_text(path) -> str:
    text = Path(path).read_text()
    assert text.lstrip().startswith(("<?xml", "<svg")), path
    return text


def test_roofline_and_tokens_from_real_pytest_benchmark_json(real, tmp_path):
    drawn = report.report([real["ops"], real["runtime"]], tmp_path)
    roof, tok = tmp_path / "roofline.svg", tmp_path / "tokens_per_s.svg"
    assert set(drawn) == {str(roof), str(tok)}
    # the bars are the recorded fractions, as percentages; the copy case is the 100% line
    widths = drawn[str(roof)]
    for (group, impl), pct in OPS.items():
        assert widths[group][impl] == pytest.approx(pct)
    assert widths["silu_and_mul 4x11008 bfloat16"] == {"kf_cpp": pytest.approx(50.0),
                                                        "peer": pytest.approx(25.0)}
    assert not any("copy" in g for g in widths)
    svg = _svg_text(roof)
    for label in ("rms_norm 4096x4096 bf16", "rotary T=4096 bf16", "kf_cpp  41%",
                  "torch_F_rms_norm", "hf_eager", "peer  25%", "(3.5 GFLOP/s)", "19.5 GB/s",
                  real["machine"], real["date"]):
        assert label in svg, label
    # tok/s by batch size; the peer without a rate (llama.cpp) is left out
    rates = drawn[str(tok)]["runtime SmolLM2-135M greedy 128 new tokens"]
    assert rates["batch 1"] == {"kernelforge float32": pytest.approx(80.5),
                                "transformers float32": pytest.approx(25.0)}
    assert rates["batch 32"] == {
        "kernelforge bfloat16": pytest.approx(410.0), "vllm-cpu bf16": pytest.approx(340.0),
        "kernelforge bfloat16, paired (all vLLM cores)": pytest.approx(420.0),   # medians
        "vllm-cpu bf16, paired (all cores)": pytest.approx(315.0)}
    svg = _svg_text(tok)
    for label in ("batch 1", "batch 32", "kernelforge float32  80.5", "transformers float32",
                  "vllm-cpu bf16  340.0", real["machine"], real["date"]):
        assert label in svg, label
    assert "llama.cpp" not in svg


def test_the_command_in_process_and_as_a_subprocess(real, tmp_path, capsys):
    assert cli.main(["report", str(real["all"]), "--out", str(tmp_path / "svg")]) == 0
    names = {"roofline.svg", "tokens_per_s.svg", "serving_throughput.svg", "serving_latency.svg"}
    assert {p.name for p in (tmp_path / "svg").iterdir()} == names
    assert capsys.readouterr().out.count("wrote ") == 4
    # as installed users run it, PNG this time
    out = subprocess.run([sys.executable, "-m", "kernelforge.cli", "report", str(real["ops"]),
                          "--out", str(tmp_path / "png"), "--format", "png"],
                         capture_output=True, text=True, timeout=120, cwd=REPO)
    assert out.returncode == 0, out.stderr[-3000:]
    png = tmp_path / "png" / "roofline.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in (tmp_path / "png").iterdir()] == ["roofline.png"]


def test_serving_percentiles_from_the_results_and_from_the_bench_json(real, tmp_path):
    def pooled(tok_s, ttft, itl):
        return {"output_tok_s": tok_s, "ttft_s": {"p50": ttft, "p99": 2 * ttft},
                "itl_s": {"p50": itl, "p99": 3 * itl}}
    results = {"meta": {"time": "2026-12-07T00:08:01", "cpu_count": 2, "cpu": "Test CPU 9000",
                        "rounds": 2, "max_tokens": 64, "dtype": "float32"},
               "levels": [{"concurrency": c, "requests": 8, "servers": {
                   "kernelforge": {"rounds": [], "pooled": pooled(10.0 * c, 0.1 * c, 0.05)},
                   "vllm": {"rounds": [], "pooled": pooled(8.0 * c, 0.2 * c, 0.06)}}}
                   for c in (8, 1)]}
    path = tmp_path / "serving.json"
    path.write_text(json.dumps(results))
    drawn = report.report([path], tmp_path / "a")
    thr, lat = (str(tmp_path / "a" / f"serving_{n}.svg") for n in ("throughput", "latency"))
    assert drawn[thr] == {"kernelforge": [(1, 10.0), (8, 80.0)], "vllm": [(1, 8.0), (8, 64.0)]}
    assert drawn[lat]["kernelforge ttft_s p99"] == [(1, pytest.approx(200.0)),
                                                    (8, pytest.approx(1600.0))]
    assert drawn[lat]["vllm itl_s p99"] == [(1, pytest.approx(180.0)), (8, pytest.approx(180.0))]
    svg = _svg_text(lat)
    for label in ("kernelforge p50", "vllm p99", "time to first token", "inter-token latency",
                  "Test CPU 9000, 2 CPUs; 2026-12-07", "64 tokens per request"):
        assert label in svg, label
    # test_serving_bench.py's pytest-benchmark entries: no TTFT p50 there, so no such line
    drawn = report.report([real["serving_bench"]], tmp_path / "b")
    lat = drawn[str(tmp_path / "b" / "serving_latency.svg")]
    assert "kernelforge ttft_s p50" not in lat
    assert lat["vllm itl_s p50"] == [(1, pytest.approx(100.0)), (8, pytest.approx(800.0))]
    assert drawn[str(tmp_path / "b" / "serving_throughput.svg")]["kernelforge"] == \
        [(1, 10.0), (8, 80.0)]


def _fails(argv, capsys, *expected) -> str:
    assert cli.main(["report", *map(str, argv)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    for e in expected:
        assert e in err, err
    return err


def test_bad_input_names_the_file_and_what_was_expected(real, tmp_path, capsys):
    out = ["--out", tmp_path / "out"]
    _fails([tmp_path / "nope.json", *out], capsys, "nope.json: no such file",
           "--benchmark-json")
    (tmp_path / "text.json").write_text("pytest output, not JSON\n")
    _fails([tmp_path / "text.json", *out], capsys, "text.json: not JSON", "pytest-benchmark")
    for i, other in enumerate(([1, 2], {"machine_info": {}}, {"benchmarks": "x"})):
        (tmp_path / f"other{i}.json").write_text(json.dumps(other))
        _fails([tmp_path / f"other{i}.json", *out], capsys,
               f"other{i}.json: not pytest-benchmark JSON", "'benchmarks'")
    # real pytest-benchmark JSON with nothing to chart: the copy benchmark alone
    _fails([real["copy_only"], *out], capsys, "copy_only.json: nothing to chart",
           "fraction_of_copy_bw", "tokens_per_s")
    (tmp_path / "levels.json").write_text(json.dumps({"levels": [{"servers": 3}]}))
    _fails([tmp_path / "levels.json", *out], capsys, "levels.json: unexpected layout")
    assert not (tmp_path / "out").exists()
    # a file with nothing to chart beside one with charts: left out, said so
    assert cli.main(["report", str(real["copy_only"]), str(real["ops"]), *map(str, out)]) == 0
    assert "copy_only.json: nothing to chart in it, left out" in capsys.readouterr().err


def test_without_matplotlib_it_says_what_to_install(real, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)      # import matplotlib fails
    assert cli.main(["report", str(real["ops"]), "--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == \
        "kernelforge report needs matplotlib: pip install 'kernelforge[report]'"
    assert not (tmp_path / "roofline.svg").exists()
