"""ssl_jax/host_memory.py: the entry points' restart with glibc's huge-page tunable (CPU speed only)."""

import os
import subprocess
import sys

import pytest

from ssl_jax import host_memory


def test_with_huge_pages_adds_the_tunable_and_keeps_the_users():
  assert host_memory.with_huge_pages({})["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=1"
  env = host_memory.with_huge_pages({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2", "HOME": "/h"})
  assert env == {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1", "HOME": "/h"}
  mine = {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}  # the user's own choice stays
  assert host_memory.with_huge_pages(mine) == mine
  assert not host_memory.wanted(mine)
  assert not host_memory.wanted({"SSL_JAX_HUGE_PAGES": "0"})


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc tunables: Linux only")
def test_reexec_restarts_once_with_the_same_command_line():
  code = ("import os, sys; from ssl_jax import host_memory; print('start', flush=True); "
          "host_memory.reexec_with_huge_pages(); print(os.environ['GLIBC_TUNABLES'], sys.argv[1:])")
  env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "SSL_JAX_HUGE_PAGES")}
  out = subprocess.run([sys.executable, "-c", code, "a", "--b=1"], env=env, capture_output=True, text=True,
                       check=True).stdout.splitlines()
  assert out == ["start", "start", "glibc.malloc.hugetlb=1 ['a', '--b=1']"]  # restarted once, argv kept
  out = subprocess.run([sys.executable, "-c", code], env=dict(env, SSL_JAX_HUGE_PAGES="0"), capture_output=True,
                       text=True).stdout
  assert out.splitlines()[0] == "start" and out.count("start") == 1 and "hugetlb" not in out
