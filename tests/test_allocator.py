"""Freed-memory reuse: counted in page faults (the OS's count, independent of our code), not in time."""

import resource

import pytest
import torch

from lowrank_fm.allocator import _glibc, _preloaded, allocator_state, use_allocator

needs_glibc = pytest.mark.skipif(_glibc() is None or _preloaded() is not None,
                                 reason="freed-memory reuse is set through glibc's mallopt (not this C library)")

PAGES = 64 * 2**20 // 4096  # a 64 MiB tensor, in 4 KiB pages


def _faults_of_allocations(attempts: int = 4) -> list[int]:
    """Minor page faults while allocating and writing a 64 MiB tensor, freed after each attempt (under
    "reuse" the first blocks may still come from elsewhere: aligned allocations leave split remainders in a
    heap fragmented by earlier tests)."""
    faults = []
    for _ in range(attempts):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        block = torch.empty(PAGES * 1024).fill_(2.0)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
        del block
    return faults


@pytest.fixture
def restore_system():
    yield
    use_allocator("system")


@needs_glibc
def test_reuse_serves_a_freed_block_without_new_pages_and_system_faults_them_again(restore_system):
    state = use_allocator("reuse")
    assert state["allocator"] == "reuse" and state["library"].startswith("glibc")
    assert min(_faults_of_allocations()) < PAGES // 10
    state = use_allocator("system")
    assert state["allocator"] == "system" and "defaults restored" in state["note"]
    # the retained memory went back to the OS: the next block is faulted in on first write (later ones may be
    # served from holes of the heap, as glibc does in any fragmented heap)
    assert _faults_of_allocations(1)[0] > PAGES // 2


def test_unknown_allocator_is_refused_and_nothing_changes():
    before = allocator_state()
    with pytest.raises(ValueError, match="unknown allocator 'jemalloc'.*reuse"):
        use_allocator("jemalloc")
    assert allocator_state() == before


def test_a_preloaded_allocator_is_left_alone(monkeypatch, restore_system):
    monkeypatch.setenv("LD_PRELOAD", "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2")
    state = use_allocator("reuse")
    assert state["allocator"] == "system" and "jemalloc" in state["library"] and "preloaded" in state["note"]
