"""Engine configuration: typed data, defaults in one place, checked at load."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, fields
from pathlib import Path

DTYPES = ("auto", "float32", "bfloat16", "mixed")
DEVICES = ("auto", "cpu", "cuda")
DECODE_ATTENTION = ("triton", "sdpa")


@dataclass
class EngineConfig:
    model_dir: str
    device: str = "auto"  # auto: cuda when torch sees a GPU, else cpu
    # "mixed" (CPU default for "auto"): fp32 weights plus a bf16 copy of every Linear weight,
    # used for steps of <= small_batch_tokens tokens. Measured on 2 EPYC cores, the 211 linears
    # of SmolLM2-135M per step: 1 row fp32 42 ms / bf16 17 ms; 2 rows 77 / 30; 4 rows 75 / 71;
    # 8 rows 69 / 111 (no AVX512-bf16 here: bf16 GEMM gets slower per row, fp32 GEMM does not).
    dtype: str = "auto"
    small_batch_tokens: int = 3
    # the most sequences one step batches: the worker reports it as its capacity, and the gateway
    # admits that many requests at once (issue 12). Default: 8 on CPU; 256 on CUDA, where 256
    # streams of 512 + 128 tokens hold 164k KV tokens (an 8B model on an H200 has room for ~700k)
    max_num_seqs: int | None = None
    max_model_len: int | None = None  # default: min(max_position_embeddings, 8192)
    max_num_batched_tokens: int | None = None  # default: max_model_len
    block_size: int = 16
    kv_cache_tokens: int | None = None  # CPU default 8192 (pages touched only when written); CUDA: sized from memory
    # bytes of KV cache (all layers, K and V): the allotment the gateway's placement gives the
    # model (issue 10); overrides kv_cache_tokens, and on CUDA the gpu_memory_utilization sizing
    kv_cache_memory: int | None = None
    num_kv_blocks: int | None = None  # overrides kv_cache_tokens
    # Prefix caching: full KV blocks are shared by hash of their tokens (block_manager.py); a
    # prompt computes only what is not cached. On by default, CPU too: a hit costs nothing
    # but the hash of each full prompt block.
    enable_prefix_caching: bool = True
    # Steps mix decodes with prompt chunks under max_num_batched_tokens (scheduler.py); off:
    # a step is whole prompts or all decodes.
    enable_chunked_prefill: bool = True
    num_threads: int | None = None  # default: torch's choice (physical cores)
    gpu_memory_utilization: float = 0.9  # CUDA: share of the device's memory for weights + KV + activations
    cuda_graph_batch_sizes: list[int] | None = None  # CUDA decode graphs; None: 1,2,4,8,16,24,32,48,64,... up to max_num_seqs; []: eager
    # Decode graphs captured before serving. None: while the weights load, batch 1 and the
    # largest first, then a quarter of it, then halving down (cuda/graphs.py capture_order), so
    # capture adds little to a start. A number: every size up to it. Either way the others are
    # captured in idle time, or before a decode step they spare padding of over 2x; until then
    # a batch replays the smallest captured graph that holds it, padded, or runs eagerly when
    # none does (only with defer_graphs_above).
    defer_graphs_above: int | None = None
    decode_attention: str = "triton"  # CUDA: "triton" paged kernel, or "sdpa" over gathered K/V (reference)
    # CUDA: Llama/Mistral/Qwen2/Qwen3 run our compact decoder (cuda/compact_decoder.py, ~9 kernels
    # per layer); False, or another family: transformers' model
    compact_decoder: bool = True
    backup_weights: bool = True  # write the level-1 sleep image in the background after load
    model_config: dict = field(default_factory=dict, repr=False)  # the HF config.json, read here

    def __post_init__(self) -> None:
        path = Path(self.model_dir)
        if not (path / "config.json").is_file():
            raise ValueError(f"engine config: model_dir {self.model_dir!r} has no config.json")
        self.model_config = json.loads((path / "config.json").read_text())
        if self.dtype not in DTYPES:
            raise ValueError(f"engine config: dtype {self.dtype!r} is not one of {DTYPES}")
        if self.device not in DEVICES:
            raise ValueError(f"engine config: device {self.device!r} is not one of {DEVICES}")
        if self.device == "auto":
            import torch

            self.device = "cuda" if torch.cuda.is_available() else "cpu"
        if self.device == "cuda":
            if self.dtype not in ("auto", "bfloat16"):
                raise ValueError(f"engine config: dtype {self.dtype!r} is not supported on cuda; use bfloat16")
            self.dtype = "bfloat16"
            if not 0 < self.gpu_memory_utilization <= 1:
                raise ValueError("engine config: gpu_memory_utilization must be in (0, 1], "
                                 f"got {self.gpu_memory_utilization}")
            if self.decode_attention not in DECODE_ATTENTION:
                raise ValueError(f"engine config: decode_attention {self.decode_attention!r} is not one of {DECODE_ATTENTION}")
        if self.dtype == "auto":
            self.dtype = "mixed"  # CPU; see the measurements above
        if self.max_num_seqs is None:
            self.max_num_seqs = 256 if self.device == "cuda" else 8
        if self.kv_cache_memory is not None and self.num_kv_blocks is None:
            self.num_kv_blocks = max(1, self.kv_cache_memory // self.kv_block_bytes())
        if self.kv_cache_tokens is None and self.device == "cpu":
            self.kv_cache_tokens = 8192
        limit = int(self.model_config.get("max_position_embeddings") or 8192)
        if self.max_model_len is None:
            self.max_model_len = min(limit, 8192)
        if self.max_num_batched_tokens is None:
            self.max_num_batched_tokens = max(self.max_model_len, 512)
        if self.num_kv_blocks is None and self.kv_cache_tokens is not None:
            self.num_kv_blocks = -(-self.kv_cache_tokens // self.block_size)
        for name in ("max_num_seqs", "max_model_len", "block_size", "num_kv_blocks"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise ValueError(f"engine config: {name} must be positive, got {getattr(self, name)}")
        if self.max_num_batched_tokens < self.block_size:  # a prompt chunk is whole blocks (scheduler.py)
            raise ValueError(f"engine config: max_num_batched_tokens ({self.max_num_batched_tokens}) must be at "
                             f"least block_size ({self.block_size})")
        if self.num_kv_blocks is not None:
            self.set_num_kv_blocks(self.num_kv_blocks)

    def kv_block_bytes(self) -> int:
        """One KV block over all layers, K and V, in the KV dtype (bf16 on CUDA, fp32 on CPU:
        the "mixed" dtype keeps fp32 activations and KV)."""
        hf = self.model_config.get("text_config", self.model_config)
        heads = hf["num_attention_heads"]
        head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
        kv_heads = hf.get("num_key_value_heads") or heads
        itemsize = 4 if self.dtype in ("float32", "mixed") else 2
        return 2 * hf["num_hidden_layers"] * self.block_size * kv_heads * head_dim * itemsize

    def set_num_kv_blocks(self, num_blocks: int) -> None:
        """Fix the KV capacity (the CUDA runner sizes it from free memory); a context longer
        than the whole cache cannot run, so max_model_len shrinks to fit."""
        self.num_kv_blocks = num_blocks
        if num_blocks * self.block_size < self.max_model_len:
            self.max_model_len = num_blocks * self.block_size

    @classmethod
    def from_args(cls, model_dir: str | os.PathLike, args: dict | None = None) -> "EngineConfig":
        """Build from a dict such as the worker's --engine-args JSON; unknown keys fail."""
        args = dict(args or {})
        known = {f.name for f in fields(cls)} - {"model_dir", "model_config"}
        unknown = set(args) - known
        if unknown:
            raise ValueError(f"engine args: unknown key(s) {sorted(unknown)}; known: {sorted(known)}")
        return cls(model_dir=str(model_dir), **args)


# the type each engine_args key takes: checked at config load, before any worker starts
_ARG_TYPES: dict[str, tuple[type, ...]] = {
    "device": (str,), "dtype": (str,), "decode_attention": (str,),
    "small_batch_tokens": (int,), "max_num_seqs": (int,), "max_model_len": (int,),
    "max_num_batched_tokens": (int,), "block_size": (int,), "kv_cache_tokens": (int,), "kv_cache_memory": (int,),
    "num_kv_blocks": (int,), "num_threads": (int,), "defer_graphs_above": (int,),
    "enable_prefix_caching": (bool,), "enable_chunked_prefill": (bool,), "compact_decoder": (bool,),
    "backup_weights": (bool,), "gpu_memory_utilization": (int, float), "cuda_graph_batch_sizes": (list,),
}
_CHOICES = {"dtype": DTYPES, "device": DEVICES, "decode_attention": DECODE_ATTENTION}


def check_engine_args(args: dict) -> dict:
    """Validate engine_args without a model or torch (the gateway calls this at config load);
    EngineArgsError names the key and the fix. Returns the args unchanged."""
    import difflib

    from dormant.engines.base import EngineArgsError

    known = sorted(_ARG_TYPES)
    for key, value in args.items():
        if key not in _ARG_TYPES:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise EngineArgsError(key, f"unknown key {key!r} for the native engine; {hint}known keys: {', '.join(known)}")
        if value is None:
            continue
        types = _ARG_TYPES[key]
        if isinstance(value, bool) and bool not in types or not isinstance(value, types):
            names = " or ".join(t.__name__ for t in types)
            raise EngineArgsError(key, f"{key}: expected {names}, got {value!r}")
        if key == "device" and value.startswith("cuda:"):
            # a worker sees one GPU, as "cuda"; which one is the environment's choice
            raise EngineArgsError(key, f"{key}: {value!r}: a worker runs on one GPU, named 'cuda'; choose "
                                       "which with CUDA_VISIBLE_DEVICES in dormant's environment")
        if key in _CHOICES and value not in _CHOICES[key]:
            choices = _CHOICES[key]
            close = [value.lower()] if value.lower() in choices else difflib.get_close_matches(value, choices, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise EngineArgsError(key, f"{key}: {value!r} is not one of {', '.join(choices)}{hint}")
        if types == (int,) and key != "defer_graphs_above" and value <= 0:
            raise EngineArgsError(key, f"{key}: must be a positive integer, got {value}")
        if key == "gpu_memory_utilization" and not 0 < value <= 1:
            raise EngineArgsError(key, f"{key}: must be in (0, 1], got {value}")
        if key == "cuda_graph_batch_sizes" and not all(isinstance(b, int) and not isinstance(b, bool) and b > 0
                                                      for b in value):
            raise EngineArgsError(key, f"{key}: expected a list of positive integers, got {value!r}")
    if args.get("device") == "cuda" and args.get("dtype") not in (None, "auto", "bfloat16"):
        raise EngineArgsError("dtype", f"dtype: {args['dtype']!r} is not supported on cuda; use bfloat16")
    budget, block_size = args.get("max_num_batched_tokens"), args.get("block_size") or EngineConfig.block_size
    if budget is not None and budget < block_size:
        raise EngineArgsError("max_num_batched_tokens", f"max_num_batched_tokens: {budget} is less than a KV "
                              f"block ({block_size} tokens); a step runs prompts in whole blocks")
    return args


def run_ahead_enabled(default: bool) -> bool:
    """Whether decode steps run ahead: DORMANT_RUN_AHEAD=1 or 0 where set (benchmarks' A/B,
    the CPU tests), else the runner's default (on for CUDA graphs: the device works while the
    host reads the last step; off on the CPU, where host and "device" are the same cores)."""
    value = os.environ.get("DORMANT_RUN_AHEAD", "").strip()
    return default if value == "" else value not in ("0", "false", "no", "off")
