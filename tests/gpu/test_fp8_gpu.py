"""FP8 checkpoints on the GPU (issue 12): the kernels against their torch arithmetic, then the
native engine on a random Qwen3-0.6B-shaped model written in both FP8 formats
(bench/fp8_model.py) against transformers on the same weights dequantized to bf16; sleep,
wake and an engine-image restore give identical tokens; the image holds the FP8 bytes.

Tolerance of the logits, FP8 model vs bf16 on the dequantized weights: relative L2 error
< 0.15 and cosine > 0.985 at every compared position. Only the activations differ (rounded
to e4m3 per token at every GEMM: ~3 % each); on the CPU, in fp32, the same model measured
7.7 % (block) / 8.4 % (channel), min cosine 0.995 (tests/unit/engines/native/test_fp8.py),
and bf16 adds ~2 % here (tests/gpu/test_gpu_engine.py allows 2e-2 for bf16 alone).
"""

from __future__ import annotations

import gc
import sys
from pathlib import Path

import pytest
import torch

from dormant.engines.native.core.quantization import (
    BLOCK_FP8, CHANNEL_FP8, dequantize_weight, quantize_activation, quantize_weight, read_fp8_format,
)

ROOT = Path(__file__).resolve().parents[2]
MAX_REL_ERR, MIN_COS = 0.15, 0.985
TIE = 0.25  # logit gap under which the decode and prefill paths may pick either token


def _cuda():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU (torch.cuda.is_available() is False)")
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("FP8 GEMMs need compute capability 8.9+")


# -- kernels ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("group", [128, 1024, 3072, 4096])
def test_activation_quantization_matches_torch(group):
    _cuda()
    from dormant.engines.native.kernels.triton_fp8 import quantize_rows

    x = (torch.randn(37, 12288 if group != 3072 else 3072, device="cuda") * 4).to(torch.bfloat16)
    x[5] = 0
    q, s = quantize_rows(x, group)
    rq, rs = quantize_activation(x, group)
    torch.testing.assert_close(s, rs, rtol=1e-6, atol=0)
    assert (q.float() != rq.float()).float().mean() < 1e-4  # x / scale may differ by an ulp at a tie


@pytest.mark.parametrize("fmt", [BLOCK_FP8, CHANNEL_FP8], ids=["block", "channel"])
@pytest.mark.parametrize("m", [1, 3, 16, 17, 64, 65, 300, 2048])
def test_fp8_linear_matches_its_arithmetic(fmt, m):
    """...on the 8B shape's qkv: the activations quantized as quantize_activation does, but
    where this GPU's table serves the weight-only GEMV (one row), x as it is."""
    _cuda()
    from dormant.engines.native.kernels.fp8_linear import _device_name, fp8_linear
    from dormant.engines.native.kernels.gemv_table import gemv_config

    g = torch.Generator(device="cuda").manual_seed(m)
    n, k = 6144, 4096
    w = torch.randn(n, k, device="cuda", generator=g) * 0.02
    x = torch.randn(m, k, device="cuda", generator=g).to(torch.bfloat16)
    wq, ws = quantize_weight(w, fmt)
    out = fp8_linear(x, wq, ws, fmt)
    served = gemv_config(m, n, k, fmt.block is None, _device_name(0))
    if served is not None and served.a16:
        ref = x.float() @ dequantize_weight(wq, ws, fmt).t()
    else:
        xq, xs = quantize_activation(x, fmt.block or k)
        group = fmt.block or k
        ref = (xq.float().view(m, -1, group) * xs.unsqueeze(-1)).view(m, k) @ dequantize_weight(wq, ws, fmt).t()
    err = float((out.float() - ref).norm() / ref.norm())
    assert out.dtype == torch.bfloat16 and err < 1e-2, f"relative error {err:.2e}"


@pytest.mark.parametrize("fmt", [BLOCK_FP8, CHANNEL_FP8], ids=["block", "channel"])
@pytest.mark.parametrize("use_dot, block_n, block_k, split_k, a16", [
    (False, 16, 512, 2, False), (False, 8, 1024, 4, False), (True, 32, 256, 4, False), (True, 64, 512, 1, False),
    (False, 16, 512, 4, True), (False, 8, 256, 1, True)])
def test_fp8_gemv_configs_match_and_replay_in_a_cuda_graph(fmt, use_dot, block_n, block_k, split_k, a16):
    """Each path of the decode GEMV (FMAs or tl.dot, split over K or not; the weight-only
    kernel, one row) on the 8B shape's o_proj and down_proj widths against its arithmetic,
    then replayed in a CUDA graph: the split-K tickets reset themselves, so every replay gives
    the same bits as the eager call."""
    _cuda()
    from dormant.engines.native.kernels.triton_fp8 import GemvConfig, fp8_gemv

    config = GemvConfig(use_dot, block_n, block_k, split_k, a16=a16)
    for m, n, k in ((1, 4096, 4096), (4, 4056, 12288), (16, 6144, 4096), (1, 4056, 12288)):
        if a16 and m != 1:
            continue
        g = torch.Generator(device="cuda").manual_seed(m)
        w = torch.randn(n, k, device="cuda", generator=g) * 0.02
        x = torch.randn(m, k, device="cuda", generator=g).to(torch.bfloat16)
        wq, ws = quantize_weight(w, fmt)
        out = fp8_gemv(x, wq, ws, fmt.block is None, config)
        group = fmt.block or k
        xq, xs = quantize_activation(x, group)
        xd = x.float() if a16 else (xq.float().view(m, -1, group) * xs.unsqueeze(-1)).view(m, k)
        ref = xd @ dequantize_weight(wq, ws, fmt).t()
        err = float((out.float() - ref).norm() / ref.norm())
        assert err < (4e-3 if a16 else 1e-2), f"M={m} N={n} K={k}: relative error {err:.2e}"
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            replayed = fp8_gemv(x, wq, ws, fmt.block is None, config)
        for _ in range(3):
            graph.replay()
            torch.cuda.synchronize()
            assert torch.equal(replayed, out), f"M={m} N={n} K={k}: a replay differs from the eager call"


# -- the engine ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def bf16_dir(tmp_path_factory):
    _cuda()
    sys.path.insert(0, str(ROOT / "bench"))
    from random_model import make_random_model

    return make_random_model(ROOT / "bench/configs/qwen3-0.6b.json", tmp_path_factory.mktemp("qwen3-0.6b"))


@pytest.fixture(scope="module", params=["block", "channel"])
def fp8_dir(request, bf16_dir, tmp_path_factory):
    from fp8_model import make_fp8_model

    return make_fp8_model(bf16_dir, tmp_path_factory.mktemp(f"qwen3-0.6b-{request.param}"), request.param, device="cuda")


PROMPTS = [[11, 2024, 7, 99, 31337], list(range(1000, 1130)), [5] * 40, [42]]


@pytest.fixture(scope="module")
def reference(bf16_dir, fp8_dir):
    """transformers (bf16) on the FP8 weights dequantized: last-position logits of each prompt."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    fmt = read_fp8_format(fp8_dir)
    model = AutoModelForCausalLM.from_pretrained(bf16_dir, dtype=torch.bfloat16, attn_implementation="sdpa").cuda()
    params = dict(model.named_parameters())
    with torch.no_grad():
        for shard in fp8_dir.glob("*.safetensors"):
            with safe_open(str(shard), framework="pt", device="cuda") as f:
                for name in f.keys():
                    if name.endswith(".weight") and name in params and f.get_tensor(name).dtype == torch.float8_e4m3fn:
                        scale = f.get_tensor(name.removesuffix("weight") + fmt.scale_suffix)
                        params[name].copy_(dequantize_weight(f.get_tensor(name), scale, fmt))
    out = []
    with torch.inference_mode():
        for p in PROMPTS:
            out.append(model(torch.tensor([p], device="cuda")).logits[0, -1].float().cpu())
    del model, params
    gc.collect()
    torch.cuda.empty_cache()
    return out


@pytest.fixture(scope="module")
def engine(fp8_dir, tmp_path_factory):
    import os

    from dormant.engines.native.core.config import EngineConfig
    from dormant.engines.native.core.llm_engine import LLMEngine

    old_home = os.environ.get("DORMANT_HOME")
    os.environ["DORMANT_HOME"] = str(tmp_path_factory.mktemp("home"))  # its engine image goes there
    config = EngineConfig.from_args(fp8_dir, {"device": "cuda", "kv_cache_tokens": 16384, "max_num_seqs": 8,
                                              "cuda_graph_batch_sizes": [1, 2, 4, 8]})
    engine = LLMEngine(config)
    yield engine
    engine.model_runner.arena.close()
    if old_home is None:
        os.environ.pop("DORMANT_HOME", None)
    else:
        os.environ["DORMANT_HOME"] = old_home
    del engine
    gc.collect()
    torch.cuda.empty_cache()


def _prefill_logits(engine, tokens: list[int]) -> torch.Tensor:
    from dormant.engines.base import SamplingParams
    from dormant.engines.native.core.sequence import Sequence

    seq = Sequence("x", tokens, SamplingParams(temperature=0, max_tokens=1, ignore_eos=True))
    engine.scheduler.block_manager.allocate(seq)
    seq.num_scheduled_tokens = seq.num_tokens - seq.num_computed_tokens
    try:
        return engine.model_runner._forward_packed([seq])[0].float().cpu()
    finally:
        engine.scheduler.block_manager.free(seq)


def _greedy(n):
    from dormant.engines.base import SamplingParams

    return SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)


def test_weights_are_fp8_in_the_arena(engine, fp8_dir, bf16_dir):
    runner = engine.model_runner
    layer = runner.model.layers[0]
    assert runner.quant == read_fp8_format(fp8_dir)
    assert layer.qkv_proj.dtype == torch.float8_e4m3fn and layer.qkv_proj_scale.dtype == torch.float32
    assert layer.qkv_proj.data_ptr() - runner.arena.ptr < runner.weights_bytes  # a view of the arena
    bf16_bytes = sum(f.stat().st_size for f in bf16_dir.glob("*.safetensors"))
    print(f"weights in the arena: {runner.weights_bytes} bytes, the bf16 checkpoint {bf16_bytes}")
    # 0.6B ties its 0.3 GB of embeddings (bf16 either way): 0.69 of the bf16 bytes, not 0.5
    assert runner.weights_bytes < 0.75 * bf16_bytes


def test_prefill_logits_within_tolerance_of_bf16_on_dequantized_weights(engine, reference):
    for p, ref in zip(PROMPTS, reference):
        ours = _prefill_logits(engine, p)
        err = float((ours - ref).norm() / ref.norm())
        cos = float(torch.nn.functional.cosine_similarity(ours, ref, dim=0))
        print(f"prompt of {len(p)}: relative logit error {err:.3e}, cosine {cos:.4f}")
        assert err < MAX_REL_ERR and cos > MIN_COS, f"prompt of {len(p)}: error {err:.3e}, cosine {cos:.4f}"


def test_decode_graphs_agree_with_prefill(engine):
    """Greedy tokens through the decode CUDA graphs (batch 1 and 4) are the argmax of the
    engine's own prefill logits over the same context, up to a near-tie."""
    for outs, prompts in ((engine.generate([PROMPTS[0]], _greedy(12)), [PROMPTS[0]]),
                          (engine.generate(PROMPTS, _greedy(12)), PROMPTS)):
        for prompt, tokens in zip(prompts, outs):
            for i, tok in enumerate(tokens):
                logits = _prefill_logits(engine, prompt + tokens[:i])
                best = int(logits.argmax())
                if best != tok:
                    gap = float(logits[best] - logits[tok])
                    assert gap < TIE, f"token {i}: decode {tok}, prefill {best}, gap {gap:.3f}"
                    break
    assert engine.model_runner.num_decode_graph_steps > 0


@pytest.mark.parametrize("level", [1, 2])
def test_sleep_wake_gives_identical_tokens(engine, level):
    engine.scheduler.block_manager.reset_prefix_cache()
    before = engine.generate(PROMPTS, _greedy(16))
    engine.sleep(level)
    assert engine.is_sleeping and engine.model_runner.arena.mapped_bytes == 0
    engine.wake_up()
    assert engine.generate(PROMPTS, _greedy(16)) == before


@pytest.mark.timeout(600)
def test_image_restore_gives_identical_tokens_and_holds_fp8_bytes(fp8_dir, tmp_path, monkeypatch):
    from dormant.engines.native.core.config import EngineConfig
    from dormant.engines.native.core.llm_engine import LLMEngine

    monkeypatch.setenv("DORMANT_HOME", str(tmp_path))

    def start():
        config = EngineConfig.from_args(fp8_dir, {"device": "cuda", "kv_cache_tokens": 8192, "max_num_seqs": 4,
                                                  "cuda_graph_batch_sizes": [1, 2, 4]})
        engine = LLMEngine(config)
        runner = engine.model_runner
        try:
            outs = engine.generate(PROMPTS, _greedy(16))
            runner.save_image()
            return runner.weights_source, outs, runner.weights_bytes, runner.image.image.data_path
        finally:
            runner.arena.close()
            del engine, runner
            gc.collect()
            torch.cuda.empty_cache()

    source, expected, weights_bytes, data = start()
    assert source == "safetensors"
    print("image:", data, data.stat().st_size, "bytes; weights", weights_bytes)
    assert weights_bytes <= data.stat().st_size < weights_bytes + (64 << 20)
    source, outs, _, _ = start()
    assert (source, outs) == ("image", expected)
