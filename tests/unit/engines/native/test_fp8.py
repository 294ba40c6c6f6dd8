"""FP8 checkpoints on the CPU (issue 12): the formats read from quantization_config (and the
configs refused, by key), the quantize / dequantize arithmetic, bench/fp8_model.py's
checkpoints loaded into the compact decoder (scales fused across q/k/v and gate/up), its
forward against a forward on the dequantized weights, the refusals of the CPU engine and of
mismatched weights, and the Triton kernels through Triton's interpreter where triton is
installed. The GPU half is tests/gpu/test_fp8_gpu.py."""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import pytest
import torch

from dormant.engines.native.core.quantization import (
    BLOCK_FP8, CHANNEL_FP8, FP8_DTYPE, UnsupportedQuantization, dequantize_weight, fp8_format, quantize_activation,
    quantize_weight, read_fp8_format,
)

ROOT = Path(__file__).resolve().parents[4]
sys.path.insert(0, str(ROOT / "bench"))
from fp8_model import QUANTIZATION_CONFIGS, make_fp8_model  # noqa: E402

# head_dim 128 and intermediate 384: every fused part a whole number of 128-row blocks
TINY = {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "hidden_size": 256, "intermediate_size": 384,
        "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 128,
        "vocab_size": 320, "max_position_embeddings": 512, "rms_norm_eps": 1e-6, "rope_theta": 1000000,
        "tie_word_embeddings": False, "eos_token_id": 1, "torch_dtype": "bfloat16"}


# -- formats ---------------------------------------------------------------------------------------

def test_formats_are_read_from_quantization_config():
    assert fp8_format(None) is None
    assert fp8_format(QUANTIZATION_CONFIGS["block"]) == BLOCK_FP8
    assert fp8_format(QUANTIZATION_CONFIGS["channel"]) == CHANNEL_FP8
    assert BLOCK_FP8.scale_shape(6144, 4096) == (48, 32) and CHANNEL_FP8.scale_shape(6144, 4096) == (6144, 1)


def _with(fmt: str, path: str, value) -> dict:
    qc = copy.deepcopy(QUANTIZATION_CONFIGS[fmt])
    *parents, last = path.split(".")
    node = qc
    for p in parents:
        node = node[p]
    node[last] = value
    return qc


@pytest.mark.parametrize("qc, key", [
    ({"quant_method": "gptq", "bits": 4}, "quant_method"),
    (_with("block", "weight_block_size", None), "weight_block_size"),  # per-tensor FP8
    (_with("block", "weight_block_size", [64, 64]), "weight_block_size"),
    (_with("block", "activation_scheme", "static"), "activation_scheme"),
    (_with("block", "fmt", "e5m2"), "fmt"),
    (_with("block", "modules_to_not_convert", ["model.layers.0.mlp.down_proj"]), "modules_to_not_convert"),
    (_with("channel", "format", "pack-quantized"), "format"),
    (_with("channel", "config_groups.group_0.weights.strategy", "tensor"), "config_groups.group_0.weights.strategy"),
    (_with("channel", "config_groups.group_0.weights.num_bits", 4), "config_groups.group_0.weights.num_bits"),
    (_with("channel", "config_groups.group_0.input_activations", None), "config_groups.group_0.input_activations"),
    (_with("channel", "config_groups.group_0.input_activations.dynamic", False),
     "config_groups.group_0.input_activations.dynamic"),
    (_with("channel", "ignore", ["lm_head", "model.layers.3.self_attn.q_proj"]), "ignore"),
])
def test_unsupported_configs_are_refused_naming_the_key(qc, key):
    with pytest.raises(UnsupportedQuantization, match=f"quantization_config.{key} "):
        fp8_format(qc)


# -- arithmetic ------------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", [BLOCK_FP8, CHANNEL_FP8])
def test_quantize_dequantize_round_trip(fmt):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(384, 256, generator=g) * torch.logspace(-3, 0, 384).unsqueeze(1)  # rows of many sizes
    q, scale = quantize_weight(w, fmt)
    assert q.dtype == FP8_DTYPE and scale.dtype == torch.float32 and tuple(scale.shape) == fmt.scale_shape(384, 256)
    back = dequantize_weight(q, scale, fmt)
    assert ((back - w).norm() / w.norm()) < 0.03  # e4m3: 3 mantissa bits, <= 1/16 per element
    # the largest magnitude of each block / row maps to 448 exactly and comes back exactly
    worst = (back - w).abs().max(dim=1).values / w.abs().max(dim=1).values
    assert worst.max() < 1 / 16
    assert float(q.float().abs().max()) == 448.0


def test_block_scales_cover_ragged_edges():
    w = torch.randn(200, 130)
    q, scale = quantize_weight(w, BLOCK_FP8)
    assert tuple(scale.shape) == (2, 2)
    assert ((dequantize_weight(q, scale, BLOCK_FP8) - w).norm() / w.norm()) < 0.03


def test_activation_quantization_per_token_and_per_group():
    x = torch.randn(5, 256, dtype=torch.bfloat16)
    x[2] = 0  # a zero row gets the minimum scale, not a division by zero
    for group in (128, 256):
        q, s = quantize_activation(x, group)
        assert q.dtype == FP8_DTYPE and tuple(s.shape) == (5, 256 // group)
        back = (q.float().view(5, -1, group) * s.unsqueeze(-1)).view(5, 256)
        assert torch.isfinite(back).all() and back[2].abs().max() == 0
        assert ((back - x.float()).norm() / x.float().norm()) < 0.03


# -- checkpoints and the compact decoder ---------------------------------------------------------

@pytest.fixture(scope="module")
def bf16_dir(tmp_path_factory):
    from random_model import make_random_model

    cfg = tmp_path_factory.mktemp("cfg") / "config.json"
    cfg.write_text(json.dumps(TINY))
    return make_random_model(cfg, tmp_path_factory.mktemp("tiny-bf16"), device="cpu")


@pytest.fixture(scope="module", params=["block", "channel"])
def fp8_dir(request, bf16_dir, tmp_path_factory):
    return request.param, make_fp8_model(bf16_dir, tmp_path_factory.mktemp(f"tiny-{request.param}"), request.param)


def test_checkpoint_names_dtypes_and_config(fp8_dir):
    from safetensors import safe_open

    kind, path = fp8_dir
    fmt = read_fp8_format(path)
    assert fmt.kind == kind
    [shard] = path.glob("*.safetensors")
    with safe_open(str(shard), framework="pt") as f:
        names = set(f.keys())
        q = f.get_tensor("model.layers.0.self_attn.k_proj.weight")
        s = f.get_tensor(f"model.layers.0.self_attn.k_proj.{fmt.scale_suffix}")
        assert f.get_tensor("lm_head.weight").dtype == torch.bfloat16
        assert f.get_tensor("model.layers.0.input_layernorm.weight").dtype == torch.bfloat16
    assert q.dtype == FP8_DTYPE and tuple(q.shape) == (128, 256)
    assert tuple(s.shape) == ((1, 2) if kind == "block" else (128, 1))
    assert s.dtype == (torch.float32 if kind == "block" else torch.bfloat16)
    assert not any(n.endswith("input_scale") for n in names)
    scales = [n for n in names if n.endswith(fmt.scale_suffix)]
    assert len(scales) == 7 * TINY["num_hidden_layers"]


def _hf_config(path):
    from transformers import AutoConfig

    cfg = copy.deepcopy(AutoConfig.from_pretrained(path))
    if hasattr(cfg, "quantization_config"):
        delattr(cfg, "quantization_config")
    return cfg


def _load(path, quant, dtype=torch.float32):
    from dormant.engines.native.core.checkpoint import copy_checkpoint
    from dormant.engines.native.cuda.compact_decoder import CompactDecoder

    cfg = _hf_config(path)
    model = CompactDecoder(cfg, dtype, quant).eval()
    copy_checkpoint(path, model.checkpoint_tensors())
    model.build_rope(cfg.max_position_embeddings, "cpu", dtype)
    return model


def _dequantized(path, fmt):
    """The same model in fp32 with every FP8 weight dequantized (what the FP8 model approximates)."""
    from safetensors.torch import load_file

    state = load_file(str(next(path.glob("*.safetensors"))))
    out = {}
    for name, t in state.items():
        if name.endswith(fmt.scale_suffix):
            continue
        if t.dtype == FP8_DTYPE:
            t = dequantize_weight(t, state[name.removesuffix("weight") + fmt.scale_suffix], fmt)
        out[name] = t.float()
    return out


@pytest.mark.timeout(120)
def test_a_random_fp8_model_made_directly_equals_the_quantized_bf16_one(fp8_dir, tmp_path):
    """make_random_fp8_model (bench_scale's 32B, which has no room for a bf16 folder): the same
    seed gives the tensors bf16 -> make_fp8_model gives, over several shards, with the same
    config and a tokenizer."""
    from safetensors.torch import load_file

    from fp8_model import make_random_fp8_model

    fmt, made = fp8_dir
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps(TINY))
    direct = make_random_fp8_model(cfg, tmp_path / "direct", fmt, device="cpu", shard_bytes=1 << 20)

    def tensors(folder: Path) -> dict:
        out = {}
        for shard in folder.glob("*.safetensors"):
            out.update(load_file(shard))
        return out

    assert len(list(direct.glob("*.safetensors"))) > 1
    ours, theirs = tensors(direct), tensors(made)
    assert ours.keys() == theirs.keys()
    for name, t in theirs.items():
        assert ours[name].dtype == t.dtype and torch.equal(ours[name].view(torch.uint8), t.view(torch.uint8)), name
    index = json.loads((direct / "model.safetensors.index.json").read_text())["weight_map"]
    assert set(index) == set(ours)
    assert json.loads((direct / "config.json").read_text()) == json.loads((made / "config.json").read_text())
    assert (direct / "tokenizer.json").is_file()


def test_loader_fuses_weights_and_scales(fp8_dir):
    kind, path = fp8_dir
    fmt = read_fp8_format(path)
    model = _load(path, fmt)
    ref = _dequantized(path, fmt)
    layer = model.layers[1]
    assert layer.qkv_proj.dtype == FP8_DTYPE and layer.qkv_proj_scale.dtype == torch.float32
    assert tuple(layer.qkv_proj_scale.shape) == ((4, 2) if kind == "block" else (512, 1))
    p = "model.layers.1."
    fused = {"qkv": (layer.qkv_proj, layer.qkv_proj_scale, ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]),
             "gate_up": (layer.gate_up_proj, layer.gate_up_proj_scale, ["mlp.gate_proj", "mlp.up_proj"]),
             "down": (layer.down_proj, layer.down_proj_scale, ["mlp.down_proj"])}
    for name, (w, scale, parts) in fused.items():
        expected = torch.cat([ref[f"{p}{part}.weight"] for part in parts])
        assert torch.equal(dequantize_weight(w, scale, fmt), expected), name
    assert model.lm_head.weight.dtype == torch.float32


def _forward(model, tokens):
    from dormant.engines.native.cuda.attention import PREFILL_BLOCK_M, GPUAttentionMetadata

    cfg = model.config
    n, block = len(tokens), 16
    caches = [(torch.zeros(64 * block, cfg.num_key_value_heads, 128), torch.zeros(64 * block, cfg.num_key_value_heads, 128))
              for _ in range(cfg.num_hidden_layers)]
    starts = list(range(0, n, PREFILL_BLOCK_M))
    meta = GPUAttentionMetadata(
        is_prefill=True, slot_mapping=torch.arange(n), kv_caches=caches, block_size=block, num_decodes=0,
        block_tables=torch.arange(64, dtype=torch.int32)[None], context_lens=torch.zeros(0, dtype=torch.int32),
        prefill_blocks=(torch.zeros(len(starts), dtype=torch.long), torch.tensor(starts),
                        torch.tensor([min(s + PREFILL_BLOCK_M, n) for s in starts])))
    with torch.no_grad():
        return model(torch.tensor(tokens), torch.arange(n), meta)


def test_fp8_forward_close_to_the_dequantized_model(fp8_dir):
    """The FP8 model (activations quantized per token / group, as on the GPU) against fp32 on
    the dequantized weights: the only difference is the activations' FP8 rounding."""
    from dormant.engines.native.cuda.compact_decoder import CompactDecoder

    kind, path = fp8_dir
    fmt = read_fp8_format(path)
    ours = _load(path, fmt)
    cfg = _hf_config(path)
    ref = CompactDecoder(cfg).eval()
    state = _dequantized(path, fmt)
    with torch.no_grad():
        for name, view in ref.checkpoint_tensors().items():
            view.copy_(state[name])
    ref.build_rope(cfg.max_position_embeddings, "cpu", torch.float32)
    tokens = torch.randint(0, TINY["vocab_size"], (40,), generator=torch.Generator().manual_seed(3)).tolist()
    a, b = _forward(ours, tokens), _forward(ref, tokens)
    err = float((a - b).norm() / b.norm())
    cos = float(torch.nn.functional.cosine_similarity(a, b, dim=-1).min())
    # Rounding each activation to e4m3 (3 mantissa bits) costs ~3 % per GEMM; measured here
    # 5.4 % (block) and 5.6 % (channel), and 7.7 % / 8.4 % (min cosine 0.995) on the full
    # 28-layer Qwen3-0.6B shape (tests/gpu/test_fp8_gpu.py's tolerance comes from those)
    assert err < 0.08 and cos > 0.99, f"{kind}: relative logit error {err:.3e}, min cosine {cos:.4f}"


def test_mismatched_weights_and_shapes_are_refused(fp8_dir, bf16_dir):
    from dormant.engines.native.core.checkpoint import copy_checkpoint
    from dormant.engines.native.cuda.compact_decoder import CompactDecoder

    kind, path = fp8_dir
    fmt = read_fp8_format(path)
    bf16_model = CompactDecoder(_hf_config(path), torch.bfloat16)
    with pytest.raises(ValueError, match="_proj.weight is torch.float8_e4m3fn, the model expects torch.bfloat16"):
        copy_checkpoint(path, bf16_model.checkpoint_tensors())
    fp8_model = CompactDecoder(_hf_config(path), torch.bfloat16, fmt)
    with pytest.raises(ValueError, match="the model expects torch.float8_e4m3fn"):
        copy_checkpoint(bf16_dir, {k: v for k, v in fp8_model.checkpoint_tensors().items() if "scale" not in k})
    odd = _hf_config(path)
    odd.intermediate_size = 200
    if kind == "block":
        with pytest.raises(UnsupportedQuantization, match="intermediate_size\\) = 200 is not a multiple of 128"):
            CompactDecoder(odd, torch.bfloat16, fmt)


def test_cpu_engine_refuses_fp8_checkpoints(fp8_dir):
    from dormant.engines.native.cpu.model_loader import load_model

    _, path = fp8_dir
    with pytest.raises(UnsupportedQuantization, match="CPU engine runs bf16/fp32 weights only; serve it with device: cuda"):
        load_model(path, "bfloat16", 16)


def test_image_layout_records_fp8_bytes(fp8_dir):
    """The engine image holds the arena's raw bytes; its layout names each tensor's dtype, so
    an FP8 image can never restore into a bf16 model's arena or the other way round."""
    from dormant.engines.native.core.engine_image import layout_of
    from dormant.engines.native.cuda.compact_decoder import CompactDecoder

    _, path = fp8_dir
    with torch.device("meta"):
        model = CompactDecoder(_hf_config(path), torch.bfloat16, read_fp8_format(path))
    named = list(model.named_parameters())
    layout = layout_of(named, list(range(len(named))), 0)["params"]
    assert layout["layers.0.qkv_proj"]["dtype"] == "float8_e4m3fn"
    assert layout["layers.0.qkv_proj_scale"]["dtype"] == "float32"
    assert layout["lm_head.weight"]["dtype"] == "bfloat16"
    fp8_bytes = sum(p.numel() * p.element_size() for _, p in named)
    with torch.device("meta"):
        bf16_bytes = sum(p.numel() * p.element_size() for p in CompactDecoder(_hf_config(path), torch.bfloat16).parameters())
    assert fp8_bytes < bf16_bytes


# -- the Triton kernels, interpreted on the CPU ----------------------------------------------------

@pytest.fixture
def interpreted_triton(monkeypatch):
    if torch.cuda.is_available():  # triton compiles for the GPU there, and CPU tensors are refused
        pytest.skip("a GPU is here: tests/gpu/test_fp8_gpu.py runs these kernels compiled")
    if "triton" in sys.modules and "dormant.engines.native.kernels.triton_fp8" not in sys.modules:
        pytest.skip("triton was imported before TRITON_INTERPRET could be set (run this file alone)")
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # read when triton is first imported
    pytest.importorskip("triton", reason="triton is not installed (the GPU machine runs these kernels compiled)")
    import triton.language as tl
    from triton.runtime import interpreter

    import dormant.engines.native.kernels.triton_fp8 as mod

    # Triton 3.6's interpreter rounds float32 -> float8e4nv wrongly (the carry out of the
    # mantissa is dropped: 124.3 became 64), so interpreted, the kernels' casts go through
    # torch's (round to nearest even, as the GPU's cvt.rn does); the GPU tests check the real ones
    convert = interpreter._convert_float

    def torch_convert(data, input_dtype, output_dtype, rounding_mode):
        if input_dtype == tl.float32 and output_dtype == tl.float8e4nv:
            return torch.from_numpy(data.astype("float32")).to(FP8_DTYPE).view(torch.uint8).numpy()
        return convert(data, input_dtype, output_dtype, rounding_mode)

    monkeypatch.setattr(interpreter, "_convert_float", torch_convert)

    # and a runtime scalar (a kernel's int argument, or a value computed from one) is a
    # 1-element array there, which NumPy >= 2.3 refuses to int(): `range(0, K, ...)` over
    # fp8_gemv's runtime K would fail; read its one element instead
    patch_tensor = interpreter._patch_lang_tensor

    def patch_tensor_index(tensor, scope):
        patch_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    monkeypatch.setattr(interpreter, "_patch_lang_tensor", patch_tensor_index)
    return mod


@pytest.mark.parametrize("group", [128, 384, 2304])
def test_triton_activation_quantization_matches_torch(interpreted_triton, group):
    k = 2304
    x = (torch.randn(3, k) * 3).to(torch.bfloat16)
    q, s = interpreted_triton.quantize_rows(x, group)
    rq, rs = quantize_activation(x, group)
    torch.testing.assert_close(s, rs, rtol=1e-6, atol=0)
    assert torch.equal(q.view(torch.uint8), rq.view(torch.uint8))


@pytest.mark.parametrize("m, n", [(1, 384), (20, 256), (70, 640)])
def test_triton_block_gemm_matches_reference(interpreted_triton, m, n):
    g = torch.Generator().manual_seed(m)
    w, x = torch.randn(n, 256, generator=g), torch.randn(m, 256, generator=g).to(torch.bfloat16)
    wq, ws = quantize_weight(w, BLOCK_FP8)
    xq, xs = quantize_activation(x, 128)
    out = interpreted_triton.block_fp8_gemm(xq, xs, wq, ws, torch.float32)
    xd = (xq.float().view(m, 2, 128) * xs.unsqueeze(-1)).view(m, 256)
    ref = xd @ dequantize_weight(wq, ws, BLOCK_FP8).t()
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("fmt", [BLOCK_FP8, CHANNEL_FP8], ids=["block", "channel"])
@pytest.mark.parametrize("m, n", [(1, 384), (5, 256), (20, 640)])
def test_triton_fused_gemm_matches_reference(interpreted_triton, fmt, m, n):
    """Decode's kernel: activations quantized inside the GEMM, as quantize_activation does."""
    g = torch.Generator().manual_seed(m)
    k = 384
    w, x = torch.randn(n, k, generator=g), torch.randn(m, k, generator=g).to(torch.bfloat16)
    x[0, :7] = 0
    wq, ws = quantize_weight(w, fmt)
    out = interpreted_triton.fused_fp8_gemm(x, wq, ws, per_token=fmt.block is None)
    group = fmt.block or k
    xq, xs = quantize_activation(x, group)
    ref = (xq.float().view(m, -1, group) * xs.unsqueeze(-1)).view(m, k) @ dequantize_weight(wq, ws, fmt).t()
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, rtol=1e-2, atol=1e-2)


GEMV_CONFIGS = {  # (K, config): each path of fp8_gemv, K one step or several, split or not
    "fma-k128": (128, dict(use_dot=False, block_n=16, block_k=128, split_k=1)),
    "fma-k512-split2": (512, dict(use_dot=False, block_n=16, block_k=256, split_k=2)),
    "fma-k768-split3": (768, dict(use_dot=False, block_n=32, block_k=128, split_k=3)),
    "dot-k128": (128, dict(use_dot=True, block_n=32, block_k=128, split_k=1)),
    "dot-k512-split2": (512, dict(use_dot=True, block_n=32, block_k=128, split_k=2)),
}


@pytest.mark.parametrize("fmt", [BLOCK_FP8, CHANNEL_FP8], ids=["block", "channel"])
@pytest.mark.parametrize("m", [1, 3, 8, 16])
@pytest.mark.parametrize("case", list(GEMV_CONFIGS))
def test_triton_gemv_matches_reference(interpreted_triton, fmt, m, case):
    """Decode's few-row kernel, split over K or not, against quantize_activation + dequantize
    (the fused test's tolerance); N = 200 is ragged for every BLOCK_N and 128-row block."""
    k, cfg = GEMV_CONFIGS[case]
    n = 200
    g = torch.Generator().manual_seed(m * 1000 + k)
    w, x = torch.randn(n, k, generator=g), torch.randn(m, k, generator=g).to(torch.bfloat16)
    x[0, :7] = 0
    x[-1] *= 5  # rows of different scales
    wq, ws = quantize_weight(w, fmt)
    config = interpreted_triton.GemvConfig(**cfg)
    out = interpreted_triton.fp8_gemv(x, wq, ws, fmt.block is None, config)
    group = fmt.block or k
    xq, xs = quantize_activation(x, group)
    ref = (xq.float().view(m, -1, group) * xs.unsqueeze(-1)).view(m, k) @ dequantize_weight(wq, ws, fmt).t()
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, rtol=1e-2, atol=1e-2)
    if config.split_k > 1:  # the last program of each strip reset its ticket: the next GEMM starts at zero
        assert int(interpreted_triton._counters[x.device].abs().sum()) == 0
        again = interpreted_triton.fp8_gemv(x, wq, ws, fmt.block is None, config)
        torch.testing.assert_close(again, out, rtol=0, atol=0)


A16_CONFIGS = {  # (K, config): the weight-only kernel, one step or several, split or not
    "a16-k128": (128, dict(use_dot=False, block_n=16, block_k=128, split_k=1, a16=True)),
    "a16-k768-split3": (768, dict(use_dot=False, block_n=8, block_k=128, split_k=3, a16=True)),
    "a16-k1024-split2": (1024, dict(use_dot=False, block_n=32, block_k=256, split_k=2, a16=True)),
}


@pytest.mark.parametrize("fmt", [BLOCK_FP8, CHANNEL_FP8], ids=["block", "channel"])
@pytest.mark.parametrize("case", list(A16_CONFIGS))
def test_triton_weight_only_gemv_matches_the_dequantized_weight(interpreted_triton, fmt, case):
    """The one-row weight-only kernel: x (not quantized) times the dequantized weight, to
    fp32's summation order and bf16's output rounding; N = 200 is ragged for every strip and
    128-row block. Its tickets reset, and a second call gives the same bits."""
    k, cfg = A16_CONFIGS[case]
    n = 200
    g = torch.Generator().manual_seed(k)
    w, x = torch.randn(n, k, generator=g), (torch.randn(1, k, generator=g) * 3).to(torch.bfloat16)
    wq, ws = quantize_weight(w, fmt)
    config = interpreted_triton.GemvConfig(**cfg)
    out = interpreted_triton.fp8_gemv(x, wq, ws, fmt.block is None, config)
    ref = x.float() @ dequantize_weight(wq, ws, fmt).t()
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, rtol=8e-3, atol=1e-3)
    assert int(interpreted_triton._counters.get(x.device, torch.zeros(1)).abs().sum()) == 0
    assert torch.equal(interpreted_triton.fp8_gemv(x, wq, ws, fmt.block is None, config), out)
    with pytest.raises(ValueError, match="one contiguous row"):
        interpreted_triton.fp8_gemv(x.expand(2, k).contiguous(), wq, ws, fmt.block is None, config)


@pytest.mark.parametrize("per_token", [False, True])
def test_gemv_configs_fit_the_decode_shapes(interpreted_triton, per_token):
    """The table's entries and the bench's guess are usable for every Qwen3-8B decode GEMM and
    row count; gemv_config serves only table entries, and declines beyond GEMV_MAX_M
    (fused_fp8_gemm's rows)."""
    mod = interpreted_triton
    for n, k in ((6144, 4096), (4096, 4096), (24576, 4096), (4096, 12288)):
        for m in range(1, mod.GEMV_MAX_M + 1):
            key = ("channel" if per_token else "block", n, k, triton_next_pow2(m))
            for config in (mod.gemv_config(m, n, k, per_token), mod.guess_gemv_config(m, n, k)):
                if config is not None:
                    assert config.fits(k) and config.block_k % 128 == 0, (n, k, m, config)
                    if config.use_dot:
                        assert config.block_n >= 16
            assert mod.gemv_config(m, n, k, per_token) == mod.GEMV_TABLE.get(key)
        assert mod.gemv_config(mod.GEMV_MAX_M + 1, n, k, per_token) is None


def triton_next_pow2(m: int) -> int:
    return 1 << (m - 1).bit_length()


def test_fp8_linear_dispatches_few_rows_to_the_gemv(interpreted_triton, monkeypatch):
    """Through fp8_linear's CUDA path (its tensors on the CPU here): up to GEMV_MAX_M rows the
    gemv where GEMV_TABLE has a config, fused_fp8_gemm where it has none or None."""
    import dormant.engines.native.kernels.fp8_linear as fl

    calls = []
    monkeypatch.setattr(interpreted_triton, "fp8_gemv", lambda *a, **kw: calls.append("gemv"))
    monkeypatch.setattr(interpreted_triton, "fused_fp8_gemm", lambda *a, **kw: calls.append("fused"))
    w, ws = quantize_weight(torch.randn(256, 256), BLOCK_FP8)
    fl._fp8_linear_cuda(torch.randn(2, 256, dtype=torch.bfloat16), w, ws, BLOCK_FP8)  # no entry
    monkeypatch.setitem(interpreted_triton.GEMV_TABLE, ("block", 256, 256, 2),
                        interpreted_triton.guess_gemv_config(2, 256, 256))
    fl._fp8_linear_cuda(torch.randn(2, 256, dtype=torch.bfloat16), w, ws, BLOCK_FP8)
    monkeypatch.setitem(interpreted_triton.GEMV_TABLE, ("block", 256, 256, 2), None)
    fl._fp8_linear_cuda(torch.randn(2, 256, dtype=torch.bfloat16), w, ws, BLOCK_FP8)
    fl._fp8_linear_cuda(torch.randn(interpreted_triton.GEMV_MAX_M + 1, 256, dtype=torch.bfloat16), w, ws, BLOCK_FP8)
    assert calls == ["fused", "gemv", "fused", "fused"]
