"""A process-shared, robust mutex in shared memory (a pthread mutex, via ctypes).

Chosen over the other candidates by loadtests/shm_primitives_bench.py (numbers
in docs/ARCHITECTURE.md, "Shared state"): lock-free fetch-add/CAS through the
`atomics` package costs 10-17 µs per operation through its API (0.6-0.8 µs
through its ctypes internals); a POSIX semaphore (multiprocessing.Lock) is the
cheapest lock but has no owner, so a worker SIGKILLed inside the section
would leave every other worker blocked for good. A robust mutex has an owner:
when it dies holding the lock, the next locker gets EOWNERDEAD from glibc and
the kernel, marks the mutex consistent and goes on (`recovered` counts it).
The sections it guards are written so that whatever a dead owner left half
done is still a valid state (see table.py).

The mutex lives at a fixed byte offset of a mapping that the master creates
before forking; every process uses the same bytes, so nothing is named or
inherited but the mapping.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
from collections.abc import Callable

log = logging.getLogger("neurohttp")

MUTEX_BYTES = 64  # sizeof(pthread_mutex_t) is 40 on x86-64 glibc, 48 on aarch64
_PTHREAD_PROCESS_SHARED = 1
_PTHREAD_MUTEX_ROBUST = 1
_ATTR_BYTES = 64

# PyDLL keeps the GIL over the call: trylock and unlock never block, and that
# saves ~40 ns each. The blocking lock releases the GIL (CDLL), so a thread of
# the same process that holds the mutex can still run and unlock it.
_fast = ctypes.PyDLL(None)
_slow = ctypes.CDLL(None)
_proto = ctypes.PYFUNCTYPE(ctypes.c_int, ctypes.c_void_p)
trylock: Callable[[int], int] = _proto(("pthread_mutex_trylock", _fast))
unlock: Callable[[int], int] = _proto(("pthread_mutex_unlock", _fast))
_lock = _slow.pthread_mutex_lock
_lock.argtypes = [ctypes.c_void_p]
_lock.restype = ctypes.c_int
_consistent = _fast.pthread_mutex_consistent
_consistent.argtypes = [ctypes.c_void_p]
_consistent.restype = ctypes.c_int


def buffer_address(buf: memoryview) -> int:
    """The address of a writable buffer's first byte. The ctypes view that finds
    it is dropped at once, so the buffer keeps no export and can be closed;
    the caller must not use the address after unmapping it."""
    c = ctypes.c_char.from_buffer(buf)
    try:
        return ctypes.addressof(c)
    finally:
        del c


def init_mutex(addr: int) -> None:
    """Initialise a process-shared robust mutex at `addr` (the master, once,
    before any worker exists)."""
    attr = ctypes.create_string_buffer(_ATTR_BYTES)
    for fn, args in (("pthread_mutexattr_init", ()),
                     ("pthread_mutexattr_setpshared", (_PTHREAD_PROCESS_SHARED,)),
                     ("pthread_mutexattr_setrobust", (_PTHREAD_MUTEX_ROBUST,))):
        rc = getattr(_fast, fn)(attr, *args)
        if rc:
            raise OSError(rc, f"{fn}: {os.strerror(rc)}")
    rc = _fast.pthread_mutex_init(ctypes.c_void_p(addr), attr)
    _fast.pthread_mutexattr_destroy(attr)
    if rc:
        raise OSError(rc, f"pthread_mutex_init: {os.strerror(rc)}")


def lock_slow(addr: int, rc: int) -> bool:
    """After `trylock(addr)` returned `rc` != 0: take the mutex, waiting if
    another process holds it. True if its previous owner died holding it (the
    mutex is then made consistent again: the caller counts the recovery)."""
    if rc == errno.EBUSY:
        rc = _lock(addr)
    if rc == errno.EOWNERDEAD:
        _consistent(addr)
        return True
    if rc:
        raise OSError(rc, f"pthread_mutex_lock: {os.strerror(rc)}")
    return False
