"""GTC steps 1-4 as one pass over the residual on CPU: a small C++ kernel built on first use.

Eager torch needs four passes over r for steps 1-2 (add, clear the sign bit, compare into a bool
mask, scan the mask), and bool-writing kernels are slow on CPU; torch.compile's C++ backend was
measured slower still (85-118 ms against 24 ms eager for 10M elements). This kernel reads r and g
once and writes r once: each block of 16 elements is accumulated and thresholded in vectorisable
loops, and only blocks holding a selected element take the scalar path that packs the word and
subtracts ±τ. Chunks run in parallel on torch's intra-op threads.

It computes exactly what :func:`asrbench.strategies.gtc.encode` computes (same float operations,
same ascending word order). It is built with torch.utils.cpp_extension (g++ and ninja) into
torch's extension cache the first time a process asks for it, which takes about a minute once
per machine; where it cannot be built, :func:`load` returns None and GTC runs the eager passes.
"""
from __future__ import annotations

import hashlib
import logging
import os
import platform
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <atomic>
#include <cstring>
#include <vector>

// Steps 1-4 of GTC on a flat fp32 residual r and gradient g: r <- r + g; every element with
// |r_i| >= tau (compared on the IEEE bits, so NaN and inf are selected) becomes the word
// i | (sign << 31) and leaves r_i - (+-tau) in r. Returns (words in ascending index order,
// whether a selected value was not finite).
std::tuple<torch::Tensor, bool> encode(torch::Tensor residual, torch::Tensor grad, double tau) {
  TORCH_CHECK(residual.is_contiguous() && grad.is_contiguous(), "GTC kernel: contiguous tensors only");
  TORCH_CHECK(residual.scalar_type() == torch::kFloat && grad.scalar_type() == torch::kFloat,
              "GTC kernel: float32 tensors only");
  TORCH_CHECK(residual.numel() == grad.numel(), "GTC kernel: residual and gradient sizes differ");
  const int64_t n = residual.numel();
  float* r = residual.data_ptr<float>();
  const float* g = grad.data_ptr<float>();
  const float t = static_cast<float>(tau);
  uint32_t tb;
  std::memcpy(&tb, &t, 4);
  constexpr int64_t B = 16;
  constexpr int64_t CHUNK = 1 << 16;
  const int64_t chunks = (n + CHUNK - 1) / CHUNK;
  std::vector<std::vector<int32_t>> parts(chunks);
  std::atomic<bool> nonfinite{false};
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      std::vector<int32_t>& out = parts[c];
      const int64_t end = std::min(n, (c + 1) * CHUNK);
      for (int64_t base = c * CHUNK; base < end; base += B) {
        const int64_t m = std::min(B, end - base);
        float v[B];
        uint32_t bits[B];
        uint32_t any = 0;
        if (m == B) {  // fixed trip counts: the compiler vectorises these three loops
          for (int64_t j = 0; j < B; ++j) v[j] = r[base + j] + g[base + j];
          std::memcpy(bits, v, sizeof(bits));
          for (int64_t j = 0; j < B; ++j) any |= static_cast<uint32_t>((bits[j] & 0x7fffffffu) >= tb);
        } else {
          for (int64_t j = 0; j < m; ++j) v[j] = r[base + j] + g[base + j];
          std::memcpy(bits, v, m * sizeof(float));
          for (int64_t j = 0; j < m; ++j) any |= static_cast<uint32_t>((bits[j] & 0x7fffffffu) >= tb);
        }
        if (any) {  // rare at GTC densities: the scalar path packs and subtracts
          for (int64_t j = 0; j < m; ++j) {
            if ((bits[j] & 0x7fffffffu) < tb) continue;
            if ((bits[j] & 0x7f800000u) == 0x7f800000u) nonfinite.store(true, std::memory_order_relaxed);
            const bool negative = v[j] < 0.0f;
            out.push_back(static_cast<int32_t>(static_cast<uint32_t>(base + j) | (negative ? 0x80000000u : 0u)));
            v[j] = v[j] - (negative ? -t : t);
          }
        }
        std::memcpy(r + base, v, m * sizeof(float));
      }
    }
  });
  int64_t total = 0;
  for (const auto& p : parts) total += static_cast<int64_t>(p.size());
  torch::Tensor words = torch::empty({total}, torch::dtype(torch::kInt32));
  int32_t* w = words.data_ptr<int32_t>();
  for (const auto& p : parts) {
    if (!p.empty()) std::memcpy(w, p.data(), p.size() * sizeof(int32_t));
    w += p.size();
  }
  return std::make_tuple(words, nonfinite.load());
}
"""

_STATE: dict[str, Any] = {}


def cpu_key(cpuinfo: str | None = None) -> str:
    """A short digest of this CPU's model and instruction-set flags (/proc/cpuinfo), or of the
    machine type where there is none: the kernel is built with -march=native, so a build cache
    shared between machines (a cluster's home directory) keeps one build per kind of CPU."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            cpuinfo = ""
    wanted = ("model name", "flags", "features", "cpu part", "isa")  # x86 and aarch64 names
    fields = {}
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key in wanted and key not in fields:
            fields[key] = " ".join(sorted(value.split())) if key in ("flags", "features") else value.strip()
    text = repr(sorted(fields.items())) if fields else platform.machine() + platform.processor()
    return hashlib.sha1(text.encode()).hexdigest()[:10]


def load() -> Any:
    """The built kernel module (``encode(residual, grad, tau) -> (words, nonfinite)``), or None.

    Built once per process (compiled once per kind of CPU into torch's extension cache, under a
    name keyed by :func:`cpu_key`: -march=native code must not load on another CPU); set
    ``ASRBENCH_GTC_KERNEL=0`` to always run the eager passes.
    """
    if "module" in _STATE:
        return _STATE["module"]
    module = None
    if os.environ.get("ASRBENCH_GTC_KERNEL", "1") != "0":
        try:
            from torch.utils.cpp_extension import load_inline

            module = load_inline(name=f"asrbench_gtc_kernel_{cpu_key()}", cpp_sources=SOURCE, functions=["encode"],
                                 extra_cflags=["-O3", "-march=native", "-fopenmp"], extra_ldflags=["-fopenmp"],
                                 verbose=False)
        except Exception as err:  # noqa: BLE001 - no compiler, no ninja, no headers: run eager
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            log.warning("GTC: the one-pass CPU kernel could not be built (%s); running the eager passes", first)
    _STATE["module"] = module
    return module
