"""Huge pages for XLA:CPU's per-step buffers (CPU-only; no effect on what is computed).

XLA:CPU allocates each execution's temporary buffer (gigabytes for a train step: 4.3 GiB for a ViT-Ti/4
forward and backward at batch 256) with malloc when the step starts and frees it when the step ends. glibc
serves an allocation that size with a fresh mmap, so every step first-touches every 4 KiB page of it again:
1.2 million page faults a step in that example, a large share of a CPU step's time. glibc's tunable
`glibc.malloc.hugetlb=1` (glibc >= 2.35; older ones ignore it) makes malloc ask for transparent huge pages
on such mappings (madvise), 2 MiB at a time, and the faults all but disappear (measured in
docs/cpu_step_benchmark.md).

glibc reads tunables only when a process starts, so the entry points (`python -m ssl_jax.main`,
`ssl_jax.quickstart`, `ssl_jax.evaluate`) restart themselves once with it set, before any work:
`reexec_with_huge_pages()`; the step benchmarks start their ssl_jax workers with it (`with_huge_pages`).
SSL_JAX_HUGE_PAGES=0 (what `make test` sets) leaves the process as it is. On a TPU or GPU host the device's
memory is not malloc's, and this only concerns the host.
"""

from __future__ import annotations

import os
import sys

TUNABLE = "glibc.malloc.hugetlb"
ENV_SWITCH = "SSL_JAX_HUGE_PAGES"


def with_huge_pages(environ) -> dict:
  """A copy of `environ` whose GLIBC_TUNABLES asks malloc for huge pages (kept as it is when it already sets
  glibc.malloc.hugetlb, the user's choice)."""
  env = dict(environ)
  tunables = env.get("GLIBC_TUNABLES", "")
  if not any(t.partition("=")[0] == TUNABLE for t in tunables.split(":")):
    env["GLIBC_TUNABLES"] = ":".join(filter(None, [tunables, f"{TUNABLE}=1"]))
  return env


def wanted(environ=None) -> bool:
  """Whether this process should restart with the tunable: on Linux, unless SSL_JAX_HUGE_PAGES=0 or it is
  already set (also what stops a second restart)."""
  environ = os.environ if environ is None else environ
  return (sys.platform.startswith("linux") and environ.get(ENV_SWITCH, "1") != "0"
          and with_huge_pages(environ) != dict(environ))


def reexec_with_huge_pages():
  """Replaces this process by itself with GLIBC_TUNABLES asking for huge pages (same interpreter, same
  command line: sys.orig_argv), when `wanted()`. Call it first thing in an entry point's __main__ block."""
  if not wanted():
    return
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], with_huge_pages(os.environ))
