"""Recommendations: the memory arithmetic against hand-computed cases, the CEL rule file, the
GPU pools read from nodes, the catalog."""

from __future__ import annotations

from pathlib import Path

import pytest

from console.catalog import InvalidDataFile, ModelCard, load_catalog
from console.gpus import GpuPool, PriceTable, gpu_pools, load_prices
from console.recommend import GIB, memory_estimate, recommend
from console.rules import load_rules

# 1e9 params, 2 layers x 1 kv head x 128 dims: small numbers to do by hand
TINY = ModelCard(
    id="test/tiny",
    architecture="LlamaForCausalLM",
    params_b=1.0,
    context_length=4096,
    license="apache-2.0",
    layers=2,
    attention_heads=4,
    kv_heads=1,
    head_dim=128,
)


def pool(product: str = "G", memory: float = 4.0, count: int = 8, cc: float = 8.0) -> GpuPool:
    return GpuPool(
        product=product, memory_gib=memory, compute_capability=cc, count=count, nodes=1, hourly=1.5
    )


def test_memory_arithmetic_by_hand() -> None:
    m = memory_estimate(TINY, "bfloat16", 1024, 4, 4.0, 1, 0.9, 0.5)
    assert m.weights_gib == pytest.approx(2e9 / GIB)  # 1e9 x 2 B = 1.8626 GiB
    assert m.kv_bytes_per_token == 2 * 2 * 1 * 128 * 2 == 1024  # K,V x layers x heads x dims x 2 B
    assert m.kv_cache_gib == pytest.approx(1024 * 1024 * 4 / GIB)  # 4 MiB = 0.00390625 GiB
    assert m.overhead_gib == 0.5
    assert m.total_gib == pytest.approx(2e9 / GIB + 4 / 1024 + 0.5)  # 2.3665 GiB
    assert m.available_gib == pytest.approx(3.6)  # 4 GiB x 0.9
    assert m.fits
    assert "= 1,024 B/token x 1024 tokens x 4 sequences = 0.003906 GiB" in m.explanation

    m = memory_estimate(TINY, "int4", 4096, 256, 2.0, 2, 0.5, 0.25)
    # 0.5 B/weight: 0.4657 GiB; KV at 0.5 B: 256 B/token x 4096 x 256 = 0.25 GiB; 0.5 GiB overhead
    assert m.weights_gib == pytest.approx(0.5e9 / GIB)
    assert m.kv_cache_gib == pytest.approx(0.25)
    assert m.total_gib == pytest.approx(0.5e9 / GIB + 0.25 + 0.5)
    assert m.available_gib == pytest.approx(2.0) and m.fits

    m = memory_estimate(TINY, "float32", 4096, 1024, 4.0, 1, 0.9, 0.5)
    # 3.7253 GiB weights alone exceed 3.6 GiB
    assert not m.fits and "> 4 GiB x 0.9 x 1 GPU = 3.60 GiB" in m.explanation


def test_recommend_picks_the_smallest_tensor_parallel_that_fits() -> None:
    rules = load_rules()
    # bf16 weights 1.86 GiB + 8 MiB KV + 2 GiB overhead/GPU: 3.87 GiB > 1 x 3.6; 2 GPUs: 5.87 <= 7.2
    rec = recommend(TINY, [pool()], rules, context_length=1024, concurrency=8)
    vllm = next(o for o in rec.options if o.engine == "vllm")
    assert vllm.tensor_parallel == 2 and vllm.fits and vllm.hourly_cost == 3.0  # 2 x 1.5
    big = TINY.model_copy(update={"params_b": 40.0})  # 74.5 GiB bf16: 4 GPUs of 24 GiB
    big_rec = recommend(big, [pool(memory=24.0)], rules, context_length=1024, concurrency=1)
    disagg = next(o for o in big_rec.options if o.engine == "vllm-disaggregated")
    assert (disagg.tensor_parallel, disagg.pods, disagg.fits) == (4, 2, True)
    assert disagg.hourly_cost == 1.5 * 4 * 2  # a prefill and a decode pod of 4 GPUs each
    # 8 GPUs of this pool make one shape of 8 but not two of 8: no disaggregated tp=8
    big_rec = recommend(big, [pool(memory=12.0)], rules, context_length=1024, concurrency=1)
    disagg = next(o for o in big_rec.options if o.engine == "vllm-disaggregated")
    assert disagg.tensor_parallel == 8 and "prefill and decode need" in " ".join(disagg.reasons)
    assert rec.best is not None and rec.best.tensor_parallel == 2
    # a context longer than the model's is not offered
    rec = recommend(TINY, [pool()], rules, context_length=8192, concurrency=1)
    assert rec.best is None
    assert any("at most 4096 tokens" in r for o in rec.options for r in o.reasons)


def test_cel_rules_decide_the_engines(tmp_path: Path) -> None:
    rules = tmp_path / "rules.yaml"
    rules.write_text(
        """
memory: {gpu_memory_utilization: 1.0, overhead_gib_per_gpu: 0}
engines:
  - name: big-gpus-only
    backend_type: vLLM
    requires:
      - rule: "gpu.memory_gib >= 40.0"
        message: "needs 40 GiB GPUs"
    score: "1"
  - name: any
    backend_type: SGLang
    requires:
      - rule: "model.attention_heads % shape.tensor_parallel == 0 && gpu.compute_capability >= 7.5"
        message: "heads or compute capability"
    score: "model.params_b < 5.0 ? 3 : 0"
"""
    )
    loaded = load_rules(rules)
    rec = recommend(TINY, [pool(memory=24.0)], loaded, context_length=1024, concurrency=1)
    by_engine = {o.engine: o for o in rec.options}
    assert not by_engine["big-gpus-only"].fits
    assert by_engine["big-gpus-only"].reasons == ["needs 40 GiB GPUs"]
    assert by_engine["any"].fits and by_engine["any"].score == 3
    assert rec.best is not None and rec.best.engine == "any"
    rec = recommend(TINY, [pool(memory=24.0, cc=7.0)], loaded, context_length=1024, concurrency=1)
    assert rec.best is None
    assert {r for o in rec.options for r in o.reasons} == {
        "needs 40 GiB GPUs",
        "heads or compute capability",
    }


def test_a_bad_rule_file_names_the_engine_and_rule(tmp_path: Path) -> None:
    bad = tmp_path / "rules.yaml"
    bad.write_text("engines:\n  - {name: e, backend_type: vLLM, requires: [{rule: 'gpu.x >'}]}\n")
    with pytest.raises(InvalidDataFile, match=r"engines\[0\] \(e\)\.requires\[0\]: invalid CEL"):
        load_rules(bad)
    bad.write_text("engines:\n  - {name: e, backend_type: vLLM, colour: red}\n")
    with pytest.raises(InvalidDataFile, match=r"engines\.0\.colour: Extra inputs"):
        load_rules(bad)
    bad.write_text("engines:\n  - {name: e, backend_type: vLLM, requires: [{rule: 'nope.x'}]}\n")
    loaded = load_rules(bad)
    with pytest.raises(InvalidDataFile, match=r"engine e: rule 'nope\.x' failed"):
        recommend(TINY, [pool()], loaded)


def test_gpu_pools_from_node_labels_and_allocatable() -> None:
    prices = PriceTable.model_validate(
        {"gpus": {"NVIDIA-L4": {"memory_gib": 24, "compute_capability": 8.9, "hourly": 0.7}}}
    )
    nodes = [
        {"metadata": {"labels": {"nvidia.com/gpu.product": "NVIDIA-L4"}},
         "status": {"allocatable": {"nvidia.com/gpu": "2"}}},
        {"metadata": {"labels": {"nvidia.com/gpu.product": "Mystery",
                                 "nvidia.com/gpu.memory": "16384"}},
         "status": {"allocatable": {"nvidia.com/gpu": "1"}}},
        {"metadata": {"labels": {"nvidia.com/gpu.product": "Unknown"}},
         "status": {"allocatable": {"nvidia.com/gpu": "1"}}},  # memory unknown: left out
        {"metadata": {"labels": {}}, "status": {"allocatable": {"cpu": "8"}}},  # no GPUs
    ]  # fmt: skip
    pools = gpu_pools(nodes, prices)
    assert [(p.product, p.memory_gib, p.count, p.hourly) for p in pools] == [
        ("Mystery", 16.0, 1, None),
        ("NVIDIA-L4", 24.0, 2, 0.7),
    ]


def test_packaged_data_files_load() -> None:
    catalog = load_catalog()
    card = catalog.get("hf://meta-llama/Llama-3.1-8B-Instruct")
    assert card is not None and card.kv_heads == 8 and card.lora
    assert "NVIDIA-H100-80GB-HBM3" in load_prices().gpus
    assert [e.name for e in load_rules().engines] == ["vllm", "sglang", "vllm-disaggregated"]
