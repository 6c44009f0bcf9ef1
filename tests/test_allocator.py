"""The training engine's fixed glibc mmap threshold (``mmap_threshold``): observed through glibc's
own bookkeeping (mallinfo2's count of mmapped blocks) in fresh processes."""
import ctypes
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"


def _glibc_mallinfo2() -> bool:
    if not sys.platform.startswith("linux"):
        return False
    try:
        return hasattr(ctypes.CDLL("libc.so.6"), "mallinfo2")
    except OSError:
        return False


pytestmark = pytest.mark.skipif(not _glibc_mallinfo2(), reason="needs Linux with glibc >= 2.33 (mallinfo2)")

# After a 4 MiB block is freed, glibc's default raises its mmap threshold above 4 MiB, so a 2 MiB block
# then grows the heap; with a fixed threshold of 128 KiB it is mmapped (counted in hblks). (glibc
# serves a block from free heap space at the top first, whatever its size: malloc_trim empties that.)
PROBE = textwrap.dedent("""
    import ctypes, json, sys
    class Info(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                    "fsmblks", "uordblks", "fordblks", "keepcost")]
    def second_block_mmapped():
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
        libc.free.argtypes = [ctypes.c_void_p]
        libc.mallinfo2.restype = Info
        libc.free(libc.malloc(4 << 20))
        libc.malloc_trim(0)   # no free heap top left to serve the next block from
        before = libc.mallinfo2().hblks
        p = libc.malloc(2 << 20)
        mmapped = libc.mallinfo2().hblks - before
        libc.free(p)
        return mmapped == 1
""")


def run(code: str, env_extra=None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_MMAP_THRESHOLD_"}
    env.update(PYTHONPATH=str(SRC), **(env_extra or {}))
    res = subprocess.run([sys.executable, "-c", PROBE + textwrap.dedent(code)], capture_output=True, text=True,
                         env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_glibc_default_keeps_the_block_in_the_heap_and_the_fixed_threshold_mmaps_it():
    out = run("""
        from tetsnn.engine.allocator import fix_mmap_threshold
        default = second_block_mmapped()
        value = fix_mmap_threshold()
        print(json.dumps(dict(default=default, value=value, fixed=second_block_mmapped())))
    """)
    assert out == dict(default=False, value=128 * 1024, fixed=True)


def test_the_users_environment_setting_wins():
    out = run("""
        from tetsnn.engine.allocator import fix_mmap_threshold
        print(json.dumps(dict(value=fix_mmap_threshold(), fixed=second_block_mmapped())))
    """, {"MALLOC_MMAP_THRESHOLD_": str(8 << 20)})   # glibc applied 8 MiB at start: 2 MiB stays in the heap
    assert out == dict(value=None, fixed=False)


def test_training_applies_the_config_key_first_and_leaves_glibc_alone_at_0():
    # fit() applies mmap_threshold before anything else; sync_bn on the CPU then stops it at once
    out = run("""
        from tetsnn.engine.config import ConfigError, load_config, resolve
        from tetsnn.engine.train import fit
        seen = {}
        for threshold in (0, 131072):
            try:
                fit(resolve({**load_config("digits"), "device": "cpu", "sync_bn": True, "mmap_threshold": threshold}))
            except ConfigError as e:
                assert "sync-bn" in str(e), e
            seen[threshold] = second_block_mmapped()
        print(json.dumps(seen))
    """)
    assert out == {"0": False, "131072": True}


def test_bad_values_are_one_line_errors():
    from tetsnn.engine.config import ConfigError, load_config, resolve

    for bad in (-1, "big", 1.5):
        with pytest.raises(ConfigError, match="mmap_threshold"):
            resolve({**load_config("digits"), "mmap_threshold": bad})
