"""How much memory this process may still use, and a check before big allocations.

A process under a container or cgroup memory limit is killed by the kernel, without a Python
``MemoryError``, when it goes over; so anything that is about to decode a file or start a job
whose size is known compares it with :func:`available_bytes` first and raises a clear error
instead. The figure is the smallest of: the machine's available memory (``MemAvailable``), the
room left under every cgroup memory limit above this process (v1 and v2; file pages, which
the kernel evicts before it kills, count as free), and the room left under ``RLIMIT_AS``.
"""

from __future__ import annotations

from pathlib import Path

from nbapp.errors import NbappError

__all__ = ["available_bytes", "format_bytes", "check_fits", "does_not_fit", "OutOfMemory", "CGROUP_ROOT",
           "out_of_memory_message", "is_out_of_memory", "check_address_space",
           "TORCH_ADDRESS_SPACE"]

#: Address space (not memory) a process needs to import torch, load a model and start its
#: threads: VmSize is about 820 MiB after one forward pass of the default model on the CPU,
#: with 300 MiB resident. Below this ``RLIMIT_AS`` (``ulimit -v``) torch aborts or hangs while
#: creating threads, before Python can raise anything.
TORCH_ADDRESS_SPACE = 1280 << 20

#: What to try when memory runs out and nothing more precise is known.
OOM_HINT = "use more downsampling, a smaller batch size, a smaller input or single-plane mode"

#: Where cgroup file systems are mounted (a module constant so that tests can point it at a
#: folder of their own).
CGROUP_ROOT = Path("/sys/fs/cgroup")
_UNLIMITED = 1 << 60


class OutOfMemory(NbappError, MemoryError):
    """Something would need more memory than this process has."""


def format_bytes(n: float) -> str:
    """Bytes in the largest unit that keeps the number above 1.

    >>> format_bytes(1 << 30), format_bytes(144e6), format_bytes(512)
    ('1.0 GiB', '137 MiB', '512 B')
    """
    n = float(n)
    for unit, size in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            value = n / size
            return f"{value:.1f} {unit}" if value < 10 else f"{value:.0f} {unit}"
    return f"{int(n)} B"


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    if text == "max":
        return _UNLIMITED
    try:
        return int(text)
    except ValueError:
        return None


def _stat_value(path: Path, *keys: str) -> int:
    """Sum of the ``keys`` of a cgroup ``memory.stat`` file (0 for missing ones)."""
    total = 0
    try:
        for line in path.read_text().splitlines():
            name, _, value = line.partition(" ")
            if name in keys:
                total += int(value)
    except (OSError, ValueError):
        pass
    return total


def _cgroup_room(proc_cgroup: str) -> int:
    """Room left under the tightest cgroup memory limit on the way to the root (v1 or v2)."""
    room = _UNLIMITED
    for line in proc_cgroup.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, rel = parts
        if controllers == "":  # cgroup v2 (unified)
            base, limit_f, usage_f, stat_f, reclaim = (
                CGROUP_ROOT, "memory.max", "memory.current", "memory.stat",
                ("inactive_file", "active_file"))
            if not (base / "cgroup.controllers").exists():
                base = CGROUP_ROOT / "unified"
        elif "memory" in controllers.split(","):
            base, limit_f, usage_f, stat_f, reclaim = (
                CGROUP_ROOT / "memory", "memory.limit_in_bytes", "memory.usage_in_bytes",
                "memory.stat", ("total_inactive_file", "total_active_file"))
        else:
            continue
        group = base / rel.lstrip("/")
        # walk up: a parent's limit binds its children too
        for folder in [group, *group.parents]:
            if not str(folder).startswith(str(base)):
                break
            limit = _read_int(folder / limit_f)
            usage = _read_int(folder / usage_f)
            if limit is not None and usage is not None and limit < _UNLIMITED:
                used = max(0, usage - _stat_value(folder / stat_f, *reclaim))
                room = min(room, max(0, limit - used))
            if folder == base:
                break
    return room


def _kb_value(path: Path, key: str) -> int | None:
    """``KEY:  N kB`` of a /proc status file, in bytes (None when it is not there)."""
    try:
        for line in path.read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _meminfo_available() -> int:
    value = _kb_value(Path("/proc/meminfo"), "MemAvailable")
    return _UNLIMITED if value is None else value


def _rlimit_as() -> int | None:
    """The soft ``RLIMIT_AS`` (``ulimit -v``) in bytes, or None when there is none."""
    try:
        import resource

        soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    except (ImportError, OSError, ValueError):
        return None
    return None if soft == resource.RLIM_INFINITY or soft < 0 else soft


def _rlimit_room() -> int:
    soft = _rlimit_as()
    if soft is None:
        return _UNLIMITED
    return max(0, soft - (_kb_value(Path("/proc/self/status"), "VmSize") or 0))


def available_bytes() -> int:
    """Bytes this process can still allocate before the machine, a cgroup limit or
    ``RLIMIT_AS`` stops it (a large number where nothing can be measured)."""
    try:
        proc_cgroup = Path("/proc/self/cgroup").read_text()
    except OSError:
        proc_cgroup = ""
    return int(min(_meminfo_available(), _cgroup_room(proc_cgroup), _rlimit_room()))


def does_not_fit(nbytes: float, what: str, hint: str, room: float | None = None) -> OutOfMemory:
    """The :class:`OutOfMemory` for ``what`` needing ``nbytes`` (``room``: the bytes left,
    measured when not given), for a caller that already knows it does not fit.

    >>> str(does_not_fit(3 << 30, "a job", "use less", room=1 << 30))
    'out of memory: a job needs 3.0 GiB but this process has 1.0 GiB left; use less'
    """
    room = available_bytes() if room is None else room
    return OutOfMemory(f"out of memory: {what} needs {format_bytes(nbytes)} but this process "
                       f"has {format_bytes(room)} left; {hint}")


def check_fits(nbytes: float, what: str, hint, fraction: float = 0.9) -> None:
    """Raise :class:`OutOfMemory` when ``nbytes`` is more than ``fraction`` of the memory this
    process has left; ``what`` says what needs it and ``hint`` how to need less: a text, or a
    function of the bytes allowed that makes it (called only when the check fails).

    >>> check_fits(1, "a byte", "")
    >>> check_fits(1 << 62, "a 4 EiB array", "use a smaller one")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    nbapp.memory.OutOfMemory: out of memory: a 4 EiB array needs 4194304 TiB but ...
    """
    room = available_bytes()
    if nbytes <= fraction * room:
        return
    if callable(hint):
        hint = hint(fraction * room)
    if fraction >= 0.9:
        raise does_not_fit(nbytes, what, hint, room)
    share = "half" if fraction == 0.5 else f"{fraction:.0%}"
    raise OutOfMemory(f"out of memory: {what} needs {format_bytes(nbytes)}, more than {share} of "
                      f"the {format_bytes(room)} this process has left (the rest is needed to "
                      f"work on it); {hint}")


def is_out_of_memory(exc: BaseException) -> bool:
    """True for a ``MemoryError`` (nbapp's own :class:`OutOfMemory` included) and for torch's
    GPU ``OutOfMemoryError`` (a ``RuntimeError``).

    >>> is_out_of_memory(MemoryError()), is_out_of_memory(RuntimeError("x"))
    (True, False)
    """
    return isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError"


def out_of_memory_message(exc: BaseException) -> str:
    """The one line shown for running out of memory (page, CLI and job state): nbapp's own
    checks say what needed the memory; a bare ``MemoryError`` or a GPU out-of-memory error gets
    :data:`OOM_HINT`.

    >>> out_of_memory_message(MemoryError()).startswith("out of memory: use more downsampling")
    True
    """
    if isinstance(exc, OutOfMemory):
        return str(exc)
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    if text.startswith("out of memory"):  # the model wrapper's message names the input
        return text
    return f"out of memory: {OOM_HINT}"


def check_address_space(need: int = TORCH_ADDRESS_SPACE) -> None:
    """Raise :class:`OutOfMemory` with what to do when ``ulimit -v`` (``RLIMIT_AS``) is too
    small for torch to start at all (it would abort or hang in native code instead)."""
    soft = _rlimit_as()
    if soft is None or soft >= need:
        return
    raise OutOfMemory(f"out of memory: the address-space limit (ulimit -v) is "
                      f"{format_bytes(soft)}, below the {format_bytes(need)} of address space "
                      "torch needs to start (it uses much less memory than that); raise "
                      "ulimit -v, or limit memory with a cgroup instead (docker --memory, "
                      "systemd-run -p MemoryMax=...)")
