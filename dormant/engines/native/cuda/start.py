"""Starting a GPU runner: what can run before the model is known, and the sizes it plans with.

    start_cuda_context()            the worker's first call on a GPU: context + pinned staging,
                                    then cuBLAS's first use, in a background thread
    take_early_context()            the runner's: that thread's future (or None), once
    first_kernels_warm()            the runner's, before graph capture: that thread's end
    early_context_error()           the standby's: wait for the context, its exception or None
    set_cublas_workspace()          before the first cuBLAS call
    activation_reserve_bytes(...)   what a step needs outside the arena
    num_kv_blocks_for_memory(...)   the KV blocks that fit beside weights and that reserve
    load_hf_config / build_meta_model / fuse_rms_norms    the model's shape, on the meta device
    in_background(fn, device, name) a thread on a side stream of its own, as a future
"""

from __future__ import annotations

import copy
import logging
import os
import threading
import time
from concurrent.futures import Future
from pathlib import Path

import torch
from torch import nn

from dormant.engines.native.cuda.attention import GPU_ATTN_IMPLEMENTATION

log = logging.getLogger("dormant.engine")

GiB = 1 << 30


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def kv_block_bytes(num_layers: int, block_size: int, num_kv_heads: int, head_dim: int, itemsize: int) -> int:
    """Bytes of one KV block over all layers, K and V."""
    return 2 * num_layers * block_size * num_kv_heads * head_dim * itemsize


def activation_reserve_bytes(hf_config, max_num_batched_tokens: int, max_num_seqs: int) -> int:
    """What a step needs outside the arena (activations, logits, sampling, graph pool, cuBLAS
    workspace), estimated high from the shapes rather than profiled."""
    hidden = hf_config.hidden_size
    inter = getattr(hf_config, "intermediate_size", 4 * hidden)
    heads = hf_config.num_attention_heads
    kv_heads = getattr(hf_config, "num_key_value_heads", None) or heads
    head_dim = getattr(hf_config, "head_dim", None) or hidden // heads
    per_token = (6 * hidden + 3 * inter + 2 * (heads + 2 * kv_heads) * head_dim) * 2
    logits = max_num_seqs * hf_config.vocab_size * (2 + 4 * 4)  # bf16 logits + fp32 sampling
    return 2 * (max_num_batched_tokens * per_token + logits) + GiB // 2


def num_kv_blocks_for_memory(total: int, free: int, utilization: float, weights_bytes: int,
                             reserve_bytes: int, block_bytes: int) -> int:
    """KV blocks that fit in `utilization` of the device's memory, after what others already
    hold (total - free), our weights and the activation reserve. 0 if nothing fits."""
    budget = int(total * utilization) - (total - free) - weights_bytes - reserve_bytes
    return max(0, budget // block_bytes)


_FUSABLE_NORMS = ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm")


def fuse_rms_norms(model: nn.Module) -> int:
    """Run the Llama-family RMSNorms (weight * x / rms(x), computed in fp32) through
    F.rms_norm: one fused CUDA kernel instead of seven. Returns how many were replaced."""
    count = 0
    for module in model.modules():
        if type(module).__name__ in _FUSABLE_NORMS:
            module.forward = _rms_norm_forward(module)
            count += 1
    return count


def _rms_norm_forward(module: nn.Module):
    def forward(hidden_states: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.rms_norm(hidden_states, module.weight.shape, module.weight, module.variance_epsilon)
    return forward


def load_hf_config(model_dir: Path):
    from transformers import AutoConfig

    hf_config = copy.deepcopy(AutoConfig.from_pretrained(model_dir))  # set_attn_implementation writes into it
    if hasattr(hf_config, "quantization_config"):
        delattr(hf_config, "quantization_config")
    return hf_config


def build_meta_model(hf_config, dtype: torch.dtype):
    """transformers' own model, on the meta device, our attention registered by name."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype, attn_implementation=GPU_ATTN_IMPLEMENTATION)
    return model.eval().requires_grad_(False)


def in_background(fn, device: torch.device | None, name: str) -> Future:
    """Run `fn` in a new thread, on a side stream of its own (never the legacy default
    stream, which would order against the main thread's work; device None: no stream, for
    work before the context exists); its result or exception in the future."""
    future: Future = Future()

    def run() -> None:
        try:
            if device is None:  # no stream yet: fn creates the context
                future.set_result(fn())
                return
            torch.cuda.set_device(device)
            with torch.cuda.stream(torch.cuda.Stream(device)):
                future.set_result(fn())
        except BaseException as e:  # noqa: BLE001 - re-raised by future.result()
            future.set_exception(e)

    threading.Thread(target=run, name=name, daemon=True).start()
    return future


_early_context: Future | None = None
_warm_thread: threading.Thread | None = None


def set_cublas_workspace() -> None:
    """cuBLAS's workspace per (handle, stream) is 32 MiB by default on the H100 and stays
    reserved while asleep (graphs captured with it): 2 x 4 MiB is enough for our GEMMs. Read
    once, at the process's first cuBLAS call (bench/README.md, "Engine: cuBLAS workspace")."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:2")


def start_cuda_context() -> None:
    """Create the CUDA context in a background thread now, beside the model's config, the
    tokenizer and the HTTP server, then pin the staging of an image restore; the next
    GPUModelRunner waits for it. Then, in the same thread, the first use of cuBLAS and of a
    few of torch's kernels (first_kernels_warm). The worker calls this first thing on a GPU
    (the context: 0.3 s alone, 0.5-0.6 s inside a start, bench/README.md, "Restore: the CUDA context")."""
    global _early_context, _warm_thread
    if _early_context is not None:
        return
    set_cublas_workspace()
    future: Future = Future()

    def run() -> None:
        try:
            future.set_result(_create_context())
        except BaseException as e:  # noqa: BLE001 - re-raised by future.result()
            future.set_exception(e)
            return
        try:
            _first_kernels()
        except Exception as e:  # noqa: BLE001 - only a head start: the runner pays it instead
            log.info("first kernels not warmed beside the start: %s", e)

    _early_context = future
    _warm_thread = threading.Thread(target=run, name="dormant-cuda-context", daemon=True)
    _warm_thread.start()


def early_context_error() -> BaseException | None:
    """Wait for start_cuda_context's context (not its kernels): its exception, or None (also
    when it never ran). The standby worker exits on one rather than be handed out."""
    return _early_context.exception() if _early_context is not None else None


def first_kernels_warm() -> None:
    """Wait for start_cuda_context's thread to end (at once if it never ran)."""
    if _warm_thread is not None:
        _warm_thread.join()


def _first_kernels() -> None:
    """cuBLAS's handle and workspace and its first kernels, and torch's embedding, argmax and
    fill kernels, on stand-in tensors: each loads lazily at its first use, and in a restore's
    first graph capture they took ~0.35 s of the start's critical path
    (bench/README.md, "Restore: first uses"). Here they load while the main thread waits on other things.
    The thread's cuBLAS handle returns to torch's pool when it ends, for the main thread."""
    x = torch.ones(4, 256, device="cuda", dtype=torch.bfloat16)
    w = torch.ones(512, 256, device="cuda", dtype=torch.bfloat16)
    y = torch.nn.functional.linear(x[:1], w)
    y = torch.nn.functional.linear(x, w) + y
    ids = y.argmax(dim=-1)
    torch.nn.functional.embedding(ids, w).float().sum()
    torch.full((4, 4), 1, dtype=torch.int32, device="cuda").zero_()
    torch.cuda.current_stream().synchronize()


def restore_threads() -> int:
    """Image readers of a GPU restore: 16 x 8 MiB reads reached 30 GB/s from the page cache
    (bench/README.md, "Restore: image reads and checksums")."""
    return min(16, os.cpu_count() or 8)


def _create_context():
    """(seconds, the pinned staging for an image restore)."""
    from cuda.bindings import driver as cuda

    from dormant.engines.native.core.engine_image import staging_bytes
    from dormant.engines.native.cuda.driver import check_cuda
    from dormant.engines.native.cuda.pinned import PinnedBuffer

    started = time.perf_counter()
    # The driver's primary context, the one torch then uses, through cuda-bindings: those
    # calls release the GIL, torch's lazy init does not, and the worker's other threads
    # (HTTP server, config, tokenizer) run Python meanwhile
    check_cuda(cuda.cuInit(0))
    context = check_cuda(cuda.cuDevicePrimaryCtxRetain(check_cuda(cuda.cuDeviceGet(0))))  # torch's device 0 in a fresh worker
    torch.empty(1, device="cuda")
    context_s = time.perf_counter() - started
    check_cuda(cuda.cuCtxSetCurrent(context))
    return context_s, PinnedBuffer(staging_bytes(restore_threads()))


def take_early_context() -> Future | None:
    """The future of start_cuda_context()'s thread, handed over once (None if it never ran):
    its result is (the context's seconds, a PinnedBuffer of staging for an image restore)."""
    global _early_context
    early, _early_context = _early_context, None
    return early
