"""Hazards a text scan of Triton's PTX can see, and the interpreter never shows.

Triton runs a scalar ``tl.store`` or ``tl.atomic_*`` on one thread (or, for a
replicated vector, on the one thread that owns each element): the PTX guards it
with a predicate from ``%tid == 0``. When every thread loaded the same address
before, nothing makes the other warps finish their loads first unless a CTA
barrier (``bar.sync``) sits between; triton 3.9 puts one before atomics, triton
3.6 (the lease machine's) does not, and neither puts one before a store. So:

* **store after load**: a single-thread ``st.global`` to an address that all
  threads loaded since the last barrier, whose loaded value the threads go on
  using (a lagging warp reads the stored value instead: ``advance_step``'s
  race, where a warp took step + 2 for its bias correction). A load whose value
  only feeds the store back (a running-statistics update by the owner threads)
  is no hazard: what the other threads read is discarded.
* **atomic after load**: a single-thread ``atom``/``red.global`` after all
  threads loaded global memory since the last barrier: an arrival counter says
  "this program is done", and other programs may then overwrite what a
  lagging warp has not read yet.

The scan is linear (it follows the PTX text, not its branches), so it sees a
hazard across a loop's back edge only if it also appears in order. Used by
``tests/aot_compile.py`` on every compiled variant; ``tests/test_aot_compile.py``
shows that it catches the race on a fixture kernel.
"""

from __future__ import annotations

import dataclasses
import re

_GUARD = re.compile(r"^@(!?)(%p\w+)\s+")
_REG = re.compile(r"%[a-z]+\d+|%tid\.[xyz]")
_ADDRESS = re.compile(r"\[\s*([^\]]+?)\s*\]")
_BARRIERS = ("bar.sync", "barrier.sync", "bar.red", "barrier.cta.sync")


@dataclasses.dataclass(frozen=True)
class Hazard:
    kind: str  # "store after load" or "atomic after load"
    line: int  # 1-based line in the PTX
    instruction: str
    load_line: int
    load: str

    def __str__(self) -> str:
        return (f"{self.kind}: line {self.line} `{self.instruction}` (one thread) after line {self.load_line} "
                f"`{self.load}` (every thread) with no bar.sync between")


@dataclasses.dataclass
class _Instruction:
    line: int
    text: str
    guard: str | None  # the predicate register guarding it
    negated: bool
    opcode: str
    dests: list[str]
    sources: list[str]
    address: str | None  # normalised [...] operand of a memory instruction


def _instructions(ptx: str) -> list[_Instruction]:
    out = []
    for number, raw in enumerate(ptx.splitlines(), 1):
        text = raw.split("//", 1)[0].strip()
        if text.startswith((".entry", ".visible", ".func", ".weak")) and ("entry" in text or "func" in text):
            out.append(_Instruction(number, text, None, False, ".function", [], [], None))  # a new function
            continue
        if not text or text.startswith((".", "$", "{", "}", "(", ")")) or not text.endswith(";"):
            continue
        text = text[:-1].strip()
        if not text:
            continue
        guard, negated = None, False
        m = _GUARD.match(text)
        if m:
            negated, guard = bool(m.group(1)), m.group(2)
            text_body = text[m.end():]
        else:
            text_body = text
        parts = text_body.split(None, 1)
        opcode = parts[0]
        operands = parts[1] if len(parts) > 1 else ""
        address_m = _ADDRESS.search(operands)
        address = re.sub(r"\s+", "", address_m.group(1)) if address_m else None
        regs = _REG.findall(operands)
        address_regs = _REG.findall(address_m.group(1)) if address_m else []
        if opcode.startswith(("st.", "red.")) or opcode.startswith("bra"):
            dests, sources = [], regs
        elif opcode.startswith("ld."):
            before = operands[:address_m.start()] if address_m else operands
            dests, sources = _REG.findall(before), address_regs
        else:  # op dest, sources...  (atom: dest, [addr], values)
            dests, sources = regs[:1], regs[1:]
        out.append(_Instruction(number, text, guard, negated, opcode, dests, sources, address))
    return out


def _is_global(inst: _Instruction, *prefixes: str) -> bool:
    return inst.opcode.startswith(prefixes) and ".global" in inst.opcode


def _uses_beyond(insts: list[_Instruction], start: int, values: set[str], address: str) -> bool:
    """Whether the registers ``values`` (a load's results) reach anything after ``insts[start]`` but stores
    of them back to ``address``: another memory operation, a guard, a branch."""
    tainted = set(values)
    for inst in insts[start + 1:]:
        used = [r for r in inst.sources if r in tainted]
        guard_used = inst.guard in tainted
        if guard_used:
            return True
        if not used:
            continue
        if inst.opcode.startswith(("st.", "atom.", "red.", "ld.", "bra")):
            if inst.opcode.startswith("st.") and inst.address == address:
                address_regs = set(_REG.findall(address))
                if not address_regs & tainted:  # only the stored value: the write-back itself
                    continue
            return True
        tainted.update(inst.dests)
    return False


def scan(ptx: str) -> list[Hazard]:
    """The hazards of one kernel's PTX (see the module docstring)."""
    insts = _instructions(ptx)
    from_tid: set[str] = set()  # registers computed from %tid
    single: set[str] = set()  # predicates true on one thread per element: %tid-derived == 0
    loads: list[tuple[int, _Instruction]] = []  # all-thread global loads since the last barrier
    hazards = []
    for i, inst in enumerate(insts):
        op = inst.opcode
        if op == ".function":  # each function of the module starts from nothing
            from_tid.clear()
            single.clear()
            loads.clear()
            continue
        if op.startswith(_BARRIERS):
            loads.clear()
            continue
        if any(s.startswith("%tid") or s in from_tid for s in inst.sources) and not op.startswith(("ld.", "st.")):
            from_tid.update(inst.dests)
        if op.startswith("setp.eq") and inst.dests:
            args = inst.text.split(None, 1)[1].split(",")
            operands = [a.strip() for a in args[1:]]
            if any(o in from_tid for o in operands) and any(o in ("0", "0x0") for o in operands):
                single.add(inst.dests[0])
        elif op.startswith("and.pred") and any(s in single for s in inst.sources):
            single.update(inst.dests)
        one_thread = inst.guard in single and not inst.negated
        if _is_global(inst, "ld.") and not one_thread:
            loads.append((i, inst))
        elif one_thread and _is_global(inst, "st."):
            for j, load in loads:
                if load.address == inst.address and _uses_beyond(insts, j, set(load.dests), load.address):
                    hazards.append(Hazard("store after load", inst.line, inst.text, load.line, load.text))
                    break
        elif one_thread and _is_global(inst, "atom.", "red.") and loads:
            j, load = loads[-1]
            hazards.append(Hazard("atomic after load", inst.line, inst.text, load.line, load.text))
    return hazards


if __name__ == "__main__":
    import sys

    found = 0
    for path in sys.argv[1:]:
        with open(path) as f:
            for hazard in scan(f.read()):
                found += 1
                print(f"{path}: {hazard}")
    sys.exit(1 if found else 0)
