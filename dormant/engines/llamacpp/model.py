"""A GGUF model and its llama.cpp context: loaded, released (sleep) and touched again (wake).

Sleep hands the memory back and keeps every llama.cpp object (memory.py): the weights are
mmap'd from the GGUF, and their pages leave the process (MADV_DONTNEED) but stay in the page
cache; the KV cache is cleared and its buffer and the step's scratch dropped the same way, to
read back as zeros. Waking is then nothing: the next step faults the pages in from the page
cache (wake -> first token went from ~0.4 s, a reload and a new context whose 377 MB of KV are
zeroed at creation, to the time of the prompt). Where llama.cpp repacked weights into memory
of its own at load (use_extra_bufts), dropping them would zero them: there the model and the
context are freed and loaded again at wake. Level 2 also asks the kernel to drop the file's
pages (POSIX_FADV_DONTNEED): the page cache goes too, and waking reads the disk.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import llama_cpp as lc

from dormant.engines.llamacpp.memory import AnonymousMappings, Region, drop, file_regions
from dormant.engines.llamacpp.config import LlamaCppConfig
from dormant.engines.llamacpp.tokenizer import meta_str

log = logging.getLogger("dormant.engine")
_GGML_WARN, _GGML_ERROR = 3, 4  # ggml_log_level: none, debug, info, warn, error, cont


@lc.llama_log_callback
def _forward_log(level: int, text: bytes, user_data) -> None:
    """llama.cpp prints every step of a load; only its warnings and errors reach our log."""
    if level in (_GGML_WARN, _GGML_ERROR):
        log.log(logging.WARNING if level == _GGML_WARN else logging.ERROR, "llama.cpp: %s",
                text.decode("utf-8", errors="replace").rstrip())


lc.llama_log_set(_forward_log, None)  # the module holds the callback: ctypes must not free it


class LlamaModel:
    def __init__(self, gguf: Path, config: LlamaCppConfig):
        self.gguf = gguf
        self.config = config
        self.model = None
        self.ctx = None
        self.load_seconds = 0.0
        self.is_released = False
        self._context_regions: list[Region] = []
        self._weights_in_anonymous_memory = False
        self.load(with_context=False)
        config.resolve(lc.llama_model_n_ctx_train(self.model))
        self._open_context()
        self.weights_bytes = int(lc.llama_model_size(self.model))
        self.kv_cache_bytes = self._kv_bytes()

    @property
    def is_loaded(self) -> bool:
        return self.ctx is not None

    @property
    def frees_at_sleep(self) -> bool:
        """Whether sleep frees the model (and wake loads it again) rather than releasing its
        memory in place: its llama_model handle then does not outlive a sleep."""
        return self._weights_in_anonymous_memory or not self._context_regions

    def release(self, drop_page_cache: bool = False) -> None:
        """Sleep: this process's memory for the model goes back (see the module docstring)."""
        if self.frees_at_sleep:
            self.free()
        elif not self.is_released:
            lc.llama_memory_clear(self.memory, False)  # every cell empty; the data is dropped below
            drop(self._context_regions, small_pages=True)
            drop(file_regions(self.gguf), keep_first_page=False)
            self.is_released = True
        if drop_page_cache:
            fd = os.open(self.gguf, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)

    def wake(self) -> None:
        """Wake: a model released in place is used as it is (its pages fault back in); a freed
        one is loaded again."""
        started = time.perf_counter()
        if self.model is None:
            self.load()
        self.is_released = False
        self.load_seconds = time.perf_counter() - started

    def load(self, with_context: bool = True) -> None:
        started = time.perf_counter()
        with AnonymousMappings() as added:
            self.model = lc.llama_model_load_from_file(str(self.gguf).encode(), self._model_params())
        self._weights_in_anonymous_memory = bool(added.regions)
        if not self.model:
            raise ValueError(f"llamacpp engine: llama.cpp could not load {self.gguf}")
        self.vocab = lc.llama_model_get_vocab(self.model)
        self.n_vocab = lc.llama_vocab_n_tokens(self.vocab)
        if with_context:  # a wake: the context's size is known
            self._open_context()
        self.load_seconds = time.perf_counter() - started

    def _model_params(self):
        params = lc.llama_model_default_params()
        names = {name for name, _ in params._fields_}  # a ctypes struct takes unknown names silently
        if "load_mode" in names:  # llama.cpp of 2026: one enum where use_mmap / use_mlock were
            params.load_mode = lc.LLAMA_LOAD_MODE_MMAP if self.config.use_mmap else lc.LLAMA_LOAD_MODE_NONE
        else:
            params.use_mmap = self.config.use_mmap
        if "use_extra_bufts" in names:
            params.use_extra_bufts = self.config.weight_repacking
        return params

    def free(self) -> None:
        if self.ctx is not None:
            lc.llama_free(self.ctx)
            self.ctx = None
        if self.model is not None:
            lc.llama_model_free(self.model)
            self.model = None

    def clear_sequence(self, seq_id: int, start: int = 0) -> None:
        """Drop sequence `seq_id`'s cells from position `start` on."""
        lc.llama_memory_seq_rm(self.memory, seq_id, start, -1)

    def copy_sequence(self, src: int, dst: int) -> None:
        """Sequence `dst` holds what `src` holds (its cells dropped first). Each sequence has a
        KV stream of its own here (kv_unified off): llama.cpp copies the whole stream, at the
        next llama_decode."""
        lc.llama_memory_seq_rm(self.memory, dst, -1, -1)
        lc.llama_memory_seq_cp(self.memory, src, dst, -1, -1)

    def _open_context(self) -> None:
        cfg = self.config
        params = lc.llama_context_default_params()
        params.n_ctx = cfg.kv_cache_tokens
        params.n_batch = cfg.max_num_batched_tokens
        params.n_ubatch = min(512, cfg.max_num_batched_tokens)
        params.n_seq_max = cfg.max_num_seqs
        params.n_threads = params.n_threads_batch = cfg.num_threads
        # a stream of max_model_len cells per sequence (config.py, max_model_len: exact batching)
        params.kv_unified = False
        params.no_perf = True
        with AnonymousMappings() as added:
            self.ctx = lc.llama_init_from_model(self.model, params)
        # the KV cache's buffer at least (llama.cpp's compute scratch beside it), else it is not
        # told apart from other memory: sleep frees the context then
        self._context_regions = added.regions if added.num_bytes >= self._kv_bytes() else []
        if not self.ctx:
            raise ValueError(f"llamacpp engine: llama.cpp could not create a context of {cfg.kv_cache_tokens} tokens")
        self.memory = lc.llama_get_memory(self.ctx)

    def _kv_bytes(self) -> int:
        """K and V in f16 (llama.cpp's default cache type) for every cell of every layer."""
        arch = meta_str(self.model, "general.architecture") or "llama"
        n_head = lc.llama_model_n_head(self.model)
        n_head_kv = lc.llama_model_n_head_kv(self.model)
        head_k = int(meta_str(self.model, f"{arch}.attention.key_length") or lc.llama_model_n_embd(self.model) // n_head)
        head_v = int(meta_str(self.model, f"{arch}.attention.value_length") or head_k)
        per_token = lc.llama_model_n_layer(self.model) * n_head_kv * (head_k + head_v) * 2
        return per_token * self.config.kv_cache_tokens
