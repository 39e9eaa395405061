"""What one invocation's policy can cost the worker: hostile delegations and a normal one.

Run: ``uv run python bench/policy_bench.py [--root TREE] [--label NAME] [--cases A,B]``.
Prints a table and merges its figures, under ``NAME`` (default ``current``), into
``bench/results/policy.json`` (the cases not run keep their last figures). Pure CPU, one
core, no services.

``--root`` imports ``worker`` from another checkout (e.g. an export of an older commit:
``git archive <commit> worker | tar -x -C /tmp/before``), so the same cases can be
measured before and after a change. Each case runs in a child process of its own (cold
caches, its own peak RSS) and is stopped after ``--timeout`` seconds.

Every case is one ``validate_invocation`` of an invocation whose chain was issued by the
service itself (a delegation to a holder, as tests/security builds them), timed in CPU
seconds of the process (``time.process_time``): on an asyncio worker that is how long
the event loop is held, and every request queued behind it waits as long.

Cases:
  attack     30 ``["not", ["like", ".x", P]]`` statements, each P a different 4 KB
             pattern with 8 ``{a,b}`` groups (256 alternatives of ~4 K characters),
             ``.x`` a short text: the patterns match nothing, so the policy holds
  classes    one ``like`` whose 4 KB pattern holds 8 ``{a,b}`` groups and 100 classes
             spanning the whole BMP (``[\\x00-\\uffff]``), each slow to compile
  scan       ``*`` + 4,000 ``?`` + ``b*`` over a 900,000-character text (a regex
             search that tries every position)
  variants   ``*{?,[a]}…*``: 8 groups, so 256 alternatives, each a 25-character
             segment of wildcards searched over 900,000 characters
  selector   30 ``["any", ".l[][]", ["==", ".", 2]]`` over 1,000 lists of 900 integers
  equal      30 ``["all", ".l", ["==", ".", V]]``, V 10 lists of 1,000 integers, ``.l``
             10 copies of V (deep equality walks what the step count does not see)
  render     a failing ``["==", ".a", L]``, L 900,000 integers: the error names it
  maxpattern the costliest pattern per step found that stays within the pattern cap
             (4 classes spanning the BMP, ~8,700 steps), then 1,000 cheap statements
  statements 6,000 ``["==", ".a", 1]``: the cheapest statements, as many as fit
  normal     Hilt's ``["like", ".product", "did:web:*"]`` and two more usual statements,
             warm: the CPU time of one validation (mean over many)
  flood      1,100 different self-signed 4 KiB delegations of empty maps, each decoded
             and its signature checked (as the worker does with proofs); how much the
             resident set grew (VmRSS, after a collection), i.e. what the decode cache kept
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import resource
import string
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
NOW = 1_767_225_600
CASES = (
    "normal", "attack", "classes", "scan", "variants", "selector", "equal", "render",
    "maxpattern", "statements", "flood",
)  # fmt: skip


def _pattern(rnd: random.Random, size: int = 4096, groups: int = 8, filler: str = "") -> str:
    """A ``size``-character pattern: ``groups`` ``{a,b}`` groups among random letters."""
    words = []
    per = (size - len(filler) - groups * 5) // (groups + 1)
    for _ in range(groups):
        words.append("".join(rnd.choice(string.ascii_lowercase) for _ in range(per)))
        words.append("{a,b}")
    out = "".join(words) + filler
    return out + "".join(rnd.choice(string.ascii_lowercase) for _ in range(size - len(out)))


def _rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def _hostile(name: str, rnd: random.Random) -> tuple[list[Any], dict[str, Any]]:
    """The policy and args of a hostile case."""
    if name == "attack":
        return [["not", ["like", ".x", _pattern(rnd)]] for _ in range(30)], {"x": "hello"}
    if name == "classes":
        return [["like", ".x", _pattern(rnd, filler="[\x00-\uffff]" * 100)]], {"x": "hello"}
    if name == "scan":
        return [["like", ".x", "*" + "?" * 4000 + "b*"]], {"x": "a" * 900_000}
    if name == "variants":
        return [["like", ".x", "*" + "{?,[a]}" * 8 + "?" * 16 + "b*"]], {"x": "a" * 900_000}
    if name == "selector":
        return [["any", ".l[][]", ["==", ".", 2]]] * 30, {"l": [[1] * 900 for _ in range(1000)]}
    if name == "equal":
        v = [[i % 24 for i in range(1000)] for _ in range(10)]
        return [["all", ".l", ["==", ".", v]]] * 30, {"l": [v] * 10}
    if name == "render":
        return [["==", ".a", [i % 24 for i in range(900_000)]]], {"a": 1}
    if name == "maxpattern":
        # the most CPU per step found (~1 µs): classes spanning the BMP, as many as the
        # pattern cap allows, then the cheapest statements for the rest of the budget
        pol = [["like", ".x", "[\x00-\uffff]" * 4 + "*"]] + [["==", ".a", 1]] * 1000
        return pol, {"x": "abcd", "a": 1}
    if name == "statements":
        return [["==", ".a", 1]] * 6000, {"a": 1}
    raise SystemExit(f"unknown case {name}")


def _case(name: str) -> dict[str, Any]:
    """Run one case in this process (imports ``worker`` from ``sys.path``)."""
    from worker.ucan import (
        CID,
        Resolver,
        Signer,
        ValidationError,
        cbor,
        customer_add_args,
        decode_token,
        encode_delegation,
        encode_invocation,
        validate_invocation,
        verify_signature,
    )

    rnd = random.Random(os.getpid())
    service, holder = Signer.generate(), Signer.generate()

    def build(pol: list[Any], args: Any) -> tuple[Any, Any]:
        d = encode_delegation(
            service, aud=holder.did, sub=service.did, cmd="/customer/add", pol=pol, exp=None
        )
        raw = args if isinstance(args, bytes) else cbor.encode(args)
        i = encode_invocation(
            holder, sub=service.did, aud=service.did, cmd="/customer/add", args_raw=raw,
            exp=NOW + 300, prf=[CID.dag_cbor(d)],
        )  # fmt: skip
        dlg, inv = decode_token(d), decode_token(i)
        return inv, {dlg.cid: dlg}

    def once(inv: Any, proofs: Any) -> tuple[float, str]:
        start = time.process_time()
        try:
            validate_invocation(inv, proofs, now=NOW, resolver=Resolver())
            outcome = "valid"
        except ValidationError as exc:
            outcome = f"{exc.name}: {exc.message[:150]}"
        return time.process_time() - start, outcome

    out: dict[str, Any] = {}
    pol: list[Any]
    args: Any
    if name == "normal":
        pol = [
            ["like", ".product", "did:web:*"],
            ["like", ".customer", "did:{plc,key}:*"],
            ["==", ".details.region", "us-east-1"],
        ]
        args = customer_add_args(
            "did:plc:abcdefghijklmnopqrstuvwx", "did:web:hilt.fil-forge.com",
            {"external_id": "ext-123", "region": "us-east-1"},
        )  # fmt: skip
        inv, proofs = build(pol, args)
        cold, outcome = once(inv, proofs)
        n = 5000
        start = time.process_time()
        for _ in range(n):
            once(inv, proofs)
        out["cold_ms"] = round(cold * 1e3, 3)
        out["warm_us"] = round((time.process_time() - start) / n * 1e6, 1)
        out["outcome"] = outcome
    elif name == "flood":
        gc.collect()
        base = _rss_kib()
        resolver = Resolver()
        pad: list[dict[str, Any]] = [{}] * 3700
        for k in range(1100):
            raw = encode_delegation(
                holder, aud=holder.did, sub=holder.did, cmd=f"/c/{k}", exp=None,
                meta={"pad": pad},
            )  # fmt: skip
            tok = decode_token(raw)
            verify_signature(tok, resolver)
            del tok
        gc.collect()
        out["token_bytes"] = len(raw)
        out["retained_mib"] = round((_rss_kib() - base) / 1024, 1)
    else:
        pol, args = _hostile(name, rnd)
        inv, proofs = build(pol, args)
        seconds, outcome = once(inv, proofs)
        out["cpu_ms"] = round(seconds * 1e3, 1)
        out["outcome"] = outcome
        out["delegation_bytes"] = len(next(iter(proofs.values())).raw)
    out["peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--root", type=Path, default=ROOT, help="the tree to import worker from")
    p.add_argument("--label", default="current", help="the name of this run in policy.json")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds per case")
    p.add_argument("--cases", default=",".join(CASES), help="comma-separated case names")
    p.add_argument("--case", help=argparse.SUPPRESS)  # the child process's case
    a = p.parse_args(argv)
    if a.case:
        sys.path.insert(0, str(a.root.resolve()))
        print(json.dumps(_case(a.case)))
        return 0

    sys.path.insert(0, str(ROOT / "bench"))
    import _common as c

    figures: dict[str, Any] = {}
    for name in a.cases.split(","):
        cmd = [sys.executable, __file__, "--case", name, "--root", str(a.root)]
        start = time.perf_counter()
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=a.timeout)
        except subprocess.TimeoutExpired:
            figures[name] = {"timeout_s": a.timeout}
            print(f"  {name:<9} stopped after {a.timeout:.0f} s")
            continue
        if done.returncode:
            raise SystemExit(f"case {name} failed:\n{done.stderr}")
        figures[name] = json.loads(done.stdout.splitlines()[-1])
        figures[name]["wall_s"] = round(time.perf_counter() - start, 1)
        print(f"  {name:<9} {json.dumps(figures[name])}")

    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / "policy.json"
    doc: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}
    kept = doc.get(a.label, {}).get("figures", {})  # a run of some cases keeps the others
    doc[a.label] = {
        "machine": c.machine_info(),
        "root": str(a.root.resolve()),
        "clock": "process CPU time (time.process_time), one validation each",
        "figures": {**kept, **figures},
    }
    path.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {path} ({a.label})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
