#!/usr/bin/env python3
"""Exec a command under the kernel restrictions a systemd unit would impose.

Usage: sandbox_exec.py SPEC.json -- COMMAND [ARGS...] | -m MODULE [ARGS...] | -c CODE

SPEC holds ``allow`` (system call names: the unit's SystemCallFilter=, expanded by
``systemd-analyze syscall-filter``), ``families`` (address family numbers allowed to
socket(), as RestrictAddressFamilies=) and ``mdwe`` (MemoryDenyWriteExecute=). The
filter is built with libseccomp through ctypes, as systemd builds its own; other
calls fail with EPERM, socket() of another family with EAFNOSUPPORT. Used by the tests
because the machine that runs them has no systemd to start the unit itself.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import runpy
import sys

SCMP_ACT_ALLOW = 0x7FFF0000
SCMP_CMP_EQ = 4
PR_SET_MDWE = 65
PR_MDWE_REFUSE_EXEC_GAIN = 1


def scmp_act_errno(code: int) -> int:
    return 0x00050000 | (code & 0xFFFF)


class ArgCmp(ctypes.Structure):
    _fields_ = [
        ("arg", ctypes.c_uint),
        ("op", ctypes.c_int),
        ("datum_a", ctypes.c_uint64),
        ("datum_b", ctypes.c_uint64),
    ]


def apply(spec: dict[str, object]) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if spec.get("mdwe") and libc.prctl(PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_MDWE)")
    lib = ctypes.CDLL("libseccomp.so.2", use_errno=True)
    lib.seccomp_init.restype = ctypes.c_void_p
    lib.seccomp_init.argtypes = [ctypes.c_uint32]
    lib.seccomp_syscall_resolve_name.restype = ctypes.c_int
    lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
    lib.seccomp_rule_add_array.restype = ctypes.c_int
    lib.seccomp_rule_add_array.argtypes = [
        ctypes.c_void_p,
        ctypes.c_uint32,
        ctypes.c_int,
        ctypes.c_uint,
        ctypes.c_void_p,
    ]
    lib.seccomp_load.argtypes = [ctypes.c_void_p]
    ctx = lib.seccomp_init(scmp_act_errno(errno.EPERM))
    if not ctx:
        raise OSError("seccomp_init failed")
    allow = [str(n) for n in spec["allow"]]  # type: ignore[attr-defined]
    families = [int(f) for f in spec["families"]]  # type: ignore[attr-defined]
    for name in allow:
        nr = lib.seccomp_syscall_resolve_name(name.encode())
        if nr < 0 or name == "socket":
            continue  # not a call on this architecture, or socket (below)
        rc = lib.seccomp_rule_add_array(ctx, SCMP_ACT_ALLOW, nr, 0, None)
        if rc != 0:
            raise OSError(-rc, f"seccomp_rule_add {name}")
    nr = lib.seccomp_syscall_resolve_name(b"socket")
    for family in families:
        cmp = ArgCmp(0, SCMP_CMP_EQ, family, 0)
        rc = lib.seccomp_rule_add_array(ctx, SCMP_ACT_ALLOW, nr, 1, ctypes.byref(cmp))
        if rc != 0:
            raise OSError(-rc, "seccomp_rule_add socket")
    others = [
        f for f in range(1, 46) if f not in families
    ]  # the rest of the families get EAFNOSUPPORT, as systemd answers
    for family in others:
        cmp = ArgCmp(0, SCMP_CMP_EQ, family, 0)
        lib.seccomp_rule_add_array(
            ctx, scmp_act_errno(errno.EAFNOSUPPORT), nr, 1, ctypes.byref(cmp)
        )
    rc = lib.seccomp_load(ctx)
    if rc != 0:
        raise OSError(-rc, "seccomp_load")


def main() -> None:
    spec_path, sep, *argv = sys.argv[1:]
    assert sep == "--" and argv, __doc__
    with open(spec_path) as f:
        apply(json.load(f))
    # "-m MODULE" and "-c CODE" run in this interpreter: an unprivileged user may not be
    # able to exec it again (a Python under a root-only home, say).
    if argv[0] == "-m":
        sys.argv = [argv[1], *argv[2:]]
        runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
    elif argv[0] == "-c":
        sys.argv = ["-c", *argv[2:]]
        exec(compile(argv[1], "<sandboxed>", "exec"), {"__name__": "__main__"})
    else:
        os.execv(argv[0], argv)


if __name__ == "__main__":
    main()
